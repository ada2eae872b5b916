"""Picture sinks: `video` (an annotated MP4 per stream) and `snapshot` (a JPEG per event)."""
from __future__ import annotations

import io
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from graphflow.engines.publish.base import at, check_folder, safe_name, stream_path
from graphflow.engines.publish.brokers import BufferedSink
from graphflow.engines.publish.segments import PerStreamSink, Segments
from graphflow.engines.publish.spool import MemoryQueue
from PIL import Image

from graphflow import Detections, Engine, Message, Param, ParamError
from graphflow.vision.osd import Overlay, VideoWriter


class VideoSink(PerStreamSink):
    """Annotated MP4 per stream: boxes and trails of data['tracks'] (else data['detections']), the rule engine's
    zones and lines with counts (data['rules']) and flashes of data['events'], drawn on arrays['image']. Messages
    without an image are skipped. The files are fragmented MP4: a crash leaves them playable. A stream whose frame
    size changes starts a new file (the earlier one is kept as a segment)."""

    kind = "video"
    path = Param(str, doc="output .mp4 per stream: `{stream}` is replaced by the stream id, else name.<stream>.mp4")
    fps = Param(float, 10.0, doc="frame rate of the file (> 0)")
    trail = Param(int, 30, ge=0, doc="track trail length in frames (0 = none)")
    flash = Param(int, 10, ge=1, doc="frames an event stays highlighted")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        check_folder(at(field, "path"), Path(spec["path"]).parent)
        if spec["fps"] <= 0:
            raise ParamError(at(field, "fps"), f"must be a number > 0 (got {spec['fps']!r})")

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.writers: dict[str, tuple[VideoWriter, Segments, tuple[int, ...]]] = {}  # stream → writer, files, shape
        self.overlays: dict[str, Overlay] = {}

    def units(self, msg: Message) -> int:
        return int(msg.image is not None)

    def held(self) -> set[str]:
        return set(self.writers) | set(self.overlays)

    def write(self, msg: Message) -> None:
        image = msg.image
        if image is None:
            return
        if msg.stream in self.failed:
            self.lost += 1
            return
        color = msg.data.get("color", "bgr")
        objects = msg.data.get("tracks", msg.data.get("detections", ()))
        overlay = self.overlays.setdefault(msg.stream, Overlay(self.trail, self.flash))
        frame = overlay.render(image, msg.seq, objects, msg.data.get("rules", ()), msg.data.get("events", ()), color)
        if color == "rgb":
            frame = frame[..., ::-1]
        frame = frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]
        self.per_stream(msg, lambda: self.record(msg.stream, frame))

    def record(self, stream: str, frame: np.ndarray) -> None:
        """Encode `frame` into `stream`'s file, starting a new file first if the size changed or rotation is due."""
        writer, segs, shape = self.writers.get(stream) or (None, self.segments(stream_path(self.path, stream)), None)
        if writer is not None and shape != frame.shape:
            self.owner.log.info("%s: stream's frame size changed from %dx%d to %dx%d; a new file begins", self.name,
                                shape[1], shape[0], frame.shape[1], frame.shape[0])
            writer.close()
            writer = None
        if writer is None:
            writer = VideoWriter()
            path = segs.begin()
            self.writers[stream] = (writer, segs, frame.shape)
            writer.open(path, self.fps, (frame.shape[1], frame.shape[0]), fragmented=True)
        writer.write(frame)
        self.written += 1
        if (self.rotate_mb or self.rotate_s) and segs.due(os.stat(segs.path).st_size):
            writer.close()
            del self.writers[stream]  # the next frame begins the next file

    def end(self, stream: str) -> None:
        self.overlays.pop(stream, None)
        writer, _, _ = self.writers.pop(stream, (None, None, None))
        if writer is not None:
            writer.close()

    def close(self) -> None:
        errors = []
        for stream in list(self.writers):
            try:
                self.end(stream)
            except Exception as exc:  # finish the other streams' files first
                errors.append(exc)
        if errors:
            raise errors[0]


