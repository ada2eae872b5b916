"""Sinks to targets that can be away for a while: a bounded queue with retries and back-off (`BufferedSink`), a
delivery thread and an optional on-disk spool (`BrokerSink`), and the broker kinds built on them: `redis` and
`zmq`."""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import zmq
from graphflow.engines.publish.base import (
    WHAT,
    Output,
    at,
    check_folder,
    dump,
    reason,
    record_count,
    records,
    safe_name,
)
from graphflow.engines.publish.spool import MemoryQueue, Outbox, Spool

from graphflow import Engine, Message, Param, ParamError
from graphflow.runtime.backoff import backoff


class BufferedSink(Output):
    """Base of sinks whose target can be away for a while (a server, a disk): items wait in a bounded queue (the
    oldest dropped and counted as lost) and delivery is retried with capped exponential back-off.

    Subclasses implement `items` (what a message becomes) and `send` (deliver from the left of a deque, popping
    each delivered item; raise one of `errors` to stop and retry later).
    """

    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    batch = 500          # items taken from the queue per send
    min_delay = 0.0      # seconds between tries at least, whatever the back-off says

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, queue: Outbox | None = None,
                 where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.queue: Outbox = queue if queue is not None else MemoryQueue(owner.buffer)
        self.next_try = 0.0
        self.attempt = 0     # failed tries in a row
        self.failures = self.dropped = self.refused = 0
        self.refusals: set[str] = set()  # reasons of refusals already logged
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
            refused = self.refused
            try:
                self.send(pending)
            except self.errors as exc:
                done = len(batch) - len(pending)
                self.queue.done(batch[done - 1][0] if done else None)
                self.written += done - (self.refused - refused)
                self._failed(exc)
                return False
            self.queue.done(batch[-1][0])
            self.written += len(batch) - (self.refused - refused)
            delivered += len(batch)
        if self.down is not None:
            self.owner.log.info("%s works again; delivered %d items", self.name, delivered)
        self.down, self.attempt, self.next_try = None, 0, 0.0
        return True

    def refuse(self, why: str) -> None:
        """The target answered but refused an item for good (retrying would not help): it is counted as lost, and
        each reason is said once."""
        self.refused += 1
        self.lost += 1
        if why not in self.refusals and len(self.refusals) < 16:
            self.refusals.add(why)
            self.owner.log.error("%s refused an item: %s; items refused so are counted as lost", self.name, why)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.attempt += 1
        delay = max(backoff(self.attempt, self.owner.retry, self.owner.retry_max), self.min_delay)
        self.owner.log.log(logging.DEBUG if self.down else logging.WARNING, "%s failed (%s); %d items wait, retry "
                           "in %.2fs", self.name, reason(exc), len(self.queue), delay)
        self.down = reason(exc)
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
        self.owner.log.error("%s: %d items not delivered at shutdown (%s); counted as lost", self.name, left,
                             self.error or self.down or "stopped")

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
            check_folder(at(field, "spool"), spec["spool"])

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        queue: Outbox | None = None
        if spec["spool"]:
            folder = Path(spec["spool"])
            try:
                folder.mkdir(parents=True, exist_ok=True)
                queue = Spool(folder / f"{safe_name(owner.id)}.{index}.{self.kind}.db",
                              int(spec["spool_max_mb"] * 2**20))
            except OSError as exc:
                raise ParamError(at(f"sinks[{index}]" if where is None else where, "spool"),
                                 f"cannot open the spool in {str(folder)!r} ({exc})") from None
        super().__init__(spec, owner, index, queue, where)
        if isinstance(self.queue, Spool) and len(self.queue):
            owner.log.info("%s: %d items from an earlier run wait in %s", self.name,
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
            self.owner.log.warning("%s: %d items not delivered yet stay in %s for the next run", self.name,
                                   len(self.queue), self.queue.path)
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
            raise ParamError(at(field, "url"), f"must be a redis://, rediss:// or unix:// URL (got {spec['url']!r})")
        if not spec["stream"]:
            raise ParamError(at(field, "stream"), f"must be a non-empty string (got {spec['stream']!r})")

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        import redis  # here, not at the top: a process that hosts no Redis sink does not pay its import

        self.errors = (redis.RedisError,)
        super().__init__(spec, owner, index, where)
        self.client = redis.Redis.from_url(self.url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout)

    @property
    def target(self) -> str:
        return f"{self.url} {self.stream}"

    def items(self, msg: Message) -> list[dict[str, str]]:
        kind = "frame" if self.what == "frames" else "event"
        return [{"stream": msg.stream, "seq": str(msg.seq), "kind": kind, "id": r["id"], "json": dump(r)}
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
            raise ParamError(at(field, "address"), f"must be a tcp://, ipc:// or inproc:// address "
                                                 f"(got {spec['address']!r})")

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.encode = (lambda r: msgpack.packb(r, use_bin_type=True)) if self.format == "msgpack" else (
            lambda r: dump(r).encode())
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
