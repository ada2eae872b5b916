"""Infer engine: batches frames from all streams, runs a detector and writes data["detections"] in frame pixels.

The batching (per-stream queues, round-robin, deadline, drops, pipelining, records) is graphflow.vision.batching;
this engine validates frames, queues them, and turns each model output into the contract's detections.
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import numpy as np

from graphflow import Engine, Message, Param, ParamError
from graphflow.channel import Closed
from graphflow.vision.batching import DROP_POLICIES, BatchPipeline, BatchPolicy, BatchStats, Queued, Scheduler
from graphflow.vision.detect import DetectParams, finish_candidates, postprocess
from graphflow.vision.letterbox import PinnedStaging, letterbox_batch, letterbox_batch_cupy, letterbox_info
from graphflow.vision.models import BACKENDS, ModelSpec, make_backend, powers_of_two, resolve_model, stack_batch

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


def without_tensor(msg: Message) -> Message:
    """The message less arrays["tensor"] (a shallow copy: the received message is left as it is). One without a
    tensor is returned as it is: it is already infer's own copy (made when queued or when its batch was stacked)."""
    if "tensor" not in msg.arrays:
        return msg
    return Message(msg.stream, msg.seq, msg.pts, msg.data, {k: v for k, v in msg.arrays.items() if k != "tensor"},
                   msg.times, msg.port)


def frame_names(batch: list[Queued], limit: int = 8) -> str:
    """`cam1#4, cam2#4, …` for log lines and errors."""
    names = [f"{q.item.stream}#{q.item.seq}" for q in batch[:limit]]
    return ", ".join(names) + (f", … ({len(batch)} frames)" if len(batch) > limit else "")


