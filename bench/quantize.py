"""INT8 against fp32 for a detector on the CPU: speed and agreement, in the same run.

Usage: python bench/quantize.py [--model yolox-nano] [--video graphs/data/demo.mp4] [--int8 FILE] [--repeat 20]
       [--every 1] [--calib-frames 64]
Makes the INT8 copy with `graphflow model quantize`'s function (calibrated on --calib-frames frames of the video,
unless --int8 names one), then (a) ms/image of each model with onnxruntime at 1 and 2 threads, batch 1 and 4, both
through infer's own backend (same session options: onnxruntime's full graph optimisation, inter-op 1 thread), five
warm-up runs each, the two models' runs interleaved so load on a shared machine hits both alike (median of --repeat
runs); (b) fp32 at 1 thread, batch 1, per graph optimisation level: what the fp32 figure owes to onnxruntime's
layout optimisation (NCHWc convolutions, level "all"); (c) agreement of INT8 detections with fp32 ones at conf 0.3
on every --every-th frame of the video: recall and precision of IoU ≥ 0.5 class matches (fp32 as reference).
Prints tables and a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphflow.media.quantize import calibration_frames, detection_agreement, quantize_model  # noqa: E402
from graphflow.media.backends import OnnxRuntimeBackend  # noqa: E402
from graphflow.vision.detect import DetectParams, postprocess  # noqa: E402
from graphflow.vision.letterbox import letterbox, letterbox_batch  # noqa: E402
from graphflow.media.models import resolve_model  # noqa: E402
from graphflow.media.video import SourceSpec
from graphflow.media.sources import open_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def time_models(paths: dict[str, Path], batch: np.ndarray, threads: int, repeat: int) -> dict[str, float]:
    """Median ms per image of each model on `batch`, runs interleaved model by model."""
    runners = {}
    for name, path in paths.items():
        runners[name] = OnnxRuntimeBackend(threads)
        runners[name].load(path)
        for _ in range(5):  # warm-up: first runs allocate and pick kernels
            runners[name].infer(batch)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.infer(batch)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) * 1e3 / len(batch) for name, t in times.items()}


def fp32_levels(path: Path, image: np.ndarray, repeat: int) -> dict[str, float]:
    """Median ms of one image through `path` with one thread at each onnxruntime graph optimisation level."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    out = {}
    for name, level in levels.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: image}
        for _ in range(5):
            session.run(None, feed)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        out[name] = round(float(np.median(times)) * 1e3, 2)
    return out


def detections(path: Path, frames: list[np.ndarray], spec, conf: float) -> list[list[dict]]:
    """Each frame's detections by the model at `path` with `spec`'s preprocessing and labels."""
    runner = OnnxRuntimeBackend(1)
    runner.load(path)
    p = DetectParams(conf=conf)
    out = []
    for frame in frames:
        tensor, info = letterbox(frame, spec.preprocess, "bgr")
        out.append(postprocess(runner.infer(tensor[None])[0], spec.output_format, info,
                               (frame.shape[1], frame.shape[0]), spec.labels, p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolox-nano")
    ap.add_argument("--video", default=str(ROOT / "graphs/data/demo.mp4"))
    ap.add_argument("--int8", help="an INT8 model made before (default: made here)")
    ap.add_argument("--calib-frames", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--every", type=int, default=1, help="agreement on every N-th frame (default: all)")
    ap.add_argument("--conf", type=float, default=0.3)
    args = ap.parse_args()

    spec = resolve_model(args.model)
    tmp = tempfile.TemporaryDirectory()
    int8 = Path(args.int8) if args.int8 else Path(tmp.name) / "model.int8.onnx"
    convs = None
    if not args.int8:
        t0 = time.perf_counter()
        convs = quantize_model(args.model, args.video, int8, frames=args.calib_frames).float_convs
        print(f"quantized on {args.calib_frames} frames in {time.perf_counter() - t0:.1f} s; kept float: "
              f"{len(convs)} convolutions ({', '.join(convs)}) with their activations, and the head's tail")
    paths = {"fp32": spec.path, "int8": int8}

    src = open_source(SourceSpec(uri=args.video))
    frames = [f.image for f in src if f.index % args.every == 0]
    src.close()
    four = letterbox_batch(calibration_frames(args.video, 4, seed=1), spec.preprocess, ["bgr"] * 4)

    rows = []
    print(f"{'threads':>7} {'batch':>5} {'fp32 ms/img':>12} {'int8 ms/img':>12} {'speed-up':>9}")
    for threads in (1, 2):
        for batch in (1, 4):
            ms = time_models(paths, four[:batch], threads, args.repeat)
            rows.append({"threads": threads, "batch": batch, "fp32_ms": round(ms["fp32"], 2),
                         "int8_ms": round(ms["int8"], 2), "speedup": round(ms["fp32"] / ms["int8"], 2)})
            print(f"{threads:>7} {batch:>5} {ms['fp32']:>12.2f} {ms['int8']:>12.2f} {ms['fp32'] / ms['int8']:>8.2f}x")

    levels = fp32_levels(spec.path, four[:1], args.repeat)
    print("fp32, 1 thread, batch 1, by graph optimisation level (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in levels.items()))

    ref = detections(spec.path, frames, spec, args.conf)
    got = detections(int8, frames, spec, args.conf)
    agreement = {}
    for same_class in (True, False):
        matched, n_ref, n_got = detection_agreement(ref, got, same_class=same_class)
        recall, precision = matched / max(n_ref, 1), matched / max(n_got, 1)
        kind = "same class" if same_class else "any class"
        print(f"agreement on {len(frames)} frames at conf {args.conf}: fp32 {n_ref} detections, int8 {n_got}, "
              f"matched {matched} (IoU ≥ 0.5, {kind}): recall {recall:.3f}, precision {precision:.3f}")
        agreement["same_class" if same_class else "any_class"] = {"recall": round(recall, 4),
                                                                  "precision": round(precision, 4)}
    result = {"model": args.model, "int8_bytes": int8.stat().st_size, "fp32_bytes": spec.path.stat().st_size,
              "timing": rows, "frames": len(frames), "fp32_detections": n_ref, "int8_detections": n_got,
              "calibration_frames": args.calib_frames if not args.int8 else None, "float_convs": convs,
              "fp32_ms_by_level": levels, **agreement}
    print("RESULT " + json.dumps(result))
    tmp.cleanup()


if __name__ == "__main__":
    main()
