"""`publish`: send results out of the graph: JSON lines, ZeroMQ PUB, Redis streams, annotated MP4, MOTChallenge
result files and JPEG snapshots on events. Several sinks at once, each failing alone: a sink that breaks logs one
error line, stops, and counts what it could not write as `lost` in `metrics()`; the others go on."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import IO, Any, ClassVar

import msgpack
import numpy as np
import zmq
from graphflow.engines.sink import message_record
from PIL import Image

from graphflow import Detections, Engine, Message, Param, ParamError
from graphflow.graph.fields import check_keys
from graphflow.runtime.backoff import backoff
from graphflow.spool import MemoryQueue, Outbox, Spool
from graphflow.vision.mot import track_lines
from graphflow.vision.osd import Overlay, VideoWriter

WHAT = ("events", "frames")


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _reason(exc: BaseException) -> str:
    """An exception as one line for a user."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _safe(name: Any) -> str:
    """A string usable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


def stream_path(path: str, stream: str) -> str:
    """The file of `stream` for a per-stream sink: `{stream}` in `path` is replaced by the stream id; a path without
    it gets the id before its extension (`out.mp4` → `out.<stream>.mp4`), the same for every stream whatever the
    order they come in."""
    if "{stream}" in path:
        return path.replace("{stream}", _safe(stream))
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{_safe(stream)}{p.suffix}"))


def records(msg: Message, what: str) -> list[dict[str, Any]]:
    """What a sink writes for `msg`: each event (with its stream and frame), or the message's record."""
    if what == "frames":
        return [message_record(msg)]
    return [{"stream": msg.stream, "frame": msg.seq, **event} for event in msg.data.get("events", ())]


def record_count(msg: Message, what: str) -> int:
    """How many records `records(msg, what)` gives, without making them."""
    return 1 if what == "frames" else len(msg.data.get("events", ()))


def _check_dir(field: str, path: str) -> None:
    if not Path(path).resolve().parent.is_dir():
        raise ParamError(field, f"directory of {path!r} does not exist")


class Output:
    """Base of the sink kinds: keys declared as `Param`s on the class (checked by `check_spec`), and what every
    sink counts — items written, items lost, and the error that stopped it (one line, logged once)."""

    kind: ClassVar[str] = ""
    declared_params = classmethod(Engine.declared_params.__func__)  # every Param of the class and its bases

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        self.__dict__.update(spec)  # the checked keys, read as attributes through the class's Params
        self.owner, self.index = owner, index
        self.written = self.lost = 0
        self.error: str | None = None

    @classmethod
    def check_spec(cls, field: str, spec: dict[str, Any]) -> dict[str, Any]:
        """`spec` checked against the declared keys and completed with defaults; ParamError names the faulty key."""
        keys = {k: v for k, v in spec.items() if k != "kind"}
        full = {"kind": cls.kind, **check_keys(field, keys, cls.declared_params(), f"key for a {cls.kind} sink")}
        cls.check(field, full)
        return full

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        """Checks beyond one key's type and range (folders exist, URL forms); raise ParamError."""

    @property
    def target(self) -> str:
        """Where this sink writes, for messages."""
        return str(getattr(self, "path", ""))

    @property
    def name(self) -> str:
        """This sink in messages: `sink 1 (video out/v.mp4)`."""
        return f"sink {self.index} ({self.kind} {self.target})"

    def field(self, key: str) -> str:
        """The param path of one of this sink's keys, for errors."""
        return f"sinks[{self.index}].{key}"

    def start(self) -> None:
        """Start background work, once every sink is open."""

    def units(self, msg: Message) -> int:
        """How many items this sink writes for `msg` (what is counted as lost if it cannot)."""
        return 1

    def write(self, msg: Message) -> None:
        """Write one message; an exception stops this sink."""
        raise NotImplementedError

    def flush(self) -> None:
        """End of stream: hand out what is held back."""

    def end(self, stream: str) -> None:
        """`stream` ended: finish and forget what this sink keeps for it (its file, its overlay)."""

    def close(self) -> None:
        """Finish files and release handles."""

    def accept(self, msg: Message) -> None:
        """Write `msg`; after a failure, this sink only counts messages as lost (the other sinks go on)."""
        if self.error is None:
            try:
                self.write(msg)
                return
            except Exception as exc:
                self.fail(exc)
        self.lost += self.units(msg)

    def fail(self, exc: BaseException) -> None:
        """Stop this sink: one error line naming the engine, the sink and the reason."""
        self.error = _reason(exc)
        self.owner.log.error("publish %r: %s failed: %s; it writes nothing more and counts its messages as lost",
                             self.owner.id, self.name, self.error)

    def ended(self, stream: str) -> None:
        """`end`, with a failure stopping only this sink."""
        if self.error is None:
            try:
                self.end(stream)
            except Exception as exc:
                self.fail(exc)

    def settle(self) -> None:
        """`flush`, with a failure stopping only this sink."""
        if self.error is None:
            try:
                self.flush()
            except Exception as exc:
                self.fail(exc)

    def finish(self) -> None:
        """`close`, with a failure reported once (a sink that failed before is closed quietly)."""
        try:
            self.close()
        except Exception as exc:
            if self.error is None:
                self.fail(exc)

    def metrics(self) -> dict[str, Any]:
        return {"kind": self.kind, "written": self.written, "lost": self.lost, "error": self.error}


