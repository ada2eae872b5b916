"""Detector models: a registry of shipped models, ONNX file inspection, and inference backends.

A backend has `load(path)`, `input` (ModelInput) and `infer(batch [N,3,H,W] float32) -> np.ndarray`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphflow.vision.detect import YOLOX_STRIDES
from graphflow.vision.letterbox import LetterboxSpec

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
BACKENDS = ("auto", "onnxruntime")
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


def resolve_model(model: str) -> ModelSpec:
    """A registry name or a path to an ONNX file to a ModelSpec; ValueError (one line) when it cannot be used."""
    if model in REGISTRY:
        return REGISTRY[model]
    path = Path(model).expanduser()
    if not path.is_file():
        raise ValueError(f"model {model}: not a registered model ({', '.join(REGISTRY)}) and not a file")
    info, outputs = inspect_onnx(path)
    fmt = guess_output_format(model, outputs[0], info.size)
    classes = outputs[0][2] - 5 if fmt in ("yolox", "yolov5") else outputs[0][1] - 4
    labels = coco_labels() if classes == 80 else [str(i) for i in range(classes)]
    normalize = "none" if fmt == "yolox" else "unit"
    color = "bgr" if fmt == "yolox" else "rgb"
    spec = LetterboxSpec(size=info.size, pad_value=114, center=fmt != "yolox", normalize=normalize, color=color)
    return ModelSpec(name=path.stem, path=path, output_format=fmt, labels=labels, preprocess=spec)


def _dims(value: object) -> list:
    """Shape of an ONNX graph input/output: ints where fixed, the symbolic name (or "?") where not."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def inspect_onnx(path: Path) -> tuple[ModelInput, list[list]]:
    """Input description and output shapes of an ONNX file, read without running it."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others on non-ONNX bytes
        raise ValueError(f"model {path}: not an ONNX file ({type(exc).__name__})") from None
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or not graph.output:
        raise ValueError(f"model {path}: not an ONNX file with one image input (found {len(inputs)} inputs)")

    shape = _dims(inputs[0])
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise ValueError(f"model {path}: input {inputs[0].name} must be [N, 3, H, W] with fixed H, W (got {shape})")
    info = ModelInput(name=inputs[0].name, size=(shape[3], shape[2]), dynamic_batch=not isinstance(shape[0], int))
    return info, [_dims(o) for o in graph.output]


class OnnxRuntimeBackend:
    """Runs an ONNX model with onnxruntime; `gpu` asks for its CUDA provider (unverified: no GPU here)."""

    name = "onnxruntime"

    def __init__(self, threads: int = 0, gpu: bool = False) -> None:
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.gpu = gpu
        self.session = None
        self.input: ModelInput | None = None

    def providers(self) -> list[str]:
        """Execution providers to use: CUDA first when asked for and installed (onnxruntime-gpu), then CPU."""
        import onnxruntime as ort

        cuda = self.gpu and "CUDAExecutionProvider" in ort.get_available_providers()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]

    def load(self, path: Path) -> None:
        """Open a session; intra-op threads are capped so several engines can share a machine."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers())
        except Exception as exc:
            raise ValueError(f"model {path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.input, _ = inspect_onnx(Path(path))
        log.info("loaded %s with %s", path, self.session.get_providers()[0])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a [N, 3, H, W] float32 batch and return the first output; a fixed-batch model runs image by image."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.input.dynamic_batch or len(batch) == 1:
            return self.session.run(None, {self.input.name: batch})[0]
        runs = [self.session.run(None, {self.input.name: batch[i:i + 1]})[0] for i in range(len(batch))]
        return np.concatenate(runs)


def make_backend(kind: str, threads: int = 0) -> OnnxRuntimeBackend:
    """A backend by name: "onnxruntime" runs on the CPU; "auto" also takes onnxruntime's CUDA provider if present."""
    if kind in BACKENDS:
        return OnnxRuntimeBackend(threads, gpu=kind == "auto")
    raise ValueError(f"backend {kind}: not available (choices: {', '.join(BACKENDS)})")
