"""`graphflow model inspect|quantize`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from graphflow.media.modelinfo import inspect_model
from graphflow.media.quantize import CALIBRATION_METHODS, quantize_model


def add_subcommand(sub: Any) -> None:
    """Register `graphflow model inspect|quantize` on the CLI's subparsers."""
    model = sub.add_parser("model", help="inspect an ONNX model, or make an INT8 copy of a detector")
    verbs = model.add_subparsers(dest="model_cmd", required=True)
    p = verbs.add_parser("inspect", help="inputs, outputs, dynamic axes, the head and the graph params to use it")
    p.add_argument("model", help="ONNX file, or a built-in model name (yolox-nano, ppocr-det, ppocr-rec, ppocr-cls)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_inspect)
    p = verbs.add_parser("quantize", help="INT8 copy of a detector (onnxruntime static quantization, QOperator)")
    p.add_argument("model", help="ONNX detector (a registered name such as yolox-nano, or a file)")
    p.add_argument("--calibrate", required=True, metavar="VIDEO_OR_FOLDER",
                   help="a video file or image folder whose frames calibrate the activation ranges")
    p.add_argument("-o", "--output", required=True, help="INT8 ONNX file to write")
    p.add_argument("--frames", type=int, default=64, help="calibration frames, spread over the source (default 64)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="percentile",
                   help="calibration method (default percentile: ranges over 99.999%% of the values)")
    p.set_defaults(fn=cmd_quantize)


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_model(args.model)
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) if args.json else report.text())
    return 0


STEPS = {"measure": "measuring layers", "calibrate": "calibrating"}  # quantize_model's progress steps, for people


def cmd_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        tasks: dict[str, Any] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(STEPS.get(step, step), total=total)
            bar.update(tasks[step], completed=done)

        done = quantize_model(args.model, args.calibrate, args.output, frames=args.frames, method=args.method,
                              progress=progress)
    convs = done.float_convs
    kept = f"; kept float: {len(convs)} high-resolution or sensitive layers ({', '.join(convs)})" if convs else ""
    print(f"wrote {args.output} (INT8, calibrated on {done.frames} frames of {args.calibrate}{kept})", file=sys.stderr)
    return 0