class SnapshotSink(BufferedSink):
    """A JPEG per event: a crop around the event's track box, the full frame, or the annotated frame, named
    `<stream>_<rule>_t<track>_f<frame>_<event>.jpg` in the folder `path`, each part a safe name (see
    `safe_name`), never over an existing file (a second run's gets `-1`, `-2`…); at most `max_count` are taken.
    Messages without an image are skipped."""

    kind = "snapshot"
    errors = (OSError,)
    path = Param(str, doc="folder of the JPEGs (created if missing)")
    mode = Param(str, "crop", choices=("crop", "frame", "annotated"), doc="what each JPEG shows")
    events = Param(list, [], doc="event names that take a snapshot ([] = all)")
    margin = Param(float, 0.1, ge=0, doc="crop margin, a fraction of the box size on each side")
    quality = Param(int, 90, ge=1, le=100, doc="JPEG quality")
    max_count = Param(int, 1000, ge=0, doc="snapshots taken at most; later events are counted, not saved")
    buffer = Param(int, 16, ge=1, doc="JPEGs kept while the disk fails (oldest dropped, counted)")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        check_folder(at(field, "path"), spec["path"])
        if not all(isinstance(e, str) for e in spec["events"]):
            raise ParamError(at(field, "events"), f"must be a list of event names, [] = all (got {spec['events']!r})")

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, MemoryQueue(spec["buffer"]), where)
        self.dir = Path(self.path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ParamError(self.field("path"), f"cannot create the folder {self.path!r} ({exc.strerror})") from None
        self.names = set(self.events)
        self.taken = self.skipped = 0
        self.overlays: dict[str, Overlay] = {}

    def crop(self, image: np.ndarray, box: list[float]) -> np.ndarray:
        """The region of `box` grown by `margin` of its size on each side, clipped to the image."""
        h, w = image.shape[:2]
        x1, y1, x2, y2 = box
        mx, my = (x2 - x1) * self.margin, (y2 - y1) * self.margin
        left, top = int(np.clip(x1 - mx, 0, w - 1)), int(np.clip(y1 - my, 0, h - 1))
        right, bottom = int(np.clip(np.ceil(x2 + mx), left + 1, w)), int(np.clip(np.ceil(y2 + my), top + 1, h))
        return image[top:bottom, left:right]

    def wanted(self, msg: Message) -> list[dict[str, Any]]:
        """The events of `msg` that take a snapshot ([] without an image)."""
        if msg.image is None:
            return []
        return [e for e in msg.data.get("events", ()) if not self.names or e.get("event") in self.names]

    def units(self, msg: Message) -> int:
        return len(self.wanted(msg))

    def items(self, msg: Message) -> list[tuple[Path, bytes]]:
        events = self.wanted(msg)
        if not events:
            return []
        image = msg.image
        rgb = msg.data.get("color", "bgr") == "rgb"
        tracks = Detections.of(msg.data.get("tracks"), "data['tracks']")
        boxes = dict(zip(tracks.track_ids.tolist(), tracks.rounded_boxes().tolist()))
        if self.mode == "annotated":
            overlay = self.overlays.setdefault(msg.stream, Overlay(trail=0))
            image = overlay.render(image, msg.seq, tracks, msg.data.get("rules", ()), events,
                                   msg.data.get("color", "bgr"))
        out = []
        for event in events:
            if self.taken >= self.max_count:
                if not self.skipped:
                    self.owner.log.warning("%s: max_count %d reached; later events are counted, not saved",
                                           self.name, self.max_count)
                self.skipped += 1
                continue
            track = event.get("track_id")
            picture = self.crop(image, boxes[track]) if self.mode == "crop" and track in boxes else image
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(picture if rgb else picture[..., ::-1])).save(
                buf, format="JPEG", quality=self.quality)
            parts = (msg.stream, event.get("rule"), "all" if track is None else track)
            name = "{}_{}_t{}".format(*map(safe_name, parts)) + f"_f{msg.seq:06d}_{safe_name(event.get('event'))}.jpg"
            out.append((self.dir / name, buf.getvalue()))
            self.taken += 1
        return out

    def held(self) -> set[str]:
        return set(self.overlays)

    def end(self, stream: str) -> None:
        self.overlays.pop(stream, None)

    def send(self, pending: deque[tuple[Path, bytes]]) -> None:
        while pending:
            path, jpeg = pending[0]
            self.save(path, jpeg)
            pending.popleft()

    @staticmethod
    def save(path: Path, jpeg: bytes) -> None:
        """Write a new file: `path`, or `<name>-1.jpg`, `-2`… when a previous run left one of that name (never
        over it); a write that fails leaves no partial file."""
        for n in range(1000):
            candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                file = open(candidate, "xb")
            except FileExistsError:
                continue
            try:
                with file:
                    file.write(jpeg)
            except OSError:
                candidate.unlink(missing_ok=True)
                raise
            return
        raise FileExistsError(f"{path}: 1000 files of that name exist already")

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "taken": self.taken, "skipped": self.skipped}
