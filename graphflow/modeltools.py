"""`graphflow model …`: bring-your-own ONNX models. `inspect` reads what a model takes and gives, guesses its head and
names the engine params that run it; `quantize` writes an INT8 copy calibrated on frames preprocessed as infer does.

onnxruntime (and, for quantize, the `onnx` package it needs) load only when a model command runs, so the CLI starts
fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphflow.errors import GraphflowError

log = logging.getLogger(__name__)

HEADS = ("yolox", "yolov5", "yolov8", "classifier", "ppocr-det", "ppocr-rec", "ppocr-cls", "unknown")
DETECTOR_HEADS = ("yolox", "yolov5", "yolov8")
PPOCR_REC_HEIGHTS = (32, 48)  # the text line heights PP-OCR recognisers are trained at
PPOCR_CLS_SIZE = (192, 48)  # PP-OCR's direction classifier input (width, height)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class ModelToolError(GraphflowError, ValueError):
    """A model file or a `graphflow model` argument that cannot be used; shown as one line."""


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: name, shape (ints where fixed, the axis name or "?" where dynamic), element type."""

    name: str
    shape: list
    dtype: str

    @property
    def dynamic(self) -> list[int]:
        """Indices of the axes whose size is not fixed in the file."""
        return [i for i, d in enumerate(self.shape) if not isinstance(d, int)]


@dataclass
class ModelReport:
    """What `graphflow model inspect` found: tensors, metadata keys, the guessed head, and the engine (with params)
    that runs the model in a graph; `notes` say what the file cannot tell (normalisation, labels)."""

    path: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    metadata: list[str]
    head: str
    engine: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict, repr=False)  # the metadata itself (long: not printed)

    def as_dict(self) -> dict[str, Any]:
        report = asdict(self)
        del report["values"]
        return report

    def text(self) -> str:
        """The report for people: one line per tensor, the head, then a graph snippet to paste."""
        lines = [f"model {self.path}"]
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            for t in tensors:
                dyn = f"  (dynamic axes: {', '.join(map(str, t.dynamic))})" if t.dynamic else ""
                lines.append(f"  {kind:6} {t.name}: {t.dtype} {t.shape}{dyn}")
        if self.metadata:
            lines.append(f"  metadata: {', '.join(self.metadata)}")
        lines.append(f"head: {self.head}")
        if self.engine:
            lines.append("engine: " + json.dumps({"type": self.engine, "params": self.params}, ensure_ascii=False))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _session(path: Path) -> Any:
    """An onnxruntime session that only reads the model (no graph optimisation, one thread)."""
    import onnxruntime as ort

    from graphflow.vision.models import open_session

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    try:
        return open_session(path, options)
    except ValueError as exc:
        raise ModelToolError(str(exc)) from None


def _tensors(args: list[Any]) -> list[TensorInfo]:
    from graphflow.vision.models import _dims

    return [TensorInfo(a.name, _dims(a.shape or []), a.type.removeprefix("tensor(").rstrip(")")) for a in args]


def _fixed(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def image_layout(shape: list) -> str | None:
    """"nchw" or "nhwc" for a rank-4 image input with 3 (or 1) channels, else None."""
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3):
        return "nchw"
    if shape[3] in (1, 3):
        return "nhwc"
    return None


def input_size(shape: list, layout: str) -> tuple[int | None, int | None]:
    """(width, height) of an image input, None where that axis is dynamic."""
    h, w = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    return _fixed(w), _fixed(h)