class JsonlSink(Output):
    """One JSON line per message (the `sink` engine's record) or per event, to a file or stdout. Each record is
    written whole; a write that fails (disk full) is cut back to the last whole line, so no line is ever torn."""

    kind = "jsonl"
    path = Param(str, doc="output file ('-' = stdout), one for all streams")
    what = Param(str, "frames", choices=WHAT, doc="'frames': one line per message; 'events': one line per event")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        if spec["path"] != "-":
            _check_dir(f"{field}.path", spec["path"])

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        super().__init__(spec, owner, index)
        self.fd: int | None = None
        self.size = 0  # bytes of whole lines in the file
        if self.path != "-":
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
            except OSError as exc:
                raise ParamError(self.field("path"), f"cannot open {self.path!r} ({exc.strerror})") from None

    def units(self, msg: Message) -> int:
        return record_count(msg, self.what)

    def write(self, msg: Message) -> None:
        lines = [_dump(r) + "\n" for r in records(msg, self.what)]
        if not lines:
            return
        if self.fd is None:
            sys.stdout.write("".join(lines))
        else:
            data = "".join(lines).encode()
            rest = memoryview(data)
            try:
                while rest:
                    rest = rest[os.write(self.fd, rest):]
            except OSError:
                os.ftruncate(self.fd, self.size)  # back to the last whole line
                raise
            self.size += len(data)
        self.written += len(lines)

    def close(self) -> None:
        if self.fd is None:
            sys.stdout.flush()
        else:
            os.close(self.fd)


