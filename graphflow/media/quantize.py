"""INT8 quantization of a detector: calibration on real frames, float kept where rounding hurts."""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphflow.media.modelinfo import ModelToolError

log = logging.getLogger(__name__)


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


SENSITIVE_DB = 20.0  # a convolution whose output SQNR from its input rounded to 8 bits is under this stays float


FLOAT_STRIDE = 4  # convolutions reading tensors at most this many input pixels apart (the stem's) stay float


CALIBRATION_STRIDE = 1  # frames the calibrator runs before folding their activations into its histograms


ACTIVATIONS = ("Sigmoid", "Mul", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh")


def calibration_frames(source: str | Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """Up to `count` decoded frames (HxWx3 uint8 BGR) spread over a video file or image folder: a reservoir sample,
    seeded, so the same source always calibrates the same way."""
    from graphflow.media.sources import open_source
    from graphflow.media.video import SourceError, SourceSpec

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


class CalibrationInputs(Sequence[np.ndarray]):
    """Model inputs ([1, 3, H, W] float32) of sampled frames, each letterboxed as `calibration_tensors` does only when
    read: the frames are kept as decoded (640x360 BGR: 0.7 MB each), not as float tensors (2 MB at 416x416)."""

    def __init__(self, frames: list[np.ndarray], spec: Any) -> None:
        self.frames, self.spec = frames, spec

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return calibration_tensors([self.frames[i]], self.spec)[0]


Progress = Callable[[str, int, int], None]  # (step, done, total): what a long quantization reports as it goes


class CalibrationReader:
    """onnxruntime's calibration data reader over CalibrationInputs, one range of them at a time (`set_range`, which
    the calibrator calls with the `CalibStridedMinMax` option): the calibrator then holds one range's activations at
    once, not every frame's (64 frames of YOLOX-Nano: 9 GB)."""

    def __init__(self, inputs: CalibrationInputs, input_name: str, progress: Progress | None = None) -> None:
        self.inputs, self.input_name, self.progress = inputs, input_name, progress
        self.next = self.end = 0
        self.done = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, min(end_index, len(self.inputs))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next >= self.end:
            return None
        tensor = self.inputs[self.next]
        self.next += 1
        self.done += 1
        if self.progress:
            self.progress("calibrate", self.done, len(self.inputs))
        return {self.input_name: tensor}

    def rewind(self) -> None:  # onnxruntime's reader protocol; ranges are set by `set_range`
        self.next = 0


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


def conv_stats(path: Path, tensors: Sequence[np.ndarray], progress: Progress | None = None) -> dict[str, ConvStat]:
    """Per convolution (by node name): its ConvStat. The SQNR is the input's 8-bit step²/12 over its calibrated range
    through the weights' squares against the output's mean square on `tensors`: low where a layer's channels differ
    in range by orders of magnitude and the next one amplifies the small ones (YOLOX-Nano's stem feeding its first
    depthwise convolution: 9.6 dB; every other layer ≥ 25 dB). `progress` hears of each frame ("measure")."""
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
    for done, tensor in enumerate(tensors, 1):
        values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: tensor})))
        if progress:
            progress("measure", done, len(tensors))
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


def sensitive_nodes(path: Path, tensors: Sequence[np.ndarray], threshold_db: float = SENSITIVE_DB,
                    float_stride: float = FLOAT_STRIDE, progress: Progress | None = None) -> list[str]:
    """Names of the nodes to keep float: the convolutions reading at a stride ≤ `float_stride` (the high-resolution
    stem: its wide raw-pixel ranges cost the most agreement, and its large tensors make 8-bit activations slower than
    onnxruntime's float path), and each convolution whose `conv_stats` SQNR is under `threshold_db` with the
    convolution feeding it (an 8-bit tensor anywhere between them rounds the small channels away again); each with
    its activation."""
    import onnx

    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    producer, consumers = _graph_links(nodes)
    keep: list[Any] = []
    for name, stat in conv_stats(path, tensors, progress).items():
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
                   method: str = "percentile", threshold_db: float = SENSITIVE_DB,
                   progress: Progress | None = None) -> Quantized:
    """Write an INT8 copy of a detector (a registered name or an ONNX file) to `output`: onnxruntime static
    quantization in QOperator format (QDQ's per-channel form needs opset 13; YOLOX-Nano is opset 11), u8 activations
    and per-channel s8 weights, activation ranges calibrated on `frames` frames of `calibrate` preprocessed as infer
    does (percentile: each range spans 99.999% of the values seen, so a rare outlier does not coarsen the step).
    Float stay: the head's tail (`head_tail`) and what `sensitive_nodes` picks (YOLOX-Nano: quantized too, its stem
    drops recall against fp32 on the demo video from about 0.9 to 0.58). Memory stays bounded by one frame's
    activations: the calibrator reads one frame per range (`CalibrationReader`). `progress` hears of each frame
    measured and calibrated."""
    from graphflow.media.models import inspect_onnx, resolve_model

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
    tensors = CalibrationInputs(calibration_frames(calibrate, frames), spec.preprocess)
    float_nodes = list(dict.fromkeys(sensitive_nodes(spec.path, tensors, threshold_db, progress=progress)
                                     + head_tail(spec.path)))
    reader = CalibrationReader(tensors, inspect_onnx(spec.path).input.name, progress)
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
                            calibrate_method=methods[method], nodes_to_exclude=float_nodes,
                            extra_options={"CalibStridedMinMax": CALIBRATION_STRIDE})
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
