"""What an ONNX model file is: its inputs, outputs, head kind and labels, read without running it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError

HEADS = ("yolox", "yolov5", "yolov8", "classifier", "ppocr-det", "ppocr-rec", "ppocr-cls", "unknown")


DETECTOR_HEADS = ("yolox", "yolov5", "yolov8")


PPOCR_REC_HEIGHTS = (32, 48)  # the text line heights PP-OCR recognisers are trained at


PPOCR_CLS_SIZE = (192, 48)  # PP-OCR's direction classifier input (width, height)


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

    from graphflow.media.models import open_session

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    try:
        return open_session(path, options)
    except ValueError as exc:
        raise ModelToolError(str(exc)) from None


def _tensors(args: list[Any]) -> list[TensorInfo]:
    from graphflow.media.models import tensor_dims

    return [TensorInfo(a.name, tensor_dims(a.shape or []), a.type.removeprefix("tensor(").rstrip(")")) for a in args]


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
    from graphflow.media.models import guess_output_format

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


def model_file(model: str | Path) -> tuple[Path, bool]:
    """(file, whether `model` is a built-in name) of a built-in model name (the registered detectors, the PP-OCR
    models) or a path; ModelToolError naming the names and the absolute path looked at when it is neither."""
    from graphflow.media.models import REGISTRY
    from graphflow.vision.ocr import PPOCR_MODELS, resolve_ppocr

    name = str(model)
    if name in REGISTRY:
        return REGISTRY[name].path, True
    try:
        if name in PPOCR_MODELS:
            return Path(resolve_ppocr(name)), True
    except ValueError as exc:
        raise ModelToolError(str(exc)) from None
    path = Path(model).expanduser()
    if not path.is_file():
        names = ", ".join([*REGISTRY, *PPOCR_MODELS])
        raise ModelToolError(f"model {model}: not a built-in model ({names}) and no file at {path.absolute()}")
    return path, False


def inspect_model(model: str | Path) -> ModelReport:
    """Inspect an ONNX file or built-in model (`model_file`): tensors, metadata, head, and the engine params that
    run it (ModelToolError when the file cannot be read)."""
    path, builtin = model_file(model)
    session = _session(path)
    inputs, outputs = _tensors(session.get_inputs()), _tensors(session.get_outputs())
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    head, why = guess_head(inputs, outputs, metadata)
    report = ModelReport(str(path), inputs, outputs, sorted(metadata), head, notes=[f"head: {why}"], values=metadata)
    _suggest(report, metadata)
    if builtin and "model" in report.params:
        report.params["model"] = str(model)  # engines take the name as they take the file
    return report


def metadata_names(metadata: dict[str, str]) -> list[str] | None:
    """Class names in a model's metadata (`names` or `labels`, as Ultralytics exports write), None when absent."""
    from graphflow.media.models import parse_names

    return next((n for key in ("names", "labels") if key in metadata for n in [parse_names(metadata[key])] if n),
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
