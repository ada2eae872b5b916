"""Preprocess engine: letterboxes each frame into the model's input tensor (arrays["tensor"]), on the CPU or GPU."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging

import numpy as np

from graphflow import Message, Param, ParamError
from graphflow.frames import FrameEngine
from graphflow.vision.letterbox import NORMALIZE_MODES, LetterboxSpec, letterbox, letterbox_cupy, require_cupy

log = logging.getLogger(__name__)


class Preprocess(FrameEngine):
    """Resizes frames to the model input keeping aspect ratio, pads, normalises; adds data["letterbox"].

    With device "cuda" a CuPy kernel does it all; the tensor comes back to host memory unless `keep_on_gpu`,
    which sends the CuPy array itself: only for an infer engine in the same process (a GPU array cannot cross
    to another process) with a GPU backend (torch, tensorrt). Consumes arrays["image"]: a message without one
    (a total, an event) is passed on unchanged."""

    inputs = ("in",)
    outputs = ("out",)
    size = Param(list, [416, 416], doc="model input [width, height]")
    normalize = Param(str, "none", choices=NORMALIZE_MODES, doc="none: raw 0-255; unit: x/255; imagenet: mean/std")
    pad_value = Param(int, 114, ge=0, le=255, doc="value of the padding pixels")
    center = Param(bool, False, doc="centre the image in the padding (False: top-left, as YOLOX)")
    color = Param(str, "bgr", choices=("bgr", "rgb"), doc="channel order the model expects")
    device = Param(str, "cpu", choices=("cpu", "cuda"), doc="cuda: letterbox on the GPU with CuPy")
    keep_on_gpu = Param(bool, False, doc="cuda only: send the tensor as a CuPy array (infer in this process only)")

    def check(self) -> None:
        if len(self.size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.size):
            raise ParamError("size", f"must be [width, height], two integers ≥ 1 (got {self.size!r})")
        if self.keep_on_gpu and self.device != "cuda":
            raise ParamError("keep_on_gpu", f"needs device 'cuda' (got device {self.device!r})")
        if self.device == "cuda" and importlib.util.find_spec("cupy") is None:
            raise ParamError("device", "cuda needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)")

    def setup(self) -> None:
        self.spec = LetterboxSpec(size=tuple(self.size), pad_value=self.pad_value, center=self.center,
                                  normalize=self.normalize, color=self.color)
        if self.device == "cuda":
            try:
                require_cupy()
            except ValueError as exc:
                raise ParamError("device", str(exc).removeprefix("device cuda: ")) from None

    def process(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        if not self.takes(msg, image is not None, "arrays['image']", "preprocess takes decoded frames"):
            return
        width, height = self.spec.size
        color = msg.data.get("color", "bgr")
        if self.device == "cuda":
            tensor, info = letterbox_cupy(image, self.spec, color)
            if not self.keep_on_gpu:
                tensor = tensor.get(out=self.alloc((3, height, width), np.float32))
        else:
            tensor, info = letterbox(image, self.spec, color, out=self.alloc((3, height, width), np.float32))
        arrays = {**msg.arrays, "tensor": tensor}
        self.send(dataclasses.replace(msg, data={**msg.data, "letterbox": info}, arrays=arrays))
