"""`publish`: send results out of the graph: JSON lines, Redis streams, annotated MP4 files (several at once)."""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import redis

from graphflow import Engine, Message, Param, ParamError
from graphflow.vision.osd import VideoWriter, draw

from .sink import message_record

# Accepted keys and defaults of each sink kind ("path" of jsonl/video is required).
SINK_KEYS: dict[str, dict[str, Any]] = {
    "jsonl": {"path": None},
    "redis": {"url": "redis://127.0.0.1:6379/0", "stream": "graphflow:events", "what": "events", "maxlen": 10000},
    "video": {"path": None, "fps": 10},
}


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _check_dir(field: str, path: str) -> None:
    if not Path(path).resolve().parent.is_dir():
        raise ParamError(field, f"directory of {path!r} does not exist")


def check_sink(field: str, spec: Any) -> dict[str, Any]:
    """One `sinks[i]` entry validated and completed with defaults; ParamError names the faulty key."""
    if not isinstance(spec, dict):
        raise ParamError(field, f"must be an object with a 'kind' (got {spec!r})")
    kind = spec.get("kind")
    if kind not in SINK_KEYS:
        raise ParamError(f"{field}.kind", f"must be one of {', '.join(SINK_KEYS)} (got {kind!r})")
    known = SINK_KEYS[kind]
    for key in spec:
        if key != "kind" and key not in known:
            raise ParamError(f"{field}.{key}", f"unknown key for a {kind} sink (known: {', '.join(known)})")
    full = {**known, **spec}
    for key, value in full.items():
        if value is None:
            raise ParamError(f"{field}.{key}", f"required for a {kind} sink")
    if "path" in full:
        if not isinstance(full["path"], str) or not full["path"]:
            raise ParamError(f"{field}.path", f"must be a non-empty string (got {full['path']!r})")
        if full["path"] != "-" or kind == "video":
            _check_dir(f"{field}.path", full["path"])
    if kind == "redis":
        if not isinstance(full["url"], str) or not re.match(r"^(redis|rediss|unix)://", full["url"]):
            raise ParamError(f"{field}.url", f"must be a redis://, rediss:// or unix:// URL (got {full['url']!r})")
        if not isinstance(full["stream"], str) or not full["stream"]:
            raise ParamError(f"{field}.stream", f"must be a non-empty string (got {full['stream']!r})")
        if full["what"] not in ("events", "frames"):
            raise ParamError(f"{field}.what", f"must be one of events, frames (got {full['what']!r})")
        if type(full["maxlen"]) is not int or full["maxlen"] < 0:
            raise ParamError(f"{field}.maxlen", f"must be an integer ≥ 0, 0 = no trimming (got {full['maxlen']!r})")
    if kind == "video" and (isinstance(full["fps"], bool) or not isinstance(full["fps"], (int, float))
                            or full["fps"] <= 0):
        raise ParamError(f"{field}.fps", f"must be a number > 0 (got {full['fps']!r})")
    return full


class JsonlSink:
    """One JSON line per message (the `sink` engine's record) to a file or stdout."""

    def __init__(self, spec: dict[str, Any]) -> None:
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


class RedisSink:
    """XADDs one entry per event (or per frame) to a Redis stream; while Redis is unreachable, entries wait
    in a bounded buffer (oldest dropped) and delivery is retried with capped exponential back-off."""

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        self.owner = owner
        self.stream, self.what, self.maxlen = spec["stream"], spec["what"], spec["maxlen"] or None
        self.url = spec["url"]
        self.client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self.pending: deque[dict[str, str]] = deque()
        self.delay = owner.retry
        self.next_try = 0.0
        self.down = False

    def entries(self, msg: Message) -> list[dict[str, str]]:
        """Stream entries for `msg`: flat str fields (stream, seq, kind) plus the whole item as JSON."""
        head = {"stream": msg.stream, "seq": str(msg.seq)}
        if self.what == "frames":
            return [{**head, "kind": "frame", "json": _dump(message_record(msg))}]
        return [{**head, "kind": "event", "json": _dump({"stream": msg.stream, "frame": msg.seq, **event})}
                for event in msg.data.get("events", ())]

    def write(self, msg: Message) -> None:
        for entry in self.entries(msg):
            if len(self.pending) >= self.owner.buffer:
                self.pending.popleft()
                self.owner.dropped += 1
            self.pending.append(entry)
        if self.pending and time.monotonic() >= self.next_try:
            self.deliver()

    def deliver(self) -> bool:
        """Send every pending entry in one pipeline; on failure keep them and schedule the next try."""
        if not self.pending:
            return True
        try:
            pipe = self.client.pipeline(transaction=False)
            for entry in self.pending:
                pipe.xadd(self.stream, entry, maxlen=self.maxlen, approximate=True)
            pipe.execute()
        except redis.RedisError as exc:
            self.owner.failures += 1
            self.owner.log.log(logging.DEBUG if self.down else logging.WARNING, "redis %s unreachable (%s); %d entries buffered, "
                               "retry in %.2fs", self.url, exc, len(self.pending), self.delay)
            self.down = True
            self.next_try = time.monotonic() + self.delay
            self.delay = min(self.delay * 2, self.owner.retry_max)
            return False
        if self.down:
            self.owner.log.info("redis %s reachable again; delivered %d entries", self.url, len(self.pending))
        self.pending.clear()
        self.down, self.delay, self.next_try = False, self.owner.retry, 0.0
        return True

    def flush(self) -> None:
        self.deliver()

    def close(self) -> None:
        if not self.deliver():
            self.owner.log.warning("redis %s: %d entries not delivered at shutdown", self.url, len(self.pending))
        self.client.close()


