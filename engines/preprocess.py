"""Preprocess engine: letterboxes each frame into the model's input tensor (arrays["tensor"])."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from graphflow import Engine, Message, Param, ParamError
from graphflow.vision.letterbox import NORMALIZE_MODES, LetterboxSpec, letterbox

log = logging.getLogger(__name__)


class Preprocess(Engine):
    """Resizes frames to the model input keeping aspect ratio, pads, normalises; adds data["letterbox"]."""

    inputs = ("in",)
    outputs = ("out",)
    size = Param(list, [416, 416], doc="model input [width, height]")
    normalize = Param(str, "none", choices=NORMALIZE_MODES, doc="none: raw 0-255; unit: x/255; imagenet: mean/std")
    pad_value = Param(int, 114, ge=0, le=255, doc="value of the padding pixels")
    center = Param(bool, False, doc="centre the image in the padding (False: top-left, as YOLOX)")
    color = Param(str, "bgr", choices=("bgr", "rgb"), doc="channel order the model expects")

    def check(self) -> None:
        if len(self.size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.size):
            raise ParamError("size", f"must be [width, height], two integers ≥ 1 (got {self.size!r})")

    def setup(self) -> None:
        self.spec = LetterboxSpec(size=tuple(self.size), pad_value=self.pad_value, center=self.center,
                                  normalize=self.normalize, color=self.color)

    def process(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        if image is None:
            raise ValueError(f"{self.id}: message {msg.stream}#{msg.seq} has no arrays['image']")
        width, height = self.spec.size
        target = self.alloc((3, height, width), np.float32)
        tensor, info = letterbox(image, self.spec, msg.data.get("color", "bgr"), out=target)
        arrays = {**msg.arrays, "tensor": tensor}
        self.send(dataclasses.replace(msg, data={**msg.data, "letterbox": info}, arrays=arrays))
