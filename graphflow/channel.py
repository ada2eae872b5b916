"""Bounded edges between engines: in-process handoff of objects, ZeroMQ ipc:// between processes."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import msgpack
import numpy as np
import zmq

from .message import EOS, EndOfStream, Message


class Closed(Exception):
    """The channel was shut down while waiting."""


class Inbox:
    """An engine's input side: one bounded deque per incoming connection, taken round-robin.

    `block` makes producers wait while full (lossless); `drop_oldest`/`latest` drop the oldest queued
    message and count it, so latency stays bounded on live sources."""

    def __init__(self, specs: list[tuple[str, str, int]]) -> None:
        self.ports = [port for port, _, _ in specs]
        self.policies = [policy for _, policy, _ in specs]
        self.capacity = [cap for _, _, cap in specs]
        self.queues: list[deque] = [deque() for _ in specs]
        self.dropped = [0] * len(specs)
        self.cond = threading.Condition()
        self.closed = False
        self._next = 0

    def room(self, i: int) -> bool:
        return self.policies[i] != "block" or len(self.queues[i]) < self.capacity[i]

    def put(self, i: int, item: Message | EndOfStream, stop: threading.Event | None = None) -> None:
        """Queue `item` on connection i, waiting (block) or dropping the oldest (drop policies)."""
        with self.cond:
            q = self.queues[i]
            if self.policies[i] == "block" and item is not EOS:
                while len(q) >= self.capacity[i] and not self.closed:
                    if stop is not None and stop.is_set():
                        raise Closed
                    self.cond.wait(0.1)
            elif item is not EOS:
                while len(q) >= self.capacity[i] and q[0] is not EOS:
                    q.popleft()
                    self.dropped[i] += 1
            if self.closed:
                raise Closed
            q.append(item)
            self.cond.notify_all()

    def get(self, timeout: float | None = None) -> tuple[int, Message | EndOfStream] | None:
        """Next (connection, item) in round-robin order, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                n = len(self.queues)
                for k in range(n):
                    i = (self._next + k) % n
                    if self.queues[i]:
                        self._next = (i + 1) % n
                        item = self.queues[i].popleft()
                        self.cond.notify_all()
                        return i, item
                if self.closed:
                    raise Closed
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cond.wait(left)

    def depth(self) -> int:
        return sum(len(q) for q in self.queues)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _freeze(msg: Message) -> None:
    for arr in msg.arrays.values():
        arr.flags.writeable = False


class LocalLink:
    """Same-process edge: the Message object itself is handed over (no serialisation, no copy)."""

    def __init__(self, inbox: Inbox, index: int, isolate: bool) -> None:
        self.inbox, self.index, self.isolate = inbox, index, isolate

    def send(self, msg: Message | EndOfStream, stop: threading.Event) -> None:
        if isinstance(msg, Message):
            _freeze(msg)
            if self.isolate:  # fan-out: each consumer gets its own metadata, as across processes
                msg = Message(msg.stream, msg.seq, msg.pts, msgpack.unpackb(msgpack.packb(msg.data)),
                              dict(msg.arrays), dict(msg.times))
        self.inbox.put(self.index, msg, stop)

    def close(self) -> None:
        pass


def encode(msg: Message | EndOfStream) -> list[Any]:
    """Message → ZeroMQ multipart frames: msgpack header, then one raw buffer per array."""
    if msg is EOS:
        return [msgpack.packb({"eos": True})]
    names = list(msg.arrays)
    arrays = [np.ascontiguousarray(msg.arrays[k]) for k in names]
    head = {"s": msg.stream, "q": msg.seq, "p": msg.pts, "d": msg.data, "t": msg.times,
            "a": [[k, a.dtype.str, list(a.shape)] for k, a in zip(names, arrays)]}
    return [msgpack.packb(head)] + [memoryview(a).cast("B") if a.size else b"" for a in arrays]


def decode(frames: list[Any]) -> Message | EndOfStream:
    """Inverse of `encode`; arrays view the received ZeroMQ buffers (read-only, no copy)."""
    head = msgpack.unpackb(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if head.get("eos"):
        return EOS
    arrays = {}
    for (name, dtype, shape), frame in zip(head["a"], frames[1:]):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        arrays[name] = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
    return Message(head["s"], head["q"], head["p"], head["d"], arrays, head["t"])


class ZmqLink:
    """Cross-process edge, producer side: a PUSH socket connected to the consumer's ipc:// endpoint."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 4)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def send(self, msg: Message | EndOfStream, stop: threading.Event) -> None:
        frames = encode(msg)
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if stop.is_set() and msg is not EOS:
                    raise Closed from None
                self.sock.poll(100, zmq.POLLOUT)

    def close(self) -> None:
        self.sock.close()


class ZmqPump:
    """Cross-process edges, consumer side: one thread moves received messages into the Inbox,
    reading a `block` connection only while its queue has room so back-pressure reaches the producer."""

    def __init__(self, ctx: zmq.Context, inbox: Inbox, endpoints: dict[int, str]) -> None:
        self.inbox = inbox
        self.socks: dict[int, zmq.Socket] = {}
        for i, ep in endpoints.items():
            s = ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVHWM, 4)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(ep)
            self.socks[i] = s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pump", daemon=True)

    def start(self) -> None:
        if self.socks:
            self.thread.start()

    def _run(self) -> None:
        open_ = set(self.socks)
        poller = zmq.Poller()
        polled: set[int] = set()
        while open_ and not self.stop.is_set():
            with self.inbox.cond:
                ready = {i for i in open_ if self.inbox.room(i)}
            for i in polled - ready:
                poller.unregister(self.socks[i])
            for i in ready - polled:
                poller.register(self.socks[i], zmq.POLLIN)
            polled = ready
            if not ready:
                time.sleep(0.001)
                continue
            events = dict(poller.poll(50))
            for i in list(ready):
                if self.socks[i] in events:
                    item = decode(self.socks[i].recv_multipart(copy=False))
                    try:
                        self.inbox.put(i, item, self.stop)
                    except Closed:
                        return
                    if item is EOS:
                        open_.discard(i)

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(2)
        for s in self.socks.values():
            s.close()