class BufferedSink(Output):
    """Base of sinks whose target can be away for a while (a server, a disk): items wait in a bounded queue (the
    oldest dropped and counted as lost) and delivery is retried with capped exponential back-off.

    Subclasses implement `items` (what a message becomes) and `send` (deliver from the left of a deque, popping
    each delivered item; raise one of `errors` to stop and retry later).
    """

    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    batch = 500          # items taken from the queue per send
    min_delay = 0.0      # seconds between tries at least, whatever the back-off says

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int, queue: Outbox | None = None) -> None:
        super().__init__(spec, owner, index)
        self.queue: Outbox = queue if queue is not None else MemoryQueue(owner.buffer)
        self.next_try = 0.0
        self.attempt = 0     # failed tries in a row
        self.failures = self.dropped = 0
        self.down: str | None = None  # why the last try failed, while the target is away

    def items(self, msg: Message) -> list[Any]:
        raise NotImplementedError

    def send(self, pending: deque[Any]) -> None:
        raise NotImplementedError

    def units(self, msg: Message) -> int:
        return len(self.items(msg))

    def enqueue(self, items: list[Any]) -> None:
        dropped = self.queue.put(items)
        self.dropped += dropped
        self.lost += dropped

    def write(self, msg: Message) -> None:
        self.enqueue(self.items(msg))
        if len(self.queue) and time.monotonic() >= self.next_try:
            self.deliver()

    def deliver(self) -> bool:
        """Send every waiting item; on a failure keep the rest and schedule the next try."""
        delivered = 0
        while batch := self.queue.take(self.batch):
            pending = deque(item for _, item in batch)
            try:
                self.send(pending)
            except self.errors as exc:
                done = len(batch) - len(pending)
                self.queue.done(batch[done - 1][0] if done else None)
                self.written += done
                self._failed(exc)
                return False
            self.queue.done(batch[-1][0])
            self.written += len(batch)
            delivered += len(batch)
        if self.down is not None:
            self.owner.log.info("publish %r: %s works again; delivered %d items", self.owner.id, self.name, delivered)
        self.down, self.attempt, self.next_try = None, 0, 0.0
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.attempt += 1
        delay = max(backoff(self.attempt, self.owner.retry, self.owner.retry_max), self.min_delay)
        self.owner.log.log(logging.DEBUG if self.down else logging.WARNING, "publish %r: %s failed (%s); %d items "
                           "wait, retry in %.2fs", self.owner.id, self.name, _reason(exc), len(self.queue), delay)
        self.down = _reason(exc)
        self.next_try = time.monotonic() + delay

    def flush(self) -> None:
        self.deliver()

    def close(self) -> None:
        try:
            if len(self.queue) and not self.deliver():
                self.left_over()
        finally:
            self.queue.close()
            self.release()

    def left_over(self) -> None:
        """What is still waiting at shutdown is lost: counted and said once."""
        left = len(self.queue)
        self.lost += left
        self.owner.log.error("publish %r: %s: %d items not delivered at shutdown (%s); counted as lost",
                             self.owner.id, self.name, left, self.error or self.down or "stopped")

    def release(self) -> None:
        """Close the connection or file handles."""

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "error": self.error or self.down, "failures": self.failures,
                "dropped": self.dropped, "pending": len(self.queue)}


