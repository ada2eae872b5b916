"""`publish`: send results out of the graph: JSON lines, ZeroMQ PUB, Redis streams, annotated MP4, MOTChallenge
result files and JPEG snapshots on events (several sinks at once)."""
from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np
import zmq
from PIL import Image

from graphflow import Engine, Message, Param, ParamError
from graphflow.vision.mot import mot_lines
from graphflow.vision.osd import Overlay, VideoWriter

from .sink import message_record

log = logging.getLogger(__name__)

# Accepted keys and defaults of each sink kind (None = required).
SINK_KEYS: dict[str, dict[str, Any]] = {
    "jsonl": {"path": None},
    "zmq": {"address": "tcp://127.0.0.1:5556", "what": "events", "format": "msgpack", "hwm": 1000},
    "redis": {"url": "redis://127.0.0.1:6379/0", "stream": "graphflow:events", "what": "events", "maxlen": 10000},
    "video": {"path": None, "fps": 10, "trail": 30, "flash": 10},
    "mot": {"path": None},
    "snapshot": {"path": None, "mode": "crop", "events": [], "margin": 0.1, "quality": 90, "max_count": 1000,
                 "buffer": 16},
}
# Allowed values of string keys, and integer keys with their minimum.
CHOICES = {"what": ("events", "frames"), "format": ("msgpack", "json"), "mode": ("crop", "frame", "annotated")}
INTEGERS = {"maxlen": 0, "hwm": 1, "trail": 0, "flash": 1, "quality": 1, "max_count": 0, "buffer": 1}


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _check_dir(field: str, path: str) -> None:
    if not Path(path).resolve().parent.is_dir():
        raise ParamError(field, f"directory of {path!r} does not exist")


def _check_values(field: str, kind: str, full: dict[str, Any]) -> None:
    """Type and range checks of a completed sink spec; ParamError names the faulty key."""
    for key, value in full.items():
        where = f"{field}.{key}"
        if key in CHOICES and value not in CHOICES[key]:
            raise ParamError(where, f"must be one of {', '.join(CHOICES[key])} (got {value!r})")
        if key in INTEGERS and (type(value) is not int or value < INTEGERS[key]):
            raise ParamError(where, f"must be an integer ≥ {INTEGERS[key]} (got {value!r})")
    if "path" in full:
        if not isinstance(full["path"], str) or not full["path"]:
            raise ParamError(f"{field}.path", f"must be a non-empty string (got {full['path']!r})")
        if full["path"] != "-" or kind != "jsonl":
            _check_dir(f"{field}.path", full["path"])
    if kind == "redis":
        if not isinstance(full["url"], str) or not re.match(r"^(redis|rediss|unix)://", full["url"]):
            raise ParamError(f"{field}.url", f"must be a redis://, rediss:// or unix:// URL (got {full['url']!r})")
        if not isinstance(full["stream"], str) or not full["stream"]:
            raise ParamError(f"{field}.stream", f"must be a non-empty string (got {full['stream']!r})")
    if kind == "zmq" and (not isinstance(full["address"], str)
                          or not re.match(r"^(tcp|ipc|inproc)://.+", full["address"])):
        raise ParamError(f"{field}.address", f"must be a tcp://, ipc:// or inproc:// address (got {full['address']!r})")
    if kind == "video" and (isinstance(full["fps"], bool) or not isinstance(full["fps"], (int, float))
                            or full["fps"] <= 0):
        raise ParamError(f"{field}.fps", f"must be a number > 0 (got {full['fps']!r})")
    if kind == "snapshot":
        if not isinstance(full["events"], list) or not all(isinstance(e, str) for e in full["events"]):
            raise ParamError(f"{field}.events", f"must be a list of event names, [] = all (got {full['events']!r})")
        if isinstance(full["margin"], bool) or not isinstance(full["margin"], (int, float)) or full["margin"] < 0:
            raise ParamError(f"{field}.margin", f"must be a number ≥ 0 (got {full['margin']!r})")
        if full["quality"] > 100:
            raise ParamError(f"{field}.quality", f"must be an integer from 1 to 100 (got {full['quality']!r})")