def guess_head(inputs: list[TensorInfo], outputs: list[TensorInfo], metadata: dict[str, str]) -> tuple[str, str]:
    """(head, why) of a model from its tensors and metadata; the head is one of HEADS."""
    from graphflow.vision.models import guess_output_format

    if len(inputs) != 1 or not outputs:
        return "unknown", f"{len(inputs)} inputs; graphflow runs models with one image input"
    layout = image_layout(inputs[0].shape)
    if layout is None:
        return "unknown", f"input {inputs[0].shape} is not a [N, 3, H, W] or [N, H, W, 3] image"
    width, height = input_size(inputs[0].shape, layout)
    out = outputs[0].shape
    if len(out) == 4 and out[1] == 1:
        return "ppocr-det", "one-channel map the size of the input: a DB text detector's probability map"
    if len(out) == 3 and ("character" in metadata or (height in PPOCR_REC_HEIGHTS + (None,) and width is None
                                                     and _fixed(out[2]) and out[2] > 100)):
        why = "character list in metadata" if "character" in metadata else "text-line input, wide per-step classes"
        return "ppocr-rec", f"[N, steps, classes] sequence output ({why}): a CTC text recogniser"
    if len(out) == 2 and _fixed(out[1]):
        if out[1] == 2 and (width, height) in ((None, None), PPOCR_CLS_SIZE):
            return "ppocr-cls", "two scores for a text-line input: PP-OCR's 0°/180° direction classifier"
        return "classifier", f"[N, {out[1]}] scores: an image classifier of {out[1]} classes"
    if len(out) == 3 and width and height:
        try:
            return guess_output_format(f"input {inputs[0].name}", out, (width, height)), "detector output shape"
        except ValueError as exc:
            return "unknown", str(exc)
    return "unknown", f"output {out} matches no head graphflow knows"


def inspect_model(path: str | Path) -> ModelReport:
    """Inspect an ONNX file: tensors, metadata, head, and the engine params that run it (ModelToolError when the
    file cannot be read)."""
    path = Path(path)
    if not path.is_file():
        raise ModelToolError(f"model {path}: no such file")
    session = _session(path)
    inputs, outputs = _tensors(session.get_inputs()), _tensors(session.get_outputs())
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    head, why = guess_head(inputs, outputs, metadata)
    report = ModelReport(str(path), inputs, outputs, sorted(metadata), head, notes=[f"head: {why}"], values=metadata)
    _suggest(report, metadata)
    return report


def metadata_names(metadata: dict[str, str]) -> list[str] | None:
    """Class names in a model's metadata (`names` or `labels`, as Ultralytics exports write), None when absent."""
    from graphflow.vision.models import _parse_names

    return next((n for key in ("names", "labels") if key in metadata for n in [_parse_names(metadata[key])] if n),
                None)


def _suggest(report: ModelReport, metadata: dict[str, str]) -> None:
    """Fill in the engine and params that run `report`'s model, and notes on what to check."""
    shape = report.inputs[0].shape if report.inputs else []
    layout = image_layout(shape) or "nchw"
    width, height = input_size(shape, layout) if len(shape) == 4 else (None, None)
    names = metadata_names(metadata)
    out = report.outputs[0].shape if report.outputs else []
    if report.head in DETECTOR_HEADS:
        classes = out[2] - 5 if report.head != "yolov8" else out[1] - 4
        report.engine = "infer"
        report.params = {"model": report.path, "letterbox": True}
        if not isinstance(shape[0], int):
            report.params["max_batch"] = 4
        else:
            report.notes.append("fixed batch of 1: infer runs it frame by frame (export with a dynamic batch axis "
                                "to batch across streams)")
        if names is None and classes != 80:
            report.params["labels"] = "labels.txt"
            report.notes.append(f"{classes} classes and no names in the file: give a labels file, one name a line")
        report.notes.append("infer letterboxes with the head's preprocessing: YOLOX BGR 0-255, YOLOv5/v8 RGB 0-1")
    elif report.head in ("classifier", "ppocr-cls"):
        report.engine = "secondary"
        size = [width or PPOCR_CLS_SIZE[0], height or PPOCR_CLS_SIZE[1]]
        report.params = {"model": report.path, "task": "classify", "size": size}
        if layout != "nchw":
            report.params["layout"] = layout
        if report.head == "ppocr-cls":
            report.params.update(labels="labels.txt", resize="fit", normalize="signed")
            report.notes.append("labels.txt: '0' and '180' (text upright or upside down)")
        else:
            report.params.update(normalize="imagenet", color="rgb")
            report.notes.append("normalize and color are not in the file: set them as the model was trained "
                                "(none, unit, imagenet or signed; rgb or bgr)")
            if names is None:
                report.params["labels"] = "labels.txt"
                report.notes.append(f"{out[1]} classes and no names in the file: give a labels file, one name a line")
    elif report.head == "ppocr-rec":
        report.engine = "secondary"
        report.params = {"model": report.path, "task": "text", "size": [320, height or 48], "resize": "fit",
                         "normalize": "signed", "color": "bgr"}
        if "character" not in metadata:
            report.params["labels"] = "characters.txt"
            report.notes.append("no character list in the file: give the recogniser's dictionary, one a line")
    elif report.head == "ppocr-det":
        report.notes.append("a DB text detector: the first stage of an OCR graph (its maps need DB postprocessing)")