class BrokerSink(BufferedSink):
    """A buffered sink to a broker, delivered by a background thread so `process()` never waits on the broker.
    With `spool`, items go to an on-disk queue before publish returns and leave it once the broker took them: an
    outage, a crash or a restart loses none (at-least-once; each item carries an `id` to de-duplicate on)."""

    what = Param(str, "events", choices=WHAT, doc="'events': one item per event; 'frames': one per message")
    spool = Param(str, "", doc="folder of an on-disk queue kept across restarts ('' = in memory, `buffer` items)")
    spool_max_mb = Param(float, 64.0, ge=0.001, doc="size bound of the spool; the oldest items are dropped, counted")
    timeout: float = 2.0  # seconds one try may block on the broker
    min_delay = 0.05
    poll = 0.05           # seconds between looks at the broker while idle

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        if spec["spool"]:
            _check_dir(f"{field}.spool", spec["spool"])

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        queue: Outbox | None = None
        if spec["spool"]:
            folder = Path(spec["spool"])
            try:
                folder.mkdir(exist_ok=True)
                queue = Spool(folder / f"{_safe(owner.id)}.{index}.{self.kind}.db", int(spec["spool_max_mb"] * 2**20))
            except OSError as exc:
                raise ParamError(f"sinks[{index}].spool", f"cannot open the spool in {str(folder)!r} ({exc})") from None
        super().__init__(spec, owner, index, queue)
        if isinstance(self.queue, Spool) and len(self.queue):
            owner.log.info("publish %r: %s: %d items from an earlier run wait in %s", owner.id, self.name,
                           len(self.queue), self.queue.path)
        self.cond = threading.Condition()
        self.closing = self.urgent = self.busy = False
        self.tries = 0
        self.thread = threading.Thread(target=self._run, name=f"{owner.id}-sink{index}", daemon=True)

    def identified(self, msg: Message) -> list[dict[str, Any]]:
        """The records of `msg`, each with a unique `id` that consumers de-duplicate redeliveries on."""
        return [{"id": uuid.uuid4().hex, **r} for r in records(msg, self.what)]

    def units(self, msg: Message) -> int:
        return record_count(msg, self.what)

    def start(self) -> None:
        self.thread.start()

    def write(self, msg: Message) -> None:
        self.enqueue(self.items(msg))
        with self.cond:
            self.cond.notify()

    def idle(self) -> None:
        """Called by the delivery thread between tries."""

    def _due(self) -> bool:
        return bool(len(self.queue)) and (self.urgent or not self.closing and time.monotonic() >= self.next_try)

    def _run(self) -> None:
        try:
            self._deliveries()
        except Exception as exc:  # a bug or an unexpected error: this sink stops, the graph goes on
            self.fail(exc)
        finally:
            with self.cond:
                self.cond.notify_all()

    def _deliveries(self) -> None:
        while True:
            self.idle()
            with self.cond:
                if not self._due():
                    if self.closing:
                        return
                    self.cond.wait(self.poll)
                    continue
                self.urgent, self.busy = False, True
            ok = self.deliver()
            with self.cond:
                self.tries += 1
                self.busy = False
                self.cond.notify_all()
                if self.closing and not ok:
                    return

    def _wait_limit(self) -> float:
        return 2 * self.timeout + 1.0

    def flush(self) -> None:
        """Try now, back-off or not, and wait for that try (bounded by the broker's timeout)."""
        with self.cond:
            if not len(self.queue):
                return
            target = self.tries + 1 + self.busy
            self.urgent = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: not len(self.queue) or self.tries >= target or not self.thread.is_alive(),
                               self._wait_limit())

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.urgent = self.down is None  # one last try, unless the last one failed
            self.cond.notify_all()
        if self.thread.ident is not None:  # started
            self.thread.join(self._wait_limit())
        hung = self.thread.is_alive()
        if hung:
            self.down = f"no answer within {self._wait_limit():.1f}s"
        if len(self.queue) and isinstance(self.queue, Spool):
            self.owner.log.warning("publish %r: %s: %d items not delivered yet stay in %s for the next run",
                                   self.owner.id, self.name, len(self.queue), self.queue.path)
        elif len(self.queue):
            self.left_over()
        if not hung:  # a thread still blocked on the broker keeps its connection; it is a daemon
            self.queue.close()
            self.release()

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "spooled": len(self.queue)} if self.spool else super().metrics()


