"""Infer engine: runs a detector on arrays["tensor"] and writes data["detections"] in frame pixels."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from graphflow import Engine, Message, Param, ParamError
from graphflow.vision.detect import DetectParams, postprocess
from graphflow.vision.models import BACKENDS, ModelSpec, make_backend, resolve_model

log = logging.getLogger(__name__)


def frame_size(msg: Message) -> tuple[int, int]:
    """Original (width, height) of a message's frame: data fields, else the image, else undone letterbox."""
    if "width" in msg.data and "height" in msg.data:
        return int(msg.data["width"]), int(msg.data["height"])
    image = msg.arrays.get("image")
    if image is not None:
        return image.shape[1], image.shape[0]
    info = msg.data["letterbox"]
    return round(info["input"][0] / info["scale"]), round(info["input"][1] / info["scale"])


class Infer(Engine):
    """Object detector: batches tensors from preprocess, runs the model, decodes, NMS, maps boxes back."""

    inputs = ("in",)
    outputs = ("out",)
    model = Param(str, "yolox-nano", doc="registered model name or path to an ONNX file")
    backend = Param(str, "auto", choices=BACKENDS, doc="auto: GPU if onnxruntime has CUDA, else CPU; onnxruntime: CPU")
    conf = Param(float, 0.3, ge=0.0, le=1.0, doc="minimum detection score")
    iou = Param(float, 0.45, ge=0.0, le=1.0, doc="NMS IoU threshold (per class)")
    classes = Param(list, [], doc="keep only these classes (names or ids); empty keeps all")
    max_batch = Param(int, 1, ge=1, doc="frames run together; a partial batch runs at end of stream")
    threads = Param(int, 0, ge=0, doc="CPU threads for the backend (0: up to 4)")

    def check(self) -> None:
        try:
            self.spec: ModelSpec = resolve_model(self.model)
        except ValueError as exc:
            raise ParamError("model", str(exc)) from None
        self.detect = DetectParams(conf=self.conf, iou=self.iou, classes=self._class_ids())

    def _class_ids(self) -> frozenset[int] | None:
        """The `classes` filter as class ids; names are looked up in the model's labels."""
        if not self.classes:
            return None
        ids = set()
        for i, c in enumerate(self.classes):
            if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(self.spec.labels):
                ids.add(c)
            elif isinstance(c, str) and c in self.spec.labels:
                ids.add(self.spec.labels.index(c))
            else:
                raise ParamError(f"classes[{i}]", f"not a class of model {self.spec.name} (got {c!r}; "
                                 f"ids 0-{len(self.spec.labels) - 1} or names such as {self.spec.labels[0]!r})")
        return frozenset(ids)

    def setup(self) -> None:
        self.check()  # again: with process placement the engine may be rebuilt after validation
        self.runner = make_backend(self.backend, self.threads)
        self.runner.load(self.spec.path)
        self.pending: list[Message] = []
        self.log.info("model %s (%s) on %s, input %s", self.spec.name, self.spec.output_format,
                      self.runner.name, list(self.runner.input.size))

    def process(self, msg: Message) -> None:
        if "tensor" not in msg.arrays or "letterbox" not in msg.data:
            raise ValueError(f"{self.id}: message {msg.stream}#{msg.seq} has no arrays['tensor'] / data['letterbox'] "
                             "(put a preprocess engine before infer)")
        tensor = msg.arrays["tensor"]
        expected = (3, self.runner.input.size[1], self.runner.input.size[0])
        if tensor.shape != expected:
            raise ValueError(f"{self.id}: tensor shape {list(tensor.shape)} does not fit model {self.spec.name} "
                             f"input {list(expected)} (set preprocess size to {list(self.runner.input.size)})")
        self.pending.append(msg)
        if len(self.pending) >= self.max_batch:
            self._run()

    def flush(self) -> None:
        if self.pending:
            self._run()

    def _run(self) -> None:
        """Run the pending messages as one batch and send each with its detections."""
        batch, self.pending = self.pending, []
        outputs = self.runner.infer(np.stack([m.arrays["tensor"] for m in batch]))
        for msg, output in zip(batch, outputs):
            detections = postprocess(output, self.spec.output_format, msg.data["letterbox"], frame_size(msg),
                                     self.spec.labels, self.detect)
            arrays = {k: v for k, v in msg.arrays.items() if k != "tensor"}
            self.send(dataclasses.replace(msg, data={**msg.data, "detections": detections}, arrays=arrays))