def check_sink(field: str, spec: Any) -> dict[str, Any]:
    """One `sinks[i]` entry validated and completed with defaults; ParamError names the faulty key."""
    if not isinstance(spec, dict):
        raise ParamError(field, f"must be an object with a 'kind' (got {spec!r})")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in SINK_KEYS:
        raise ParamError(f"{field}.kind", f"must be one of {', '.join(SINK_KEYS)} (got {kind!r})")
    known = SINK_KEYS[kind]
    for key in spec:
        if key != "kind" and key not in known:
            raise ParamError(f"{field}.{key}", f"unknown key for a {kind} sink (known: {', '.join(known)})")
    full = {**known, **spec}
    for key, value in full.items():
        if value is None:
            raise ParamError(f"{field}.{key}", f"required for a {kind} sink")
    _check_values(field, kind, full)
    return full


def records(msg: Message, what: str) -> list[dict[str, Any]]:
    """What a network sink sends for `msg`: each event (with its stream and frame), or the frame's record."""
    if what == "frames":
        return [message_record(msg)]
    return [{"stream": msg.stream, "frame": msg.seq, **event} for event in msg.data.get("events", ())]


def _safe(name: Any) -> str:
    """A string usable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


class StreamPaths:
    """One output file per stream from a `path`: `{stream}` is replaced by the stream id; without the placeholder
    the first stream gets `path` itself and later ones `name.<stream>.ext`, so streams never share a file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.paths: dict[str, str] = {}

    def __call__(self, stream: str) -> str:
        if stream not in self.paths:
            if "{stream}" in self.path:
                path = self.path.replace("{stream}", _safe(stream))
            elif not self.paths:
                path = self.path
            else:
                p = Path(self.path)
                path = str(p.with_name(f"{p.stem}.{_safe(stream)}{p.suffix}"))
            self.paths[stream] = path
        return self.paths[stream]


class JsonlSink:
    """One JSON line per message (the `sink` engine's record) to a file or stdout."""

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        self.file: IO[str] = sys.stdout if spec["path"] == "-" else open(spec["path"], "w", buffering=1)

    def write(self, msg: Message) -> None:
        self.file.write(_dump(message_record(msg)) + "\n")

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file is sys.stdout:
            sys.stdout.flush()
        else:
            self.file.close()


class BufferedSink:
    """Base of sinks whose target can fail (a server, a disk): items wait in a bounded buffer (oldest dropped and
    counted) and delivery is retried with capped exponential back-off; failures are logged and counted.

    Subclasses implement `items` (what a message becomes) and `send` (deliver from the left of the buffer,
    popping each delivered item; raise one of `errors` to stop and retry later).
    """

    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, owner: Publish, target: str, bound: int) -> None:
        self.owner, self.target, self.bound = owner, target, bound
        self.pending: deque[Any] = deque()
        self.delay = owner.retry
        self.next_try = 0.0
        self.down = False
        self.failures = self.dropped = self.sent = 0

    def items(self, msg: Message) -> list[Any]:
        raise NotImplementedError

    def send(self, pending: deque[Any]) -> None:
        raise NotImplementedError

    def write(self, msg: Message) -> None:
        for item in self.items(msg):
            if len(self.pending) >= self.bound:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append(item)
        if self.pending and time.monotonic() >= self.next_try:
            self.deliver()

    def deliver(self) -> bool:
        """Send every pending item; on failure keep the rest and schedule the next try."""
        if not self.pending:
            return True
        before = len(self.pending)
        try:
            self.send(self.pending)
        except self.errors as exc:
            self.sent += before - len(self.pending)
            self.failures += 1
            self.owner.log.log(logging.DEBUG if self.down else logging.WARNING, "%s failed (%s); %d items buffered, "
                               "retry in %.2fs", self.target, exc, len(self.pending), self.delay)
            self.down = True
            self.next_try = time.monotonic() + self.delay
            self.delay = min(self.delay * 2, self.owner.retry_max)
            return False
        self.sent += before
        if self.down:
            self.owner.log.info("%s works again; delivered %d items", self.target, before)
        self.down, self.delay, self.next_try = False, self.owner.retry, 0.0
        return True

    def flush(self) -> None:
        self.deliver()

    def close(self) -> None:
        if not self.deliver():
            self.owner.log.warning("%s: %d items not delivered at shutdown", self.target, len(self.pending))
        if self.dropped:
            self.owner.log.warning("%s: %d items dropped (buffer of %d full)", self.target, self.dropped, self.bound)
        self.release()

    def release(self) -> None:
        """Close the connection or file handles."""

    def metrics(self) -> dict[str, int]:
        return {"sent": self.sent, "failures": self.failures, "dropped": self.dropped, "pending": len(self.pending)}