class VideoSink:
    """Annotated MP4 per stream: boxes of data['tracks'] (else data['detections']) drawn on arrays['image']."""

    def __init__(self, spec: dict[str, Any], owner: Publish) -> None:
        self.owner = owner
        self.path, self.fps = spec["path"], float(spec["fps"])
        self.writers: dict[str, VideoWriter] = {}

    def path_for(self, stream: str) -> str:
        """`path` with `{stream}` filled in; without the placeholder the first stream gets `path` itself
        and later ones `name.<stream>.mp4`, so streams never share a file."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", stream)
        if "{stream}" in self.path:
            return self.path.replace("{stream}", safe)
        if not self.writers:
            return self.path
        p = Path(self.path)
        return str(p.with_name(f"{p.stem}.{safe}{p.suffix or '.mp4'}"))

    def write(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        if image is None:
            self.owner.log.debug("video sink: message %s/%d has no image; skipped", msg.stream, msg.seq)
            return
        color = msg.data.get("color", "bgr")
        objects = msg.data.get("tracks", msg.data.get("detections", ()))
        frame = draw(image, objects, color=color)
        if color == "rgb":
            frame = frame[..., ::-1]
        frame = frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]
        writer = self.writers.get(msg.stream)
        if writer is None:
            writer = VideoWriter()
            path = self.path_for(msg.stream)
            writer.open(path, self.fps, (frame.shape[1], frame.shape[0]))
            self.owner.log.info("video sink: stream %s -> %s", msg.stream, path)
            self.writers[msg.stream] = writer
        writer.write(frame)

    def flush(self) -> None:
        """Nothing to do: files are finished in close()."""

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class Publish(Engine):
    """Writes every message to each configured sink: JSON lines, a Redis stream, annotated MP4 files."""

    inputs = ("in",)
    outputs = ()
    sinks = Param(list, doc='list of {"kind": "jsonl"|"redis"|"video", ...}; see SINK_KEYS for keys and defaults')
    buffer = Param(int, 1000, ge=1, doc="redis entries kept while the server is unreachable (oldest dropped)")
    retry = Param(float, 0.5, ge=0, doc="first redis reconnect delay in seconds, doubled per failure")
    retry_max = Param(float, 30.0, ge=0, doc="cap on the redis reconnect delay in seconds")

    def check(self) -> None:
        if not self.sinks:
            raise ParamError("sinks", "needs at least one sink")
        self.specs = [check_sink(f"sinks[{i}]", spec) for i, spec in enumerate(self.sinks)]

    def setup(self) -> None:
        self.failures = 0
        self.dropped = 0
        self.outs: list[JsonlSink | RedisSink | VideoSink] = []
        for spec in self.specs:
            if spec["kind"] == "jsonl":
                self.outs.append(JsonlSink(spec))
            elif spec["kind"] == "redis":
                self.outs.append(RedisSink(spec, self))
            else:
                self.outs.append(VideoSink(spec, self))

    def process(self, msg: Message) -> None:
        for out in self.outs:
            out.write(msg)

    def flush(self) -> None:
        for out in self.outs:
            out.flush()

    def teardown(self) -> None:
        for out in getattr(self, "outs", ()):
            try:
                out.close()
            except Exception:
                self.log.exception("publish: closing a %s sink failed", type(out).__name__)
        if getattr(self, "dropped", 0):
            self.log.warning("publish: %d redis entries dropped (buffer of %d full)", self.dropped, self.buffer)