class RedisSink(BrokerSink):
    """XADDs one entry per event (or per frame) to a Redis stream: flat fields stream, seq, kind and id, plus the
    whole item as JSON in `json`; reconnects after failures."""

    kind = "redis"
    url = Param(str, "redis://127.0.0.1:6379/0", doc="redis://, rediss:// or unix:// URL of the server")
    stream = Param(str, "graphflow:events", doc="Redis stream key")
    maxlen = Param(int, 10000, ge=0, doc="approximate cap on the stream's length (0 = none)")
    timeout = Param(float, 2.0, ge=0.01, doc="seconds a try may wait on the server before it counts as down")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        super().check(field, spec)
        if not re.match(r"^(redis|rediss|unix)://", spec["url"]):
            raise ParamError(f"{field}.url", f"must be a redis://, rediss:// or unix:// URL (got {spec['url']!r})")
        if not spec["stream"]:
            raise ParamError(f"{field}.stream", f"must be a non-empty string (got {spec['stream']!r})")

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        import redis  # here, not at the top: a process that hosts no Redis sink does not pay its import

        self.errors = (redis.RedisError,)
        super().__init__(spec, owner, index)
        self.client = redis.Redis.from_url(self.url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout)

    @property
    def target(self) -> str:
        return f"{self.url} {self.stream}"

    def items(self, msg: Message) -> list[dict[str, str]]:
        kind = "frame" if self.what == "frames" else "event"
        return [{"stream": msg.stream, "seq": str(msg.seq), "kind": kind, "id": r["id"], "json": _dump(r)}
                for r in self.identified(msg)]

    def send(self, pending: deque[dict[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for entry in pending:
            pipe.xadd(self.stream, entry, maxlen=self.maxlen or None, approximate=True)
        pipe.execute()
        pending.clear()

    def release(self) -> None:
        self.client.close()


class ZmqSink(BrokerSink):
    """Publishes each event (or frame record) on a ZeroMQ PUB socket as [topic = stream id, msgpack/JSON body].

    An XPUB socket with XPUB_NODROP: a subscriber too slow to keep up makes sends fail (buffered and retried)
    instead of losing messages silently; messages no one subscribed to are counted as `unheard`.
    """

    kind = "zmq"
    errors = (zmq.Again,)
    address = Param(str, "tcp://127.0.0.1:5556", doc="address to bind: tcp://, ipc:// or inproc://")
    format = Param(str, "msgpack", choices=("msgpack", "json"), doc="encoding of each body")
    hwm = Param(int, 1000, ge=1, doc="messages queued per subscriber before sends fail (then buffered)")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        super().check(field, spec)
        if not re.match(r"^(tcp|ipc|inproc)://.+", spec["address"]):
            raise ParamError(f"{field}.address", f"must be a tcp://, ipc:// or inproc:// address "
                                                 f"(got {spec['address']!r})")

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        super().__init__(spec, owner, index)
        self.encode = (lambda r: msgpack.packb(r, use_bin_type=True)) if self.format == "msgpack" else (
            lambda r: _dump(r).encode())
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)  # used by the delivery thread only, once started
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.SNDHWM, self.hwm)
        self.socket.setsockopt(zmq.LINGER, 1000)
        try:
            self.socket.bind(self.address)
        except zmq.ZMQError as exc:
            self.socket.close(0)
            self.context.term()
            self.queue.close()
            raise ParamError(self.field("address"), f"cannot bind {self.address} ({exc})") from None
        self.topics: frozenset[bytes] = frozenset()
        self.unheard = 0

    @property
    def target(self) -> str:
        return self.address

    def idle(self) -> None:
        """Read the pending subscribe/unsubscribe notices."""
        topics = set(self.topics)
        while self.socket.poll(0):
            notice = self.socket.recv()
            if notice[:1] == b"\x01":
                topics.add(notice[1:])
            elif notice[:1] == b"\x00":
                topics.discard(notice[1:])
        self.topics = frozenset(topics)

    def subscriptions(self) -> set[bytes]:
        """Topic prefixes subscribed to, as last seen by the delivery thread."""
        return set(self.topics)

    def items(self, msg: Message) -> list[tuple[bytes, bytes]]:
        topic = msg.stream.encode()
        return [(topic, self.encode(r)) for r in self.identified(msg)]

    def send(self, pending: deque[tuple[bytes, bytes]]) -> None:
        self.idle()
        while pending:
            topic, body = pending[0]
            self.socket.send_multipart([topic, body], zmq.NOBLOCK)
            pending.popleft()
            if not any(topic.startswith(t) for t in self.topics):
                self.unheard += 1

    def release(self) -> None:
        self.socket.close()
        self.context.term()

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "unheard": self.unheard}


class SnapshotSink(BufferedSink):
    """A JPEG per event: a crop around the event's track box, the full frame, or the annotated frame, named
    `<stream>_<rule>_t<track>_f<frame>_<event>.jpg` in the folder `path`; at most `max_count` are taken. Messages
    without an image are skipped."""

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
        _check_dir(f"{field}.path", spec["path"])
        if not all(isinstance(e, str) for e in spec["events"]):
            raise ParamError(f"{field}.events", f"must be a list of event names, [] = all (got {spec['events']!r})")

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        super().__init__(spec, owner, index, MemoryQueue(spec["buffer"]))
        self.dir = Path(self.path)
        try:
            self.dir.mkdir(exist_ok=True)
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
                    self.owner.log.warning("publish %r: %s: max_count %d reached; later events are counted, not saved",
                                           self.owner.id, self.name, self.max_count)
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

    def end(self, stream: str) -> None:
        self.overlays.pop(stream, None)

    def send(self, pending: deque[tuple[Path, bytes]]) -> None:
        while pending:
            path, jpeg = pending[0]
            path.write_bytes(jpeg)
            pending.popleft()

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "taken": self.taken, "skipped": self.skipped}