class RedisSink(BufferedSink):
    """XADDs one entry per event (or per frame) to a Redis stream, reconnecting after failures."""

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        import redis  # here, not at the top: a process that hosts no Redis sink does not pay its import

        self.errors = (redis.RedisError,)
        super().__init__(owner, f"redis {spec['url']}", owner.buffer)
        self.stream, self.what, self.maxlen = spec["stream"], spec["what"], spec["maxlen"] or None
        self.client = redis.Redis.from_url(spec["url"], socket_connect_timeout=1.0, socket_timeout=2.0)

    def items(self, msg: Message) -> list[dict[str, str]]:
        """Stream entries: flat str fields (stream, seq, kind) plus the whole item as JSON."""
        kind = "frame" if self.what == "frames" else "event"
        return [{"stream": msg.stream, "seq": str(msg.seq), "kind": kind, "json": _dump(r)} for r in records(msg, self.what)]

    def send(self, pending: deque[dict[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for entry in pending:
            pipe.xadd(self.stream, entry, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        pending.clear()

    def release(self) -> None:
        self.client.close()


class ZmqSink(BufferedSink):
    """Publishes each event (or frame record) on a ZeroMQ PUB socket as [topic = stream id, msgpack/JSON body].

    An XPUB socket with XPUB_NODROP: a subscriber too slow to keep up makes sends fail (buffered and retried)
    instead of losing messages silently; messages no one subscribed to are counted as `unheard`.
    """

    errors = (zmq.Again,)

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        super().__init__(owner, f"zmq {spec['address']}", owner.buffer)
        self.what = spec["what"]
        self.encode = (lambda r: msgpack.packb(r, use_bin_type=True)) if spec["format"] == "msgpack" else (
            lambda r: _dump(r).encode())
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.SNDHWM, spec["hwm"])
        self.socket.setsockopt(zmq.LINGER, 1000)
        try:
            self.socket.bind(spec["address"])
        except zmq.ZMQError as exc:
            self.socket.close(0)
            self.context.term()
            raise ValueError(f"zmq sink: cannot bind {spec['address']} ({exc})") from None
        self.topics: set[bytes] = set()
        self.unheard = 0

    def subscriptions(self) -> set[bytes]:
        """Topic prefixes subscribed to now (reads the pending subscribe/unsubscribe notices)."""
        while self.socket.poll(0):
            notice = self.socket.recv()
            if notice[:1] == b"\x01":
                self.topics.add(notice[1:])
            elif notice[:1] == b"\x00":
                self.topics.discard(notice[1:])
        return self.topics

    def items(self, msg: Message) -> list[tuple[bytes, bytes]]:
        topic = msg.stream.encode()
        return [(topic, self.encode(r)) for r in records(msg, self.what)]

    def send(self, pending: deque[tuple[bytes, bytes]]) -> None:
        topics = self.subscriptions()
        while pending:
            topic, body = pending[0]
            self.socket.send_multipart([topic, body], zmq.NOBLOCK)
            pending.popleft()
            if not any(topic.startswith(t) for t in topics):
                self.unheard += 1

    def release(self) -> None:
        self.socket.close()
        self.context.term()

    def metrics(self) -> dict[str, int]:
        return {**super().metrics(), "unheard": self.unheard}


class SnapshotSink(BufferedSink):
    """A JPEG per event: a crop around the event's track box, the full frame, or the annotated frame, named
    `<stream>_<rule>_t<track>_f<frame>_<event>.jpg` in the directory `path`; at most `max_count` are taken."""

    errors = (OSError,)

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        super().__init__(owner, f"snapshot {spec['path']}", spec["buffer"])
        self.dir = Path(spec["path"])
        self.dir.mkdir(exist_ok=True)
        self.mode, self.margin, self.quality = spec["mode"], float(spec["margin"]), spec["quality"]
        self.names, self.max_count = set(spec["events"]), spec["max_count"]
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

    def items(self, msg: Message) -> list[tuple[Path, bytes]]:
        events = [e for e in msg.data.get("events", ()) if not self.names or e.get("event") in self.names]
        image = msg.arrays.get("image")
        if not events or image is None:
            return []
        rgb = msg.data.get("color", "bgr") == "rgb"
        boxes = {t.get("track_id"): t["box"] for t in msg.data.get("tracks", ())}
        overlay = self.overlays.setdefault(msg.stream, Overlay(trail=0)) if self.mode == "annotated" else None
        if overlay is not None:
            image = overlay.render(image, msg.seq, msg.data.get("tracks", ()), msg.data.get("rules", ()), events,
                                   msg.data.get("color", "bgr"))
        out = []
        for event in events:
            if self.taken >= self.max_count:
                if not self.skipped:
                    self.owner.log.warning("snapshot %s: max_count %d reached; later events are counted, not saved",
                                           self.dir, self.max_count)
                self.skipped += 1
                continue
            track = event.get("track_id")
            picture = self.crop(image, boxes[track]) if self.mode == "crop" and track in boxes else image
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(picture if rgb else picture[..., ::-1])).save(
                buf, format="JPEG", quality=self.quality)
            name = (f"{_safe(msg.stream)}_{_safe(event.get('rule'))}_t{'all' if track is None else track}"
                    f"_f{msg.seq:06d}_{_safe(event.get('event'))}.jpg")
            out.append((self.dir / name, buf.getvalue()))
            self.taken += 1
        return out

    def send(self, pending: deque[tuple[Path, bytes]]) -> None:
        while pending:
            path, jpeg = pending[0]
            path.write_bytes(jpeg)
            pending.popleft()

    def metrics(self) -> dict[str, int]:
        return {**super().metrics(), "taken": self.taken, "skipped": self.skipped}


class VideoSink:
    """Annotated MP4 per stream: boxes and trails of data['tracks'] (else data['detections']), the rule
    engine's zones and lines with counts (data['rules']) and flashes of data['events'], drawn on arrays['image']."""

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        self.owner = owner
        self.paths, self.fps = StreamPaths(spec["path"]), float(spec["fps"])
        self.trail, self.flash = spec["trail"], spec["flash"]
        self.writers: dict[str, VideoWriter] = {}
        self.overlays: dict[str, Overlay] = {}

    def write(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        if image is None:
            self.owner.log.debug("video sink: message %s/%d has no image; skipped", msg.stream, msg.seq)
            return
        color = msg.data.get("color", "bgr")
        objects = msg.data.get("tracks", msg.data.get("detections", ()))
        overlay = self.overlays.setdefault(msg.stream, Overlay(self.trail, self.flash))
        frame = overlay.render(image, msg.seq, objects, msg.data.get("rules", ()), msg.data.get("events", ()), color)
        if color == "rgb":
            frame = frame[..., ::-1]
        frame = frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]
        writer = self.writers.get(msg.stream)
        if writer is None:
            writer = VideoWriter()
            path = self.paths(msg.stream)
            writer.open(path, self.fps, (frame.shape[1], frame.shape[0]))
            self.owner.log.info("video sink: stream %s -> %s", msg.stream, path)
            self.writers[msg.stream] = writer
        writer.write(frame)

    def flush(self) -> None:
        """Nothing to do: files are finished in close()."""

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class MotSink:
    """MOTChallenge results per stream from data['tracks']: `frame,id,x,y,w,h,conf,-1,-1,-1` with frame = seq + 1."""

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        self.owner = owner
        self.paths = StreamPaths(spec["path"])
        self.files: dict[str, IO[str]] = {}

    def write(self, msg: Message) -> None:
        file = self.files.get(msg.stream)
        if file is None:
            file = self.files[msg.stream] = open(self.paths(msg.stream), "w")
        tracks = msg.data.get("tracks")
        if tracks is None:
            raise ValueError(f"mot sink: message {msg.stream}#{msg.seq} has no data['tracks'] (put track before publish)")
        if tracks:
            file.write(mot_lines(msg.seq + 1, [t["track_id"] for t in tracks], [t["box"] for t in tracks],
                                 [t.get("score", 1.0) for t in tracks]))

    def flush(self) -> None:
        for file in self.files.values():
            file.flush()

    def close(self) -> None:
        for file in self.files.values():
            file.close()


SINKS = {"jsonl": JsonlSink, "zmq": ZmqSink, "redis": RedisSink, "video": VideoSink, "mot": MotSink,
         "snapshot": SnapshotSink}


class Publish(Engine):
    """Writes every message to each configured sink: JSON lines, ZeroMQ, Redis, annotated MP4, MOT results, JPEGs."""

    inputs = ("in",)
    outputs = ()
    sinks = Param(list, doc='list of {"kind": "jsonl"|"zmq"|"redis"|"video"|"mot"|"snapshot", ...}; see SINK_KEYS')
    buffer = Param(int, 1000, ge=1, doc="redis/zmq items kept while a sink fails (oldest dropped, counted)")
    retry = Param(float, 0.5, ge=0, doc="first retry delay in seconds after a sink failure, doubled per failure")
    retry_max = Param(float, 30.0, ge=0, doc="cap on the retry delay in seconds")

    def check(self) -> None:
        if not self.sinks:
            raise ParamError("sinks", "needs at least one sink")
        self.specs = [check_sink(f"sinks[{i}]", spec) for i, spec in enumerate(self.sinks)]

    def setup(self) -> None:
        self.outs: list[Any] = []
        try:
            for spec in self.specs:
                self.outs.append(SINKS[spec["kind"]](spec, self))
        except Exception:
            self._close(self.outs)  # the sinks already open (an open zmq socket would block interpreter exit)
            self.outs = []
            raise

    def _buffered(self) -> list[BufferedSink]:
        return [out for out in getattr(self, "outs", ()) if isinstance(out, BufferedSink)]

    @property
    def failures(self) -> int:
        """Failed deliveries over all sinks (each retried later)."""
        return sum(out.failures for out in self._buffered())

    @property
    def dropped(self) -> int:
        """Items lost because a failing sink's buffer was full."""
        return sum(out.dropped for out in self._buffered())

    def process(self, msg: Message) -> None:
        for out in self.outs:
            out.write(msg)

    def flush(self) -> None:
        for out in self.outs:
            out.flush()

    def metrics(self) -> dict[str, Any]:
        per_sink = {f"{i}:{spec['kind']}": out.metrics() for i, (spec, out) in enumerate(zip(self.specs, self.outs))
                    if isinstance(out, BufferedSink)}
        return {"failures": self.failures, "dropped": self.dropped, "sinks": per_sink} if per_sink else {}

    def _close(self, outs: list[Any]) -> None:
        for out in outs:
            try:
                out.close()
            except Exception:
                self.log.exception("publish: closing a %s sink failed", type(out).__name__)

    def teardown(self) -> None:
        self._close(getattr(self, "outs", []))