def calibration_frames(source: str | Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """Up to `count` decoded frames (HxWx3 uint8 BGR) spread over a video file or image folder: a reservoir sample,
    seeded, so the same source always calibrates the same way."""
    from graphflow.vision.video import SourceError, SourceSpec, open_source

    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    try:
        src = open_source(SourceSpec(uri=str(source)))
        try:
            for i, frame in enumerate(src):
                if len(kept) < count:
                    kept.append(frame.image)
                elif (j := int(rng.integers(0, i + 1))) < count:
                    kept[j] = frame.image
        finally:
            src.close()
    except SourceError as exc:
        raise ModelToolError(f"--calibrate {source}: {exc}") from None
    if not kept:
        raise ModelToolError(f"--calibrate {source}: no frames in it")
    return kept


class _DropAdvice(logging.Filter):
    """Drops onnxruntime.quantization's "Please consider pre-processing" advice (its shape inference fails on YOLOX)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


class _FrameReader:
    """onnxruntime's calibration data reader over frames letterboxed exactly as infer letterboxes them."""

    def __init__(self, frames: list[np.ndarray], input_name: str, spec: Any) -> None:
        from graphflow.vision.letterbox import letterbox

        self.items = iter([{input_name: letterbox(f, spec, "bgr")[0][None]} for f in frames])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:  # onnxruntime's reader protocol; each calibration reads the frames once
        pass


def head_tail(path: Path) -> list[str]:
    """Names of the nodes after the model's last convolutions (no Conv, MatMul or Gemm downstream of them): the
    head's sigmoid, concat and reshape that assemble boxes and scores. They stay float: one uint8 range over raw box
    offsets and 0-1 scores together leaves the scores too few levels (nearly every detection fell under conf 0.3)."""
    import onnx

    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    weighted = ("Conv", "MatMul", "Gemm")
    feeds = [False] * len(nodes)  # per node: whether a weighted layer is downstream of it
    for i in reversed(range(len(nodes))):  # ONNX lists nodes in topological order: consumers come later
        feeds[i] = any(nodes[j].op_type in weighted or feeds[j] for out in nodes[i].output for j in consumers.get(out, []))
    return [n.name for n, f in zip(nodes, feeds) if n.op_type not in weighted and not f]


def quantize_model(model: str | Path, calibrate: str | Path, output: str | Path, frames: int = 64,
                   method: str = "minmax") -> int:
    """Write an INT8 copy of a detector (a registered name or an ONNX file) to `output`: onnxruntime static
    quantization in QOperator format (QDQ's per-channel form needs opset 13; YOLOX-Nano is opset 11), u8 activations
    and per-channel s8 weights (per-tensor weights wreck its depthwise convolutions), activation ranges calibrated on
    `frames` frames of `calibrate` preprocessed as infer does. Returns the number of frames used."""
    from graphflow.vision.models import inspect_onnx, resolve_model

    try:
        spec = resolve_model(str(model))
    except ValueError as exc:
        raise ModelToolError(str(exc)) from None
    if frames < 1:
        raise ModelToolError(f"--frames: must be ≥ 1 (got {frames})")
    if method not in CALIBRATION_METHODS:
        raise ModelToolError(f"--method: must be one of {', '.join(CALIBRATION_METHODS)} (got {method!r})")
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise ModelToolError(f"quantize needs the onnx package ({exc.name} is missing): pip install onnx") from None
    images = calibration_frames(calibrate, frames)
    reader = _FrameReader(images, inspect_onnx(spec.path).input.name, spec.preprocess)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    partial = output.with_name(output.name + ".partial")
    quiet = _DropAdvice()  # advice through the root logger, for a pre-processing that fails on YOLOX-Nano
    logging.getLogger().addFilter(quiet)
    try:
        quantize_static(str(spec.path), str(partial), reader, quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=methods[method], nodes_to_exclude=head_tail(spec.path))
        partial.replace(output)
    finally:
        logging.getLogger().removeFilter(quiet)
        partial.unlink(missing_ok=True)
        for leftover in output.parent.glob(partial.name + "*"):  # calibration's augmented models, if left behind
            leftover.unlink(missing_ok=True)
    return len(images)


def detection_agreement(reference: list[list[dict]], candidate: list[list[dict]], iou: float = 0.5,
                        same_class: bool = True) -> tuple[int, int, int]:
    """(matched, reference total, candidate total) over frames of detections (`box`, `score`, `class_id`): per frame
    (and class, with `same_class`), candidates matched greedily best score first to the unmatched reference box of
    highest IoU ≥ `iou`. Recall is matched / reference, precision matched / candidate."""
    from graphflow.vision.detect import pairwise_iou

    matched = ref_total = cand_total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref_total, cand_total = ref_total + len(ref), cand_total + len(cand)
        group = (lambda d: d["class_id"]) if same_class else (lambda d: 0)
        for key in {group(d) for d in ref} & {group(d) for d in cand}:
            a = np.array([d["box"] for d in ref if group(d) == key], np.float64)
            picks = sorted((d for d in cand if group(d) == key), key=lambda d: -d["score"])
            ious = pairwise_iou(np.array([d["box"] for d in picks], np.float64), a)
            free = np.ones(len(a), bool)
            for row in ious:
                row = np.where(free, row, -1.0)
                best = int(row.argmax())
                if row[best] >= iou:
                    free[best] = False
                    matched += 1
    return matched, ref_total, cand_total


def add_subcommand(sub: Any) -> None:
    """Register `graphflow model inspect|quantize` on the CLI's subparsers."""
    model = sub.add_parser("model", help="inspect an ONNX model, or make an INT8 copy of a detector")
    verbs = model.add_subparsers(dest="model_cmd", required=True)
    p = verbs.add_parser("inspect", help="inputs, outputs, dynamic axes, the head and the graph params to use it")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_inspect)
    p = verbs.add_parser("quantize", help="INT8 copy of a detector (onnxruntime static quantization, QOperator)")
    p.add_argument("model", help="ONNX detector (a registered name such as yolox-nano, or a file)")
    p.add_argument("--calibrate", required=True, metavar="VIDEO_OR_FOLDER",
                   help="a video file or image folder whose frames calibrate the activation ranges")
    p.add_argument("-o", "--output", required=True, help="INT8 ONNX file to write")
    p.add_argument("--frames", type=int, default=64, help="calibration frames, spread over the source (default 64)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="minmax", help="calibration method")
    p.set_defaults(fn=cmd_quantize)


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_model(args.model)
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) if args.json else report.text())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    used = quantize_model(args.model, args.calibrate, args.output, frames=args.frames, method=args.method)
    print(f"wrote {args.output} (INT8, calibrated on {used} frames of {args.calibrate})", file=sys.stderr)
    return 0
