"""Secondary engine: a second model on the objects a detector found — a classifier (vehicle type, colour) or a CTC
text recogniser (plates, signs) — whose result is attached to each object as `attributes`. Stages chain: each adds
its result under its own `name` beside what earlier stages added (type, colour, plate on one vehicle).

Frames are queued in the batching scheduler infer uses (graphflow.batching: per-stream queues, batches
across streams in fair rounds, a wait deadline, assemble/run/finish threads); a batch's crops, from all its frames, go
through the model together. Messages that are not frames take the same queue, so they leave behind the frames of
their stream that came before them.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphflow import Detections, Message, Param, ParamError, Stopped, StreamEnd
from graphflow.batching.scheduler import BatchPipeline, BatchPolicy, BatchStats, Queued, Scheduler, WorkerFailures
from graphflow.frames import FrameEngine
from graphflow.media.modelinfo import image_layout, input_size, inspect_model, metadata_names
from graphflow.media.models import open_session, read_labels
from graphflow.vision.crops import NORMALIZE_MODES, RESIZE_MODES, CropSpec, Reuse, classify, crop_tensor
from graphflow.vision.ocr import (
    PPOCR_MODELS,
    character_list,
    ctc_decode,
    metadata_characters,
    read_characters,
    resolve_ppocr,
)

TASKS = {"classifier": "classify", "ppocr-cls": "classify", "ppocr-rec": "text"}


@dataclass
class Job:
    """A message in the queue: for a frame, the objects (indices into its `field` list) to infer on this frame."""

    msg: Message | StreamEnd
    field: str | None = None
    picks: list[int] = dataclasses.field(default_factory=list)


class Secondary(FrameEngine):
    """Second-stage model on detected objects: crops them, batches the crops across frames and streams, and adds
    `attributes` ({"label", "score"} or {"text", "score"}) to each object; tracked objects are re-inferred only
    every `interval` frames or when their box grew by `grow`, and carry their last result in between.

    Consumes arrays["image"] with data["tracks"] (after track) or data["detections"] (after infer)."""

    inputs = ("in",)
    outputs = ("out",)
    model = Param(str, path="read", names=tuple(PPOCR_MODELS),
                  doc="ONNX classifier ([N, classes] output) or CTC recogniser ([N, steps, classes]), or ppocr-rec / "
                      "ppocr-cls (PP-OCR, from rapidocr-onnxruntime); `graphflow model inspect` names the params")
    task = Param(str, "auto", choices=("auto", "classify", "text"), doc="classify or text; auto: from the model")
    name = Param(str, "", doc="the attribute this stage's result goes under, e.g. colour: adds {colour: label, "
                              "colour_score: score} beside earlier stages' (empty: {label|text, score})")
    labels = Param(str, "", path="read", doc="classify: class names, one a line (else the model's metadata names, "
                                             "else numbers); text: the dictionary, one character a line (else "
                                             "the model's metadata 'character')")
    classes = Param(list, [], doc="crop only objects of these labels; empty: all")
    field = Param(str, "auto", choices=("auto", "tracks", "detections"),
                  doc="objects to crop: data['tracks'] or data['detections']; auto: tracks when a frame has them")
    min_size = Param(int, 8, ge=1, doc="skip objects whose box is narrower or shorter than this (pixels)")
    padding = Param(float, 0.0, ge=0.0, le=1.0, doc="grow each box by this share of its size on every side")
    size = Param(list, [], doc="model input [width, height]; default: the model's own (required when dynamic)")
    resize = Param(str, "stretch", choices=RESIZE_MODES, doc="stretch to the size, or fit the height keeping the "
                                                             "aspect ratio, zero-padded on the right (text lines)")
    normalize = Param(str, "unit", choices=NORMALIZE_MODES, doc="none: 0-255; unit: 0-1; imagenet: mean/std; "
                                                                "signed: -1..1 (PP-OCR)")
    color = Param(str, "rgb", choices=("rgb", "bgr"), doc="channel order the model takes")
    layout = Param(str, "auto", choices=("auto", "nchw", "nhwc"), doc="tensor layout; auto: from the model input")
    interval = Param(int, 0, ge=0, doc="re-infer a tracked object every this many frames, carrying its last "
                                       "result in between (0: every frame)")
    grow = Param(float, 0.0, ge=0.0, doc="also re-infer a tracked object when its box area grew by this factor "
                                         "since its last inference (0: off)")
    max_batch = Param(int, 4, ge=1, doc="most frames whose crops run together, in rounds from all streams")
    max_crops = Param(int, 32, ge=1, doc="most crops in one model run (a batch's crops run in slices of this)")
    max_wait_ms = Param(float, 10.0, ge=0.0, doc="longest a frame waits for its batch to fill")
    threads = Param(int, 1, ge=0, doc="onnxruntime CPU threads (0: onnxruntime's default)")

    def check(self) -> None:
        try:
            self.path = resolve_ppocr(self.model)
            report = inspect_model(self.path)
        except ValueError as exc:
            raise ParamError("model", str(exc)) from None
        task = self.task if self.task != "auto" else TASKS.get(report.head)
        if task is None:
            raise ParamError("model", f"{Path(self.path).name} looks like a {report.head} model, not a classifier "
                                      "or text recogniser (set task if it is one)")
        shape = report.inputs[0].shape
        layout = image_layout(shape) if self.layout == "auto" else self.layout
        if layout is None:
            raise ParamError("model", f"input {shape} is not an image batch [N, 3, H, W] or [N, H, W, 3]")
        width, height = input_size(shape, layout)
        size = self.size or [width, height]
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            if not self.size:
                raise ParamError("size", f"the model's input {shape} has a dynamic width or height: set size "
                                         "[width, height]")
            raise ParamError("size", f"must be [width, height], two whole numbers ≥ 1 (got {self.size!r})")
        for i, (fixed, given) in enumerate(zip((width, height), size)):
            if fixed is not None and fixed != given:
                raise ParamError(f"size[{i}]", f"the model's input is {[width, height]} (got {size})")
        self.crop = CropSpec(tuple(size), self.padding, self.resize, self.normalize, self.color, layout)
        self.task_kind = task
        outputs = report.outputs[0].shape
        classes = outputs[-1] if isinstance(outputs[-1], int) else None
        try:
            self.names = self._names(task, classes, report.values)
        except ValueError as exc:
            raise ParamError("labels", str(exc)) from None

    def _names(self, task: str, classes: int | None, metadata: dict[str, str]) -> list[str]:
        """Class names (classify) or the CTC class table (text), from `labels` or the model's metadata."""
        if task == "text":
            chars = read_characters(self.labels) if self.labels else metadata_characters(metadata)
            if chars is None:
                raise ValueError(f"model {Path(self.path).name} has no character list in its metadata: give "
                                 "labels, the recogniser's dictionary (one character a line)")
            return character_list(chars, classes or len(chars) + 2, f"labels {self.labels or self.model}")
        if self.labels:
            return read_labels(self.labels, classes)
        names = metadata_names(metadata)
        return names if names is not None and len(names) == classes else [str(i) for i in range(classes or 0)]

    def setup(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = open_session(Path(self.path), options)
        self.input_name = self.session.get_inputs()[0].name
        self.fixed_batch = isinstance(self.session.get_inputs()[0].shape[0], int)
        self.reuse = Reuse(self.interval, self.grow, forget=max(100, 4 * self.interval))
        self.reuse_lock = threading.Lock()  # decisions on the engine thread, results on the finishing thread
        self.counts = {"objects": 0, "crops_inferred": 0, "crops_reused": 0, "crops_skipped": 0}
        self.failures = WorkerFailures()
        policy = BatchPolicy(max_batch=self.max_batch, max_wait_s=self.max_wait_ms / 1e3)
        self.scheduler = Scheduler(policy, BatchStats(self.max_batch))
        self.pipeline = BatchPipeline(self.scheduler, self._counted(self._assemble), [self._counted(self._run)],
                                      self._finish, self._failed, name=self.id)
        self.pipeline.start()

    def _counted(self, work: Any) -> Any:
        """`work` for a pipeline thread, its time counted as this engine's busy time."""
        def counted(arg: Any) -> Any:
            with self.busy():
                return work(arg)
        return counted

    def _objects(self, msg: Message) -> tuple[str | None, Detections]:
        """(field, objects) of a frame: tracks or detections as `field` says."""
        name = self.field
        if name == "auto":
            name = "tracks" if "tracks" in msg.data else "detections"
        return (name, Detections.of(msg.data[name], f"data['{name}']")) if name in msg.data else (None, Detections())

    def process(self, msg: Message) -> None:
        name, objects = self._objects(msg)
        if not self.takes(msg, "image" in msg.arrays and name is not None, "arrays['image'] and data['tracks'] or "
                          "data['detections']", "put secondary after infer (or track), on decoded frames"):
            return
        picks = []
        boxes = objects.rounded_boxes()
        wanted = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_size
        if self.classes:
            wanted &= np.array([label in self.classes for label in objects.labels.tolist()], bool)
        with self.reuse_lock:
            self.reuse.forget_old(msg.stream, msg.seq)
            for i, box, track, ok in zip(range(len(boxes)), boxes.tolist(), objects.track_ids.tolist(),
                                         wanted.tolist()):
                if not ok:
                    self.counts["crops_skipped"] += 1
                    continue
                self.counts["objects"] += 1
                if track < 0 or self.reuse.due(msg.stream, track, msg.seq, box):
                    picks.append(i)
                else:
                    self.counts["crops_reused"] += 1
        self.counts["crops_inferred"] += len(picks)
        if name is not None and not isinstance(msg.data[name], Detections):  # the typed form from here on
            msg = Message(msg.stream, msg.seq, msg.pts, {**msg.data, name: objects}, msg.arrays, msg.times, msg.port)
        self.scheduler.put(msg.stream, Job(msg, name, picks), msg.times.get("capture"), self.stopping)
        self.failures.raise_any()

    def pass_on(self, msg: Message) -> None:
        """A message that is not a frame queues behind its stream's frames, and leaves unchanged."""
        self.scheduler.put(msg.stream, Job(msg), None, self.stopping)

    def pass_end(self, end: StreamEnd) -> None:
        """A stream's end queues behind its frames too; when it leaves, the stream's track results are forgotten."""
        self.scheduler.put(end.stream, Job(end), None, self.stopping)

    def _assemble(self, batch: list[Queued]) -> tuple[np.ndarray, list[int]]:
        """The crops of every frame in the batch, in order, as one [K, …] float32 array, and each frame's count."""
        total = sum(len(q.item.picks) for q in batch)
        crops = np.empty((total, *self.crop.shape), np.float32)
        k = 0
        for q in batch:
            job = q.item
            if not job.picks:  # a message passed on, a stream's end: nothing to crop
                continue
            image, boxes = job.msg.arrays.get("image"), job.msg.data[job.field].rounded_boxes().tolist()
            color = job.msg.data.get("color", "bgr")
            for i in job.picks:
                crop_tensor(image, boxes[i], self.crop, color, out=crops[k])
                k += 1
        return crops, [len(q.item.picks) for q in batch]

    def _run(self, prepared: tuple[np.ndarray, list[int]]) -> list[np.ndarray]:
        """The model over the batch's crops, in slices of `max_crops` (1 for a fixed-batch model), split per frame."""
        crops, counts = prepared
        step = 1 if self.fixed_batch else self.max_crops
        outputs = [self.session.run(None, {self.input_name: crops[i:i + step]})[0]
                   for i in range(0, len(crops), step)]
        joined = np.concatenate(outputs) if outputs else np.empty((0,), np.float32)
        return np.split(joined, np.cumsum(counts)[:-1]) if counts else []

    def _finish(self, entry: Queued, output: np.ndarray) -> None:
        """Attach each inferred object's result (and reused tracks' last ones), then send the frame on."""
        job = entry.item
        msg = job.msg
        if job.field is None:
            self._send_on(msg)
            if isinstance(msg, StreamEnd):
                with self.reuse_lock:
                    self.reuse.end(msg.stream)
                self.scheduler.forget(msg.stream)
            return
        objects = msg.data[job.field]
        attributes = objects.attributes.copy()
        decode = ctc_decode if self.task_kind == "text" else classify
        results = dict(zip(job.picks, (self._named(decode(row, self.names)) for row in output)))
        with self.reuse_lock:
            for i, track in enumerate(objects.track_ids.tolist()):
                if i in results:
                    attributes[i] = {**(attributes[i] or {}), **results[i]}
                    if track >= 0:
                        self.reuse.store(msg.stream, track, results[i])
                elif track >= 0 and (carried := self.reuse.carried(msg.stream, track)) is not None:
                    attributes[i] = {**(attributes[i] or {}), **carried}
        data = {**msg.data, job.field: objects.replace(attributes=attributes)}
        self._send_on(Message(msg.stream, msg.seq, msg.pts, data, msg.arrays, msg.times, msg.port))

    def _named(self, result: dict[str, Any]) -> dict[str, Any]:
        """A result under this stage's `name`: {"label": "red", "score": 0.9} → {"colour": "red", "colour_score": 0.9}."""
        if not self.name:
            return result
        value = result.get("text", result.get("label"))
        return {self.name: value, f"{self.name}_score": result.get("score")}

    def _send_on(self, msg: Message | StreamEnd) -> None:
        """Send from the finishing thread; a closed output means the graph is stopping."""
        try:
            self.send(msg)
        except Stopped:  # the graph is shutting down: nothing downstream takes frames any more
            self.pipeline.stop(timeout=0)

    def _failed(self, batch: list[Queued], exc: BaseException) -> None:
        """A pipeline stage failed: log it and keep it for the engine thread to raise (the runtime counts it)."""
        text = f"{self.id}: {len(batch)} frames failed: {type(exc).__name__}: {exc}"
        self.log.error("%s", text, exc_info=exc)
        self.failures.add(text)

    def flush(self) -> None:
        self.pipeline.drain(self.stopping)
        self.failures.raise_any()

    def teardown(self) -> None:
        self.pipeline.stop()

    def metrics(self) -> dict[str, Any]:
        return {**self.scheduler.metrics(), **self.counts, **super().metrics()}