class Infer(Engine):
    """Object detector: batches tensors across streams, runs the model, decodes, NMS, maps boxes back."""

    inputs = ("in",)
    outputs = ("out",)
    model = Param(str, "yolox-nano", doc="registered model name or path to an ONNX file")
    backend = Param(str, "auto", choices=BACKENDS, doc="auto: torch on a CUDA GPU if installed, else onnxruntime "
                                                        "(its CUDA provider if present, else CPU)")
    conf = Param(float, 0.3, ge=0.0, le=1.0, doc="minimum detection score")
    iou = Param(float, 0.45, ge=0.0, le=1.0, doc="NMS IoU threshold (per class)")
    classes = Param(list, [], doc="keep only these classes (names or ids); empty keeps all")
    max_batch = Param(int, 1, ge=1, doc="most frames run together, taken round-robin from all streams")
    max_wait_ms = Param(float, 10.0, ge=0.0, doc="longest a frame waits for its batch to fill")
    queue = Param(int, 8, ge=1, doc="frames held per stream before the drop policy applies")
    drop = Param(str, "block", choices=DROP_POLICIES,
                 doc="full stream queue: block (back-pressure upstream), drop_oldest, or latest (also skip stale "
                     "frames: each batch takes a stream's newest frame only)")
    target_latency_ms = Param(float, 0.0, ge=0.0, doc="adapt batch size and wait to hold per-stream p95 latency "
                                                      "under this (0: off)")
    threads = Param(int, 0, ge=0, doc="CPU threads for each model instance (0: up to 4)")
    instances = Param(int, 1, ge=1, doc="model copies running batches at once (CPU: e.g. one per core with "
                                        "threads 1; GPU: 1)")
    letterbox = Param(bool, False, doc="take frames (arrays['image']) and letterbox them here with the model's own "
                                       "preprocessing, as DeepStream's nvinfer does, instead of a preprocess engine "
                                       "before infer: on a GPU backend a batch goes up in one copy")

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
        self.runners = [make_backend(self.backend, self.threads, self.max_batch) for _ in range(self.instances)]
        for runner in self.runners:
            runner.load(self.spec.path)
        self.runner = self.runners[0]
        policy = BatchPolicy(max_batch=self.max_batch, max_wait_s=self.max_wait_ms / 1e3, queue=self.queue,
                             drop=self.drop, target_latency_s=self.target_latency_ms / 1e3)
        self.scheduler = Scheduler(policy, BatchStats(self.max_batch, slots=self.instances))
        self.failures: list[str] = []
        self.failures_lock = threading.Lock()
        self._infos: dict[tuple[int, int], dict] = {}  # letterbox info by frame size (`letterbox: true`)
        self._staging = PinnedStaging()  # letterbox on a GPU backend: the batch's page-locked upload buffer
        # a backend that decodes on the GPU hands over per-frame candidates [k, 6] instead of raw outputs
        self.gpu_decode = all(hasattr(r, "candidates") for r in self.runners)
        runs = [functools.partial(r.candidates, fmt=self.spec.output_format, p=self.detect) if self.gpu_decode
                else r.infer for r in self.runners]
        if self.gpu_decode:  # record each batch size's decode now, not while the first frames wait
            width, height = self.runner.input.size
            for run in runs:
                for size in powers_of_two(self.max_batch):
                    run(np.zeros((size, 3, height, width), np.float32))
            if self.letterbox:  # and the batch letterbox: CuPy, its kernel and the pinned upload buffer load on first
                # use, which held a fresh process's first batch long enough for live streams to drop frames
                frames = [np.zeros((height, width, 3), np.uint8)] * self.max_batch
                for runner in self.runners:
                    runner.prepare(letterbox_batch_cupy(frames, self.spec.preprocess, ["bgr"] * len(frames),
                                                        self._staging))
        # a GPU backend times its runs on the GPU: busy time is then kernel time, not the host's wait
        spans = [getattr(r, "device_span", None) for r in self.runners]
        self.pipeline = BatchPipeline(self.scheduler, self._assemble, runs, self._finish, self._failed, name=self.id,
                                      spans=spans)
        self.pipeline.start()
        self.log.info("model %s (%s) on %s ×%d, input %s, max_batch %d%s", self.spec.name, self.spec.output_format,
                      self.runner.name, self.instances, list(self.runner.input.size), self.max_batch,
                      ", decoded on the GPU" if self.gpu_decode else "")

    def process(self, msg: Message) -> None:
        msg = self._framed(msg) if self.letterbox else self._checked(msg)
        self.scheduler.put(msg.stream, msg, msg.times.get("capture"), self.stopping)
        self._raise_failures()

    def _framed(self, msg: Message) -> Message:
        """`letterbox: true`: the message with data["letterbox"] for its frame (letterboxed later, with its batch)."""
        image = msg.arrays.get("image")
        if image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            got = "none" if image is None else f"{image.dtype} {list(image.shape)}"
            raise ValueError(f"{self.id}: message {msg.stream}#{msg.seq} needs arrays['image'], an HxWx3 uint8 "
                             f"frame, to letterbox (got {got})")
        size = image.shape[1], image.shape[0]
        info = self._infos.get(size)
        if info is None:  # one geometry per frame size, worked out once
            info = self._infos[size] = letterbox_info(*size, self.spec.preprocess)
        # a new message (the one received may be shared), built directly: `dataclasses.replace` is several times
        # slower, and this runs once per frame; the info's lists are copied so no two frames share them
        own = {k: list(v) if isinstance(v, list) else v for k, v in info.items()}
        return Message(msg.stream, msg.seq, msg.pts, {**msg.data, "letterbox": own}, msg.arrays, msg.times, msg.port)

    def _checked(self, msg: Message) -> Message:
        """The message, once its preprocessed tensor is known to fit the model."""
        if "tensor" not in msg.arrays or "letterbox" not in msg.data:
            raise ValueError(f"{self.id}: message {msg.stream}#{msg.seq} has no arrays['tensor'] / data['letterbox'] "
                             "(put a preprocess engine before infer, or set infer's letterbox: true to take frames)")
        tensor = msg.arrays["tensor"]
        expected = (3, self.runner.input.size[1], self.runner.input.size[0])
        if tensor.shape != expected:
            raise ValueError(f"{self.id}: tensor shape {list(tensor.shape)} does not fit model {self.spec.name} "
                             f"input {list(expected)} (set preprocess size to {list(self.runner.input.size)})")
        return msg

    def flush(self) -> None:
        self.pipeline.drain(self.stopping)
        self._raise_failures()

    def teardown(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.stop()

    def metrics(self) -> dict[str, Any]:
        scheduler = getattr(self, "scheduler", None)
        return scheduler.metrics() if scheduler is not None else {}

    def _assemble(self, batch: list[Queued]) -> Any:
        """Stack the batch's tensors where they live (one frame: a view, no copy); a backend with `prepare(batch)`
        (e.g. an upload on its own CUDA stream) runs it here, off the model's thread."""
        if self.letterbox:
            return self._letterboxed(batch)
        tensors = [q.item.arrays["tensor"] for q in batch]
        stacked = tensors[0][None] if len(tensors) == 1 else stack_batch(tensors)
        if len(batch) > 1:  # copied: let go of the frames' tensors now (shared-memory slots come free sooner)
            for q in batch:
                q.item = without_tensor(q.item)
        prepare = getattr(self.runner, "prepare", None)
        return prepare(stacked) if prepare is not None else stacked

    def _letterboxed(self, batch: list[Queued]) -> Any:
        """The batch's frames letterboxed into one model input: with CuPy on a GPU backend (one upload), else NumPy."""
        frames = [q.item.arrays["image"] for q in batch]
        colors = [q.item.data.get("color", "bgr") for q in batch]
        prepare = getattr(self.runner, "prepare", None)
        if prepare is None:
            return letterbox_batch(frames, self.spec.preprocess, colors)
        return prepare(letterbox_batch_cupy(frames, self.spec.preprocess, colors, self._staging))

    def _finish(self, entry: Queued, output: np.ndarray) -> None:
        """One frame's raw output (or GPU-decoded candidates) to detections in frame pixels; the tensor is dropped,
        the rest passes on."""
        msg = without_tensor(entry.item)
        if self.gpu_decode:
            detections = finish_candidates(output, msg.data["letterbox"], frame_size(msg), self.spec.labels,
                                           self.detect)
        else:
            detections = postprocess(output, self.spec.output_format, msg.data["letterbox"], frame_size(msg),
                                     self.spec.labels, self.detect)
        msg.data = {**msg.data, "detections": detections}
        try:
            self.send(msg)
        except Closed:  # the graph is shutting down: nothing downstream takes frames any more
            self.pipeline.stop(timeout=0)

    def _failed(self, batch: list[Queued], exc: BaseException) -> None:
        """A worker stage failed: log it with its frames and keep it for the next process()/flush() to raise."""
        text = f"{self.id}: {frame_names(batch)} failed: {type(exc).__name__}: {exc}"
        self.log.error("%s", text, exc_info=exc)
        with self.failures_lock:
            self.failures.append(text)

    def _raise_failures(self) -> None:
        """Re-raise worker failures on the engine's own thread, so the runtime counts them and applies on_error."""
        with self.failures_lock:
            failures, self.failures = self.failures, []
        if failures:
            more = f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else ""
            raise RuntimeError(failures[0] + more)
