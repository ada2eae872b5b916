"""`graphflow model …`: bring-your-own ONNX models. `inspect` reads what a model takes and gives, guesses its head and
names the engine params that run it; `quantize` writes an INT8 copy calibrated on frames preprocessed as infer does.

onnxruntime (and, for quantize, the `onnx` package it needs) load only when a model command runs, so the CLI starts
fast.
"""
from __future__ import annotations

import argparse
import contextlib
import io
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
SENSITIVE_DB = 20.0  # a convolution whose output SQNR from its input rounded to 8 bits is under this stays float
FLOAT_STRIDE = 4  # convolutions reading tensors at most this many input pixels apart (the stem's) stay float
ACTIVATIONS = ("Sigmoid", "Mul", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh")


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


def calibration_tensors(frames: list[np.ndarray], spec: Any) -> list[np.ndarray]:
    """Each frame as a [1, 3, H, W] model input, letterboxed exactly as infer letterboxes decoded (BGR) frames."""
    from graphflow.vision.letterbox import letterbox

    return [letterbox(f, spec, "bgr")[0][None] for f in frames]


class _FrameReader:
    """onnxruntime's calibration data reader over model inputs made by `calibration_tensors`."""

    def __init__(self, tensors: list[np.ndarray], input_name: str) -> None:
        self.items = iter([{input_name: t} for t in tensors])

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


def _graph_links(nodes: list[Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(producer of each tensor, consumers of each tensor) of a list of ONNX nodes."""
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return producer, consumers


def _activation(conv: Any, consumers: dict[str, list[Any]]) -> list[Any]:
    """The activation nodes right after a convolution: a Relu-like op on its output, or SiLU's Sigmoid and Mul."""
    first = [n for n in consumers.get(conv.output[0], []) if n.op_type in ACTIVATIONS]
    return first + [m for n in first if n.op_type == "Sigmoid" for m in consumers.get(n.output[0], [])
                    if m.op_type == "Mul" and conv.output[0] in m.input]


@dataclass(frozen=True)
class ConvStat:
    """One convolution on the calibration frames: `sqnr_db`, its output's SQNR when only its input is rounded to 8
    bits; `stride`, model input rows per row of its input (1 at full resolution, 4 a quarter)."""

    sqnr_db: float
    stride: float


def conv_stats(path: Path, tensors: list[np.ndarray]) -> dict[str, ConvStat]:
    """Per convolution (by node name): its ConvStat. The SQNR is the input's 8-bit step²/12 over its calibrated range
    through the weights' squares against the output's mean square on `tensors`: low where a layer's channels differ
    in range by orders of magnitude and the next one amplifies the small ones (YOLOX-Nano's stem feeding its first
    depthwise convolution: 9.6 dB; every other layer ≥ 25 dB)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    weights = {i.name: i for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    watched = list(dict.fromkeys(name for c in convs for name in (c.input[0], c.output[0])))
    given = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in watched if name not in given)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    power: dict[str, float] = {}
    rows: dict[str, int] = {}
    for tensor in tensors:
        values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: tensor})))
        for name in watched:
            v = values[name]
            rows[name] = v.shape[2] if v.ndim == 4 else tensor.shape[2]
            low[name], high[name] = min(low.get(name, 0.0), float(v.min())), max(high.get(name, 0.0), float(v.max()))
            power[name] = power.get(name, 0.0) + float(np.square(v, dtype=np.float64).mean()) / len(tensors)
    stats = {}
    for c in convs:
        w = numpy_helper.to_array(weights[c.input[1]]).astype(np.float64)
        step = (high[c.input[0]] - low[c.input[0]]) / 255
        noise = step * step / 12 * float(np.square(w).reshape(len(w), -1).sum(1).mean())
        stats[c.name] = ConvStat(10 * np.log10(max(power[c.output[0]], 1e-30) / max(noise, 1e-30)),
                                 tensors[0].shape[2] / rows[c.input[0]])
    return stats


def sensitive_nodes(path: Path, tensors: list[np.ndarray], threshold_db: float = SENSITIVE_DB,
                    float_stride: float = FLOAT_STRIDE) -> list[str]:
    """Names of the nodes to keep float: the convolutions reading at a stride ≤ `float_stride` (the high-resolution
    stem: its wide raw-pixel ranges cost the most agreement, and its large tensors make 8-bit activations slower than
    onnxruntime's float path), and each convolution whose `conv_stats` SQNR is under `threshold_db` with the
    convolution feeding it (an 8-bit tensor anywhere between them rounds the small channels away again); each with
    its activation."""
    import onnx

    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    producer, consumers = _graph_links(nodes)
    keep: list[Any] = []
    for name, stat in conv_stats(path, tensors).items():
        log.debug("quantize: %s input SQNR %.1f dB, stride %g", name, stat.sqnr_db, stat.stride)
        conv = next(n for n in nodes if n.name == name)
        if stat.stride <= float_stride:
            keep += [conv, *_activation(conv, consumers)]
        if stat.sqnr_db >= threshold_db:
            continue
        keep += [conv, *_activation(conv, consumers)]
        up = producer.get(conv.input[0])
        while up is not None and up.op_type in ACTIVATIONS:
            up = producer.get(up.input[0])
        if up is not None and up.op_type == "Conv":
            keep += [up, *_activation(up, consumers)]
    return list(dict.fromkeys(n.name for n in keep))


@dataclass(frozen=True)
class Quantized:
    """What `quantize_model` did: frames calibrated on, the nodes it left float (`sensitive_nodes`, the head's tail)
    and, of those, the convolutions."""

    frames: int
    float_nodes: list[str]
    float_convs: list[str]


def quantize_model(model: str | Path, calibrate: str | Path, output: str | Path, frames: int = 64,
                   method: str = "percentile", threshold_db: float = SENSITIVE_DB) -> Quantized:
    """Write an INT8 copy of a detector (a registered name or an ONNX file) to `output`: onnxruntime static
    quantization in QOperator format (QDQ's per-channel form needs opset 13; YOLOX-Nano is opset 11), u8 activations
    and per-channel s8 weights, activation ranges calibrated on `frames` frames of `calibrate` preprocessed as infer
    does (percentile: each range spans 99.999% of the values seen, so a rare outlier does not coarsen the step).
    Float stay: the head's tail (`head_tail`) and what `sensitive_nodes` picks (YOLOX-Nano: quantized too, its stem
    drops recall against fp32 on the demo video from about 0.9 to 0.58)."""
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
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise ModelToolError(f"quantize needs the onnx package ({exc.name} is missing): pip install onnx") from None
    tensors = calibration_tensors(calibration_frames(calibrate, frames), spec.preprocess)
    float_nodes = list(dict.fromkeys(sensitive_nodes(spec.path, tensors, threshold_db) + head_tail(spec.path)))
    reader = _FrameReader(tensors, inspect_onnx(spec.path).input.name)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    partial = output.with_name(output.name + ".partial")
    quiet = _DropAdvice()  # advice through the root logger, for a pre-processing that fails on YOLOX-Nano
    logging.getLogger().addFilter(quiet)
    progress = io.StringIO()  # the histogram calibrators print their progress: keep it off the command's stdout
    try:
        with contextlib.redirect_stdout(progress):
            quantize_static(str(spec.path), str(partial), reader, quant_format=QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=methods[method], nodes_to_exclude=float_nodes)
        partial.replace(output)
    finally:
        log.debug("quantize: %s", progress.getvalue().strip())
        logging.getLogger().removeFilter(quiet)
        partial.unlink(missing_ok=True)
        for leftover in output.parent.glob(partial.name + "*"):  # calibration's augmented models, if left behind
            leftover.unlink(missing_ok=True)
    convs = {n.name for n in onnx.load(str(spec.path), load_external_data=False).graph.node if n.op_type == "Conv"}
    return Quantized(len(tensors), float_nodes, [n for n in float_nodes if n in convs])


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
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="percentile",
                   help="calibration method (default percentile: ranges over 99.999%% of the values)")
    p.set_defaults(fn=cmd_quantize)


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_model(args.model)
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) if args.json else report.text())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    done = quantize_model(args.model, args.calibrate, args.output, frames=args.frames, method=args.method)
    convs = done.float_convs
    kept = f"; kept float: {len(convs)} high-resolution or sensitive layers ({', '.join(convs)})" if convs else ""
    print(f"wrote {args.output} (INT8, calibrated on {done.frames} frames of {args.calibrate}{kept})", file=sys.stderr)
    return 0
