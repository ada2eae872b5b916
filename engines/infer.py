"""Infer engine: batches frames from all streams, runs a detector and writes data["detections"] in frame pixels.

The batching (per-stream queues, fair rounds, deadline, drops, pipelining, records) is graphflow.batching;
this engine validates frames, queues them, and turns each model output into the contract's detections. Messages
that are not frames pass through (graphflow.frames), behind the frames of their stream queued before them.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphflow import Message, Param, ParamError, Stopped, StreamEnd
from graphflow.batching.scheduler import (
    DROP_POLICIES,
    BatchPipeline,
    BatchPolicy,
    BatchStats,
    Queued,
    Scheduler,
    WorkerFailures,
)
from graphflow.frames import FrameEngine
from graphflow.media.backends import BACKENDS, make_backend, powers_of_two, stack_batch
from graphflow.media.models import REGISTRY, ModelSpec, resolve_model
from graphflow.media.nvdec import is_gpu_frame, letterbox_nv12_batch
from graphflow.runtime.sharing import STAGES, stage_key
from graphflow.vision.detect import DetectParams, finish_candidates, postprocess
from graphflow.vision.letterbox import PinnedStaging, letterbox_batch, letterbox_batch_cupy, letterbox_info

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


@dataclass
class Ticketed:
    """A frame in a detector's batch queue with its number in its stream (a message passed through while frames
    are queued waits until the frame numbered before it has left), and the infer engine it goes back to."""

    msg: Message
    ticket: int
    owner: Infer


def frame_names(batch: list[Queued], limit: int = 8) -> str:
    """`cam1#4, cam2#4, …` for log lines and errors."""
    names = [f"{q.item.msg.stream}#{q.item.msg.seq}" for q in batch[:limit]]
    return ", ".join(names) + (f", … ({len(batch)} frames)" if len(batch) > limit else "")


class Infer(FrameEngine):
    """Object detector: batches tensors across streams, runs the model, decodes, NMS, maps boxes back.

    Consumes arrays["tensor"] (with `letterbox: true`, arrays["image"]); a message that is not a frame (no image,
    no tensor) is passed on unchanged, after the frames of its stream that came before it."""

    inputs = ("in",)
    outputs = ("out",)
    model = Param(str, "yolox-nano", path="read", names=tuple(REGISTRY),
                  doc="registered model name or path to an ONNX file (relative to the graph file)")
    labels = Param(str, "", path="read", doc="class names file, one a line (default: a registered model's own; for a "
                                             "file, its metadata 'names', else COCO's for 80 classes, else numbers)")
    backend = Param(str, "auto", choices=BACKENDS, doc="auto: torch on a CUDA GPU if installed, else onnxruntime "
                                                        "(its CUDA provider if present, else CPU)")
    conf = Param(float, 0.3, ge=0.0, le=1.0, doc="minimum detection score")
    iou = Param(float, 0.45, ge=0.0, le=1.0, doc="NMS IoU threshold (per class)")
    classes = Param(list, [], doc="keep only these classes (names or ids); empty keeps all")
    max_batch = Param(int, 1, ge=1, doc="most frames run together, taken in rounds from all streams (longest-waiting "
                                         "first)")
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
            self.spec: ModelSpec = resolve_model(self.model, self.labels)
        except ValueError as exc:
            raise ParamError("labels" if str(exc).startswith("labels file") else "model", str(exc)) from None
        self.detect = DetectParams(conf=self.conf, iou=self.iou, classes=self._class_ids())

    @classmethod
    def declared_classes(cls, params: dict[str, Any]) -> dict[int, str] | None:
        """The classes this engine's detections can carry, id → label, from its params alone (the model's labels,
        less those its `classes` filter leaves out), for checks of engines downstream; None if the model is unusable
        (its own check says why)."""
        declared = cls.declared_params()
        try:
            labels = resolve_model(params.get("model", declared["model"].default), params.get("labels", "")).labels
        except (ValueError, TypeError):
            return None
        kept = params.get("classes")
        if not isinstance(kept, list) or not kept:
            kept = range(len(labels))
        ids = {labels.index(c) if isinstance(c, str) and c in labels else c for c in kept}
        return {i: labels[i] for i in sorted(i for i in ids if type(i) is int and 0 <= i < len(labels))}

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
        self.failures = WorkerFailures()
        self._order_lock = threading.Lock()  # per-stream order of frames and passed-through messages
        self._queued: dict[str, int] = {}  # per stream: ticket of the last frame queued
        self._left: dict[str, int] = {}  # per stream: ticket of the last frame sent on
        self._held: dict[str, list[tuple[int, Message]]] = {}  # per stream: (ticket it waits for, message)
        self._infos: dict[tuple[int, int], dict] = {}  # letterbox info by frame size (`letterbox: true`)
        self._outstanding = 0  # frames queued in the detector and not yet finished, failed or dropped
        self._settled = threading.Condition()
        # engines of other graphs in this process defined alike (the service's tasks) share one detector
        self.shared = self.context.service(STAGES, None)
        self.key = stage_key("infer", self.param_values())
        make = functools.partial(DetectorStage, self)
        self.stage: DetectorStage = self.shared.acquire(self.key, make) if self.shared is not None else make()
        self.stage.join(self)
        self.scheduler, self.runner = self.stage.scheduler, self.stage.runner

    def process(self, msg: Message) -> None:
        needs, hint = (("image", "with letterbox: true infer takes decoded frames, not preprocess's tensors")
                       if self.letterbox else
                       ("tensor", "put a preprocess engine before infer, or set infer's letterbox: true to take frames"))
        if not self.takes(msg, needs in msg.arrays, f"arrays['{needs}']", hint):
            return
        msg = self._framed(msg) if self.letterbox else self._checked(msg)
        ticket = self._queued[msg.stream] = self._queued.get(msg.stream, 0) + 1
        with self._settled:
            self._outstanding += 1
        if not self.scheduler.put(msg.stream, Ticketed(msg, ticket, self), msg.times.get("capture"), self.stopping):
            self._settle()
        self.failures.raise_any()

    def pass_on(self, msg: Message) -> None:
        """Send a message that is not a frame now, or hold it until the frames of its stream queued before it have
        left (infer's frames leave from its worker threads)."""
        with self._order_lock:
            if self._left.get(msg.stream, 0) < self._queued.get(msg.stream, 0):
                self._held.setdefault(msg.stream, []).append((self._queued[msg.stream], msg))
            else:
                self._emit(msg)  # under the lock: one released meanwhile cannot be overtaken

    def pass_end(self, end: StreamEnd) -> None:
        """A stream's end leaves after the frames of the stream queued before it, like any message that is not a
        frame; then the stream is forgotten (its tickets, held messages and scheduler queue)."""
        self.pass_on(end)

    def _release(self, stream: str, upto: float) -> None:
        """Send the held messages of `stream` that wait for a ticket ≤ `upto` (call under the order lock)."""
        held = self._held.get(stream)
        while held and held[0][0] <= upto:
            self._emit(held.pop(0)[1])

    def _emit(self, msg: Message | StreamEnd) -> None:
        """Send a passed-on message (call under the order lock); after a stream's end, forget the stream unless
        frames of a new stream with the same id came in behind it."""
        self.send(msg)
        if isinstance(msg, StreamEnd) and not self._held.get(msg.stream) \
                and self._left.get(msg.stream, 0) >= self._queued.get(msg.stream, 0):
            self._queued.pop(msg.stream, None)
            self._left.pop(msg.stream, None)
            self._held.pop(msg.stream, None)
            self.scheduler.forget(msg.stream)

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
        if "letterbox" not in msg.data:
            raise ValueError(f"{self.id}: message {msg.stream}#{msg.seq} has arrays['tensor'] but no data['letterbox'] "
                             "(make the tensor with a preprocess engine, or set infer's letterbox: true to take frames)")
        tensor = msg.arrays["tensor"]
        expected = (3, self.runner.input.size[1], self.runner.input.size[0])
        if tensor.shape != expected:
            raise ValueError(f"{self.id}: tensor shape {list(tensor.shape)} does not fit model {self.spec.name} "
                             f"input {list(expected)} (set preprocess size to {list(self.runner.input.size)})")
        return msg

    def flush(self) -> None:
        """End of every input: wait until this engine's frames have left the detector (others may still use it)."""
        with self.scheduler.rush(), self._settled:
            while self._outstanding and not self.stopping.is_set():
                self._settled.wait(0.1)
        if not self.stopping.is_set():
            with self._order_lock:  # frames dropped or failed last leave nothing to wait for
                for stream in list(self._held):
                    self._release(stream, float("inf"))
        self.failures.raise_any()

    def teardown(self) -> None:
        self.stage.leave(self)
        if self.shared is None or self.shared.release(self.key):
            self.stage.close()

    def metrics(self) -> dict[str, Any]:
        return {**self.scheduler.metrics(), **super().metrics(), "shared_by": self.stage.users(),
                "streams_held": len(self.scheduler.queues.keys() | self._queued.keys() | self._held.keys())}

    def _settle(self, n: int = 1) -> None:
        """`n` of this engine's frames left the detector (finished, failed or dropped)."""
        with self._settled:
            self._outstanding -= n
            if not self._outstanding:
                self._settled.notify_all()

    def finished(self, entry: Queued, output: np.ndarray) -> None:
        """One frame's raw output (or GPU-decoded candidates) to detections in frame pixels; the tensor is dropped,
        the rest passes on, after held messages of its stream that wait for an earlier frame (dropped or failed) and
        before those that wait for it."""
        msg, ticket = without_tensor(entry.item.msg), entry.item.ticket
        try:
            with self.busy():
                if self.stage.gpu_decode:
                    detections = finish_candidates(output, msg.data["letterbox"], frame_size(msg), self.spec.labels,
                                                   self.detect)
                else:
                    detections = postprocess(output, self.spec.output_format, msg.data["letterbox"], frame_size(msg),
                                             self.spec.labels, self.detect)
            msg.data = {**msg.data, "detections": detections}
            if self._held.get(msg.stream):
                with self._order_lock:
                    self._release(msg.stream, ticket - 1)
            self.send(msg)
            with self._order_lock:
                self._left[msg.stream] = ticket
                self._release(msg.stream, ticket)
        except Stopped:  # this graph is shutting down: nothing downstream takes frames any more
            self.stage.stopped(self)
        self._settle()  # (a failure raised above reaches `failed` through the pipeline, which settles it)

    def dropped(self, entry: Queued) -> None:
        """A drop policy dropped one of this engine's queued frames (counted in the detector's stats)."""
        self._settle()

    def failed(self, batch: list[Queued], exc: BaseException) -> None:
        """Frames of this engine failed in the detector: log it and keep it for the next process()/flush() to
        raise; what waits behind them may go."""
        text = f"{self.id}: {frame_names(batch)} failed: {type(exc).__name__}: {exc}"
        self.log.error("%s", text, exc_info=exc)
        self.failures.add(text)
        with self._order_lock:
            for entry in batch:
                stream, ticket = entry.item.msg.stream, entry.item.ticket
                if ticket > self._left.get(stream, 0):
                    self._left[stream] = ticket
                    self._release(stream, ticket)
        self._settle(len(batch))


class DetectorStage:
    """A detector and its batching: the model instances, the scheduler (a bounded queue per stream, batches formed
    across all of them) and the pipeline that runs the batches. One infer engine makes it; in a service, the infer
    engines of other tasks defined alike (same params) join it, so one model in memory batches every task's
    streams. Each frame carries the engine that queued it, and its result goes back to that engine only."""

    def __init__(self, maker: Infer) -> None:
        self.spec, self.letterbox, self.name = maker.spec, maker.letterbox, maker.id
        self.log = maker.log
        self.runners = [make_backend(maker.backend, maker.threads, maker.max_batch) for _ in range(maker.instances)]
        for runner in self.runners:
            runner.load(self.spec.path)
        self.runner = self.runners[0]
        policy = BatchPolicy(max_batch=maker.max_batch, max_wait_s=maker.max_wait_ms / 1e3, queue=maker.queue,
                             drop=maker.drop, target_latency_s=maker.target_latency_ms / 1e3)
        self.scheduler = Scheduler(policy, BatchStats(maker.max_batch, slots=maker.instances),
                                   on_drop=lambda entry: entry.item.owner.dropped(entry))
        self.owners: list[Infer] = []
        self.lock = threading.Lock()
        self._staging = PinnedStaging()  # letterbox on a GPU backend: the batch's page-locked upload buffer
        # a backend that decodes on the GPU hands over per-frame candidates [k, 6] instead of raw outputs
        self.gpu_decode = all(hasattr(r, "candidates") for r in self.runners)
        runs = [functools.partial(r.candidates, fmt=self.spec.output_format, p=maker.detect) if self.gpu_decode
                else r.infer for r in self.runners]
        if self.gpu_decode:
            self._warm(runs, maker.max_batch)
        # a GPU backend times its runs on the GPU: busy time is then kernel time, not the host's wait
        spans = [getattr(r, "device_span", None) for r in self.runners]
        self.pipeline = BatchPipeline(self.scheduler, self._counted(self._assemble), [self._counted(r) for r in runs],
                                      self._finish, self._failed, name=maker.id, spans=spans)
        self.pipeline.start()
        self.log.info("model %s (%s) on %s ×%d, input %s, max_batch %d%s", self.spec.name, self.spec.output_format,
                      self.runner.name, maker.instances, list(self.runner.input.size), maker.max_batch,
                      ", decoded on the GPU" if self.gpu_decode else "")

    def _warm(self, runs: list[Callable[[Any], Any]], max_batch: int) -> None:
        """Record each batch size's GPU decode now, not while the first frames wait; with `letterbox` also the batch
        letterbox (CuPy, its kernel and the pinned upload buffer load on first use, which would hold a fresh
        process's first batch long enough for live streams to drop frames)."""
        width, height = self.runner.input.size
        for run in runs:
            for size in powers_of_two(max_batch):
                run(np.zeros((size, 3, height, width), np.float32))
        if self.letterbox:
            frames = [np.zeros((height, width, 3), np.uint8)] * max_batch
            for runner in self.runners:
                runner.prepare(letterbox_batch_cupy(frames, self.spec.preprocess, ["bgr"] * len(frames),
                                                    self._staging))

    def join(self, owner: Infer) -> None:
        with self.lock:
            self.owners.append(owner)

    def leave(self, owner: Infer) -> None:
        with self.lock:
            self.owners.remove(owner)

    def users(self) -> int:
        with self.lock:
            return len(self.owners)

    def stopped(self, owner: Infer) -> None:
        """`owner`'s graph is shutting down: a detector of its own stops now; a shared one goes on for the others."""
        if self.users() <= 1:
            self.pipeline.stop(timeout=0)

    def close(self) -> None:
        self.pipeline.stop()

    def _busy_owner(self) -> Infer | None:
        with self.lock:
            return self.owners[0] if self.owners else None

    def _counted(self, work: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`work` for a worker thread, its time counted as the busy time of the first engine using the detector (the
        model runs off process(); a shared detector's work is counted once, not once per task)."""
        def counted(arg: Any) -> Any:
            owner = self._busy_owner()
            if owner is None:
                return work(arg)
            with owner.busy():
                return work(arg)
        return counted

    def _assemble(self, batch: list[Queued]) -> Any:
        """Stack the batch's tensors where they live (one frame: a view, no copy); a backend with `prepare(batch)`
        (e.g. an upload on its own CUDA stream) runs it here, off the model's thread."""
        if self.letterbox:
            return self._letterboxed(batch)
        tensors = [q.item.msg.arrays["tensor"] for q in batch]
        stacked = tensors[0][None] if len(tensors) == 1 else stack_batch(tensors)
        if len(batch) > 1:  # copied: let go of the frames' tensors now (shared-memory slots come free sooner)
            for q in batch:
                q.item.msg = without_tensor(q.item.msg)
        prepare = getattr(self.runner, "prepare", None)
        return prepare(stacked) if prepare is not None else stacked

    def _letterboxed(self, batch: list[Queued]) -> Any:
        """The batch's frames letterboxed into one model input: with CuPy on a GPU backend (one upload), else NumPy."""
        frames = [q.item.msg.arrays["image"] for q in batch]
        colors = [q.item.msg.data.get("color", "bgr") for q in batch]
        prepare = getattr(self.runner, "prepare", None)
        if prepare is None:
            return letterbox_batch(frames, self.spec.preprocess, colors)
        if all(is_gpu_frame(f) for f in frames):  # NVDEC frames: letterboxed from NV12 where they are, one launch
            return prepare(letterbox_nv12_batch(frames, self.spec.preprocess))
        return prepare(letterbox_batch_cupy(frames, self.spec.preprocess, colors, self._staging))

    def _finish(self, entry: Queued, output: np.ndarray) -> None:
        entry.item.owner.finished(entry, output)

    def _failed(self, batch: list[Queued], exc: BaseException) -> None:
        """A worker stage failed: each engine hears of its own frames."""
        by_owner: dict[int, list[Queued]] = {}
        for entry in batch:
            by_owner.setdefault(id(entry.item.owner), []).append(entry)
        for entries in by_owner.values():
            entries[0].item.owner.failed(entries, exc)
