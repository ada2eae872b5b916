"""Detector models: a registry of shipped models, how a name or file becomes a ModelSpec, and ONNX file inspection
(through onnxruntime, a core dependency). The backends that run models are in graphflow.media.backends.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.vision.detect import YOLOX_STRIDES
from graphflow.vision.letterbox import LetterboxSpec

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
EXPECTED_OUTPUTS = "need [N, anchors, 5+classes] or [N, 4+classes, anchors]"


def coco_labels() -> list[str]:
    """The standard 80 COCO class names, in model order (0 = person)."""
    return (MODELS_DIR / "coco.txt").read_text().splitlines()


@dataclass(frozen=True)
class ModelInput:
    """What a loaded model expects: input name, (width, height), and whether the batch dim is dynamic."""

    name: str
    size: tuple[int, int]
    dynamic_batch: bool


@dataclass
class ModelSpec:
    """A detector: its file, output format, class labels, and the preprocessing it was trained with."""

    name: str
    path: Path
    output_format: str
    labels: list[str]
    preprocess: LetterboxSpec = field(default_factory=LetterboxSpec)


REGISTRY: dict[str, ModelSpec] = {
    "yolox-nano": ModelSpec(
        name="yolox-nano",
        path=MODELS_DIR / "yolox_nano.onnx",
        output_format="yolox",
        labels=coco_labels(),
        preprocess=LetterboxSpec(size=(416, 416), pad_value=114, center=False, normalize="none", color="bgr"),
    ),
}


def guess_output_format(name: str, shape: list, input_size: tuple[int, int]) -> str:
    """Output format from an output shape [N, A, K] / [N, K, A]; ValueError if none fits."""
    dims = [d if isinstance(d, int) else None for d in shape]
    if len(dims) != 3 or dims[1] is None or dims[2] is None:
        raise ValueError(f"model {name}: unrecognised output shape {shape} ({EXPECTED_OUTPUTS})")
    yolox_anchors = sum((input_size[0] // s) * (input_size[1] // s) for s in YOLOX_STRIDES)
    if dims[1] == yolox_anchors and dims[2] > 5:
        return "yolox"
    if dims[1] > dims[2] > 5:
        return "yolov5"
    if dims[2] > dims[1] > 4:
        return "yolov8"
    raise ValueError(f"model {name}: unrecognised output shape {shape} ({EXPECTED_OUTPUTS})")


def read_labels(path: str | Path, classes: int | None = None) -> list[str]:
    """Class names from a labels file, one a line (blank lines skipped); ValueError (one line) when it cannot be
    read or, with `classes`, holds another number of names than the model has classes."""
    try:
        labels = [line.strip() for line in Path(path).expanduser().read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"labels file {path}: cannot read it ({exc.strerror or exc})") from None
    if not labels:
        raise ValueError(f"labels file {path}: no class names in it (one a line)")
    if classes is not None and len(labels) != classes:
        raise ValueError(f"labels file {path}: {len(labels)} names for a model of {classes} classes")
    return labels


def resolve_model(model: str, labels: str = "") -> ModelSpec:
    """A registry name or a path to an ONNX file to a ModelSpec; ValueError (one line) when it cannot be used.

    Class names come from `labels` (a file, one name a line) when given, else a registered model's own, else the
    file's metadata (`names`, as Ultralytics exports write), else COCO's for 80 classes, else the class numbers."""
    if model in REGISTRY:
        spec = REGISTRY[model]
        return dataclasses.replace(spec, labels=read_labels(labels, len(spec.labels))) if labels else spec
    path = Path(model).expanduser()
    if not path.is_file():
        looked = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        raise ValueError(f"model {model}: not a registered model ({', '.join(REGISTRY)}) and not a file{looked}")
    info = inspect_onnx(path)
    fmt = guess_output_format(model, info.outputs[0], info.input.size)
    classes = info.outputs[0][2] - 5 if fmt in ("yolox", "yolov5") else info.outputs[0][1] - 4
    if labels:
        names = read_labels(labels, classes)
    elif info.labels is not None and len(info.labels) == classes:
        names = info.labels
    else:
        names = coco_labels() if classes == 80 else [str(i) for i in range(classes)]
    normalize = "none" if fmt == "yolox" else "unit"
    color = "bgr" if fmt == "yolox" else "rgb"
    spec = LetterboxSpec(size=info.input.size, pad_value=114, center=fmt != "yolox", normalize=normalize, color=color)
    return ModelSpec(name=path.stem, path=path, output_format=fmt, labels=names, preprocess=spec)


def tensor_dims(shape: Sequence[Any]) -> list:
    """Shape of an ONNX input/output as onnxruntime reports it: ints where fixed, the symbolic name (or "?") where
    not."""
    return [d if isinstance(d, int) else (d or "?") for d in shape]


def parse_names(text: str) -> list[str] | None:
    """Class names from model metadata: a list, or a {index: name} dict as Ultralytics exports write (Python or
    JSON literal); None when the text is neither."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, dict) and sorted(value) == list(range(len(value))):
        value = [value[i] for i in range(len(value))]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


@dataclass(frozen=True)
class OnnxInfo:
    """What graphflow reads of an ONNX file before running it: the image input, output shapes and class names
    from its metadata (`names` or `labels`; None when it has none)."""

    input: ModelInput
    outputs: list[list]
    labels: list[str] | None


def describe_session(session: Any, path: Path) -> OnnxInfo:
    """The OnnxInfo of an open onnxruntime session (the model at `path`, named in errors)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ValueError(f"model {path}: not an ONNX file with one image input (found {len(inputs)} inputs)")
    shape = tensor_dims(inputs[0].shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise ValueError(f"model {path}: input {inputs[0].name} must be [N, 3, H, W] with fixed H, W (got {shape})")
    info = ModelInput(name=inputs[0].name, size=(shape[3], shape[2]), dynamic_batch=not isinstance(shape[0], int))
    meta = session.get_modelmeta().custom_metadata_map
    parsed = [parse_names(meta[key]) for key in ("names", "labels") if key in meta]
    labels = next((names for names in parsed if names is not None), None)
    return OnnxInfo(info, [tensor_dims(o.shape) for o in outputs], labels)


def open_session(path: Path, options: Any = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime session of the model at `path`; ValueError (one line) when it is not a model it can load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail and others on bad or unsupported files
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        raise ValueError(f"model {path}: not an ONNX file onnxruntime can load ({reason})") from None


@functools.lru_cache(maxsize=16)
def _inspect_cached(path: str, mtime_ns: int, size: int) -> OnnxInfo:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only read, never run
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return describe_session(open_session(Path(path), options), Path(path))


def inspect_onnx(path: Path) -> OnnxInfo:
    """Input, output shapes and metadata class names of an ONNX file, read through onnxruntime (a core dependency)
    without running it; cached per file version, as validation and setup both ask."""
    stat = Path(path).stat()
    return _inspect_cached(str(path), stat.st_mtime_ns, stat.st_size)