class VideoSink(Output):
    """Annotated MP4 per stream: boxes and trails of data['tracks'] (else data['detections']), the rule engine's
    zones and lines with counts (data['rules']) and flashes of data['events'], drawn on arrays['image']. Messages
    without an image are skipped. The files are fragmented MP4: a crash leaves them playable."""

    kind = "video"
    path = Param(str, doc="output .mp4 per stream: `{stream}` is replaced by the stream id, else name.<stream>.mp4")
    fps = Param(float, 10.0, doc="frame rate of the file (> 0)")
    trail = Param(int, 30, ge=0, doc="track trail length in frames (0 = none)")
    flash = Param(int, 10, ge=1, doc="frames an event stays highlighted")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        _check_dir(f"{field}.path", spec["path"])
        if spec["fps"] <= 0:
            raise ParamError(f"{field}.fps", f"must be a number > 0 (got {spec['fps']!r})")

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        super().__init__(spec, owner, index)
        self.writers: dict[str, VideoWriter] = {}
        self.overlays: dict[str, Overlay] = {}

    def units(self, msg: Message) -> int:
        return int(msg.image is not None)

    def write(self, msg: Message) -> None:
        image = msg.image
        if image is None:
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
            path = stream_path(self.path, msg.stream)
            writer.open(path, self.fps, (frame.shape[1], frame.shape[0]), fragmented=True)
            self.owner.log.info("publish %r: %s: stream %s -> %s", self.owner.id, self.name, msg.stream, path)
            self.writers[msg.stream] = writer
        writer.write(frame)
        self.written += 1

    def end(self, stream: str) -> None:
        self.overlays.pop(stream, None)
        writer = self.writers.pop(stream, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        errors = []
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception as exc:  # finish the other streams' files first
                errors.append(exc)
        if errors:
            raise errors[0]


class MotSink(Output):
    """MOTChallenge results per stream from data['tracks']: `frame,id,x,y,w,h,conf,-1,-1,-1` with frame = seq + 1.
    Messages that are not frames (no image, detections or tracks) are skipped."""

    kind = "mot"
    path = Param(str, doc="result file per stream: `{stream}` is replaced by the stream id, else name.<stream>.txt")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        _check_dir(f"{field}.path", spec["path"])

    def __init__(self, spec: dict[str, Any], owner: Publish, index: int) -> None:
        super().__init__(spec, owner, index)
        self.files: dict[str, IO[str]] = {}

    def units(self, msg: Message) -> int:
        return int("tracks" in msg.data)

    def end(self, stream: str) -> None:
        file = self.files.pop(stream, None)
        if file is not None:
            file.close()

    def write(self, msg: Message) -> None:
        tracks = msg.data.get("tracks")
        if tracks is None:
            if msg.image is None and "detections" not in msg.data:
                return  # not a frame: a total, a user's event
            raise ValueError(f"message {msg.stream}#{msg.seq} has no data['tracks'] (put track before publish)")
        file = self.files.get(msg.stream)
        if file is None:
            file = self.files[msg.stream] = open(stream_path(self.path, msg.stream), "w")
        if tracks:
            file.write(track_lines(msg.seq + 1, Detections.of(tracks, "data['tracks']")))
        self.written += 1

    def flush(self) -> None:
        for file in self.files.values():
            file.flush()

    def close(self) -> None:
        for file in self.files.values():
            file.close()


SINKS: dict[str, type[Output]] = {cls.kind: cls for cls in (JsonlSink, ZmqSink, RedisSink, VideoSink, MotSink,
                                                            SnapshotSink)}


def sink_kinds() -> dict[str, dict[str, Param]]:
    """Each sink kind with its declared keys (for `graphflow engines` and docs)."""
    return {kind: cls.declared_params() for kind, cls in SINKS.items()}


def check_sink(field: str, spec: Any) -> dict[str, Any]:
    """One `sinks[i]` entry validated and completed with defaults; ParamError names the faulty key."""
    if not isinstance(spec, dict):
        raise ParamError(field, f"must be an object with a 'kind' (got {spec!r})")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in SINKS:
        raise ParamError(f"{field}.kind", f"must be one of {', '.join(SINKS)} (got {kind!r})")
    return SINKS[kind].check_spec(field, spec)


class Publish(Engine):
    """Writes every message to each configured sink: JSON lines, ZeroMQ, Redis, annotated MP4, MOT results, JPEGs.
    A sink that fails stops alone with one error line; what it could not write is counted in `metrics()['lost']`."""

    inputs = ("in",)
    outputs = ()
    path_fields = {"sinks[].path": "write", "sinks[].spool": "state"}  # relative to the graph file
    bind_fields = ("sinks[].address",)
    connect_fields = ("sinks[].url",)  # the brokers sinks send to
    sinks = Param(list, doc='list of {"kind": "jsonl"|"zmq"|"redis"|"video"|"mot"|"snapshot", key: value...}; '
                            'the keys of each kind are listed under its sink kinds')
    buffer = Param(int, 1000, ge=1, doc="redis/zmq items kept in memory while a sink fails (oldest dropped, counted)")
    retry = Param(float, 0.5, ge=0, doc="first retry delay in seconds after a sink failure, doubled per failure")
    retry_max = Param(float, 30.0, ge=0, doc="cap on the retry delay in seconds")

    def check(self) -> None:
        if not self.sinks:
            raise ParamError("sinks", "needs at least one sink")
        self.specs = [check_sink(f"sinks[{i}]", spec) for i, spec in enumerate(self.sinks)]

    def setup(self) -> None:
        self.outs: list[Output] = []
        try:
            for i, spec in enumerate(self.specs):
                self.outs.append(SINKS[spec["kind"]](spec, self, i))
        except Exception:
            self._close(self.outs)  # the sinks already open (an open zmq socket would block interpreter exit)
            self.outs = []
            raise
        for out in self.outs:
            out.start()

    def _buffered(self) -> list[BufferedSink]:
        return [out for out in self.outs if isinstance(out, BufferedSink)]

    @property
    def failures(self) -> int:
        """Failed deliveries over all sinks (each retried later)."""
        return sum(out.failures for out in self._buffered())

    @property
    def dropped(self) -> int:
        """Items lost because a failing sink's queue was full."""
        return sum(out.dropped for out in self._buffered())

    @property
    def lost(self) -> int:
        """Items the sinks did not write: dropped, undelivered at shutdown, or refused by a failed sink."""
        return sum(out.lost for out in self.outs)

    def process(self, msg: Message) -> None:
        for out in self.outs:
            out.accept(msg)

    def flush(self) -> None:
        for out in self.outs:
            out.settle()

    def on_stream_end(self, stream: str) -> None:
        """A stream ended: its video and MOT files are finished now, not at the end of the run."""
        for out in self.outs:
            out.ended(stream)

    def metrics(self) -> dict[str, Any]:
        held = set().union(*(getattr(out, "writers", {}).keys() | getattr(out, "files", {}).keys()
                             | getattr(out, "overlays", {}).keys() for out in self.outs))
        return {"lost": self.lost, "failures": self.failures, "dropped": self.dropped, "streams_held": len(held),
                "sinks": {f"{out.index}:{out.kind}": out.metrics() for out in self.outs}}

    def _close(self, outs: list[Output]) -> None:
        for out in outs:
            out.finish()

    def teardown(self) -> None:
        self._close(self.outs)
