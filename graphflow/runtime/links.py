"""Bounded edges between engines: in-process handoff of objects, ZeroMQ ipc:// between processes."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import msgpack
import numpy as np
import zmq

from graphflow.message import EOS, EndOfStream, Message, StreamEnd, pack, unpack
from graphflow.runtime.queues import FairQueue
from graphflow.runtime.shm import ShmContext, ShmError

log = logging.getLogger(__name__)
BURST = 64  # messages a pump takes from one socket before it looks at the others


class Stopped(Exception):
    """The graph is shutting down: nothing downstream takes messages any more. `Engine.send` raises it; an engine
    that sends from its own threads catches it and stops them (public as `graphflow.Stopped`)."""


class Closed(Stopped):
    """The channel was shut down while waiting."""


class StreamQueue:
    """One drop-policy connection's queue: its messages in a FairQueue (a FIFO per stream, served in rounds, so a
    stream that sends more cannot crowd the others out), `capacity` in all; end-of-stream comes out after every
    message.

    Full, it drops the oldest message of the stream that has the most queued (ties: the one waiting longest).
    `latest` also keeps only each stream's newest message. A stream's end marker (StreamEnd) is never dropped and
    keeps its place after that stream's messages."""

    def __init__(self, policy: str, capacity: int) -> None:
        self.fair = FairQueue(policy, capacity=capacity)
        self.eos = False
        self._arrived = 0  # arrival number of the next message: its stamp in the fair queue

    def __len__(self) -> int:
        return len(self.fair) + self.eos

    def append(self, item: Message | StreamEnd | EndOfStream) -> dict[str, int]:
        """Queue `item`; returns the messages dropped to make room, per stream."""
        if item is EOS:
            self.eos = True
            return {}
        self._arrived += 1
        return self.fair.append(item.stream, item, self._arrived, keep=isinstance(item, StreamEnd))

    def popleft(self) -> Message | StreamEnd | EndOfStream:
        if not self.fair:
            self.eos = False
            return EOS
        return self.fair.popleft()


class Inbox:
    """An engine's input side: one bounded queue per incoming connection, taken round-robin.

    `block` makes producers wait while full (lossless, a plain FIFO); `drop_oldest`/`latest` never make them
    wait: they drop per stream and count it (StreamQueue), so latency stays bounded and every stream keeps a
    fair share on live sources."""

    def __init__(self, specs: list[tuple[str, str, int]]) -> None:
        self.ports = [port for port, _, _ in specs]
        self.policies = [policy for _, policy, _ in specs]
        self.capacity = [cap for _, _, cap in specs]
        self.queues: list[deque | StreamQueue] = [deque() if policy == "block" else StreamQueue(policy, cap)
                                                  for _, policy, cap in specs]
        self.dropped = [0] * len(specs)
        self.dropped_streams: dict[str, int] = {}  # drops of every connection, per stream
        self.cond = threading.Condition()
        self.closed = False
        self._next = 0
        self.pump: ZmqPump | None = None  # set when the engine's thread reads its sockets itself
        self.pump_cpu = 0.0  # CPU time of the pump thread feeding this inbox
        # messages that entered, were dropped here by policy, were finished by the engine (runtime.ledger: the
        # process's ledger cells, which outlive a SIGKILL; entered and dropped are written under `cond`)
        self.counts = np.zeros(3, np.int64)

    def room(self, i: int) -> bool:
        return self.policies[i] != "block" or len(self.queues[i]) < self.capacity[i]

    def put(self, i: int, item: Message | EndOfStream, stop: threading.Event | None = None) -> None:
        """Queue `item` on connection i, waiting (block) or dropping per stream (drop policies)."""
        with self.cond:
            q = self.queues[i]
            if self.policies[i] == "block" and item is not EOS:
                while len(q) >= self.capacity[i] and not self.closed:
                    if stop is not None and stop.is_set():
                        raise Closed
                    self.cond.wait(0.1)
            if self.closed:
                raise Closed
            was = len(q)
            self.counts[0] += isinstance(item, Message)
            if isinstance(q, StreamQueue):
                dropped = q.append(item)
                self.counts[1] += sum(dropped.values())
                self._count_dropped(i, dropped)
            else:
                q.append(item)
            if was == 0:  # the consumer waits only while every queue is empty: wake it for the first item only
                self.cond.notify_all()

    def count_dropped(self, i: int, streams: dict[str, int]) -> None:
        """Count messages of connection i dropped before they reached this inbox (by the producer)."""
        with self.cond:
            self._count_dropped(i, streams)

    def _count_dropped(self, i: int, streams: dict[str, int]) -> None:
        for stream, n in streams.items():
            self.dropped[i] += n
            self.dropped_streams[stream] = self.dropped_streams.get(stream, 0) + n

    def get(self, timeout: float | None = None) -> tuple[int, Message | EndOfStream] | None:
        """Next (connection, item) in round-robin order, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                n = len(self.queues)
                for k in range(n):
                    i = (self._next + k) % n
                    q = self.queues[i]
                    if q:
                        self._next = (i + 1) % n
                        if self.policies[i] == "block" and len(q) >= self.capacity[i]:
                            self.cond.notify_all()  # a producer may be waiting for room (others never wait)
                        return i, q.popleft()
                if self.closed:
                    raise Closed
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if self.pump is not None and self.pump.open:
                    self.cond.release()
                    try:
                        self.pump.pull(0.05 if left is None else min(left, 0.05))
                    finally:
                        self.cond.acquire()
                else:
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
                msg = Message(msg.stream, msg.seq, msg.pts, unpack(pack(msg.data)),
                              dict(msg.arrays), dict(msg.times))
        self.inbox.put(self.index, msg, stop)

    def close(self) -> None:
        pass


def encode(msg: Message | EndOfStream, shm: ShmContext | None = None, holder: str = "",
           dropped: dict[str, int] | None = None) -> list[Any]:
    """Message → ZeroMQ multipart frames: msgpack header, then one raw buffer per inline array.

    Arrays leased from a shared-memory pool travel as a handle in the header (counted for `holder`);
    `dropped` (per stream) tells the consumer what the producer dropped on this edge since its last message."""
    if msg is EOS:
        return [msgpack.packb({"eos": True, "x": dropped or {}})]
    if isinstance(msg, StreamEnd):
        return [msgpack.packb({"end": msg.stream, "src": msg.source, "x": dropped or {}})]
    specs, frames = [], []
    for name, arr in msg.arrays.items():
        handle = shm.handle(arr, holder) if shm is not None else None
        if handle is not None:
            specs.append([name, arr.dtype.str, list(arr.shape), handle])
            continue
        if not isinstance(arr, np.ndarray) and hasattr(arr, "__cuda_array_interface__"):
            raise ValueError(f"array {name!r} is in GPU memory and cannot go to another process: run the consumer "
                             "in the same process, or let the producer copy it to the host (preprocess: keep_on_gpu false)")
        arr = np.ascontiguousarray(arr)
        specs.append([name, arr.dtype.str, list(arr.shape)])
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
    head = {"s": msg.stream, "q": msg.seq, "p": msg.pts, "d": msg.data, "t": msg.times, "a": specs}
    if dropped:
        head["x"] = dropped
    return [pack(head)] + frames


def decode(frames: list[Any], shm: ShmContext | None = None) -> Message | EndOfStream:
    """Inverse of `encode`; inline arrays view the received buffers, leased ones map the producer's slot
    (both read-only, no copy)."""
    return _decode(frames, shm)[0]


def _decode(frames: list[Any], shm: ShmContext | None) -> tuple[Message | StreamEnd | EndOfStream, dict[str, int]]:
    """`decode`, with what the producer reports it dropped before this message (per stream)."""
    head = unpack(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    dropped = head.get("x") or {}
    if head.get("eos"):
        return EOS, dropped
    if "end" in head:
        return StreamEnd(head["end"], head.get("src", "")), dropped
    arrays = {}
    rest = iter(frames[1:])
    for spec in head["a"]:
        name, dtype, shape = spec[:3]
        if len(spec) > 3:
            if shm is None:
                raise ShmError(f"array {name!r} is in shared memory but this channel has no shared-memory context")
            arrays[name] = shm.attach(spec[3], dtype, shape)
            continue
        frame = next(rest)
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        arrays[name] = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
    return Message(head["s"], head["q"], head["p"], head["d"], arrays, head["t"]), dropped


def ack_path(endpoint: str) -> str:
    """The file whose existence says the consumer of the ipc:// `endpoint` received its end-of-stream."""
    return endpoint.removeprefix("ipc://") + ".ack"


class ZmqLink:
    """Cross-process edge, producer side: a PUSH socket connected to the consumer's ipc:// endpoint.

    `block` waits while the consumer is behind; a drop policy never does: a message that finds the socket full
    is dropped here and counted, and the count travels with the next message that goes out."""

    def __init__(self, ctx: zmq.Context, endpoint: str, shm: ShmContext | None = None, dst_host: str = "",
                 policy: str = "block", linger_s: float = 5.0) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 4)
        # bounds closing when the consumer is gone; a live one has received everything before this process
        # closes its links (it acknowledges end-of-stream, see `delivered`)
        self.sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        self.sock.connect(endpoint)
        self.shm, self.dst_host, self.policy = shm, dst_host, policy
        self.ack = ack_path(endpoint)
        self.pending_drops: dict[str, int] = {}  # per stream, not yet reported to the consumer
        self.counts = np.zeros(2, np.int64)  # [messages handed to ZeroMQ, -]: this edge's ledger cells

    def send(self, msg: Message | EndOfStream, stop: threading.Event) -> None:
        if isinstance(msg, Message) and self.policy != "block" and not self.sock.poll(0, zmq.POLLOUT):
            self.skip(msg)
            return
        frames = encode(msg, self.shm, self.dst_host, self.pending_drops)
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.pending_drops = {}
                self.counts[0] += isinstance(msg, Message)
                return
            except zmq.Again:
                if stop.is_set() and isinstance(msg, Message):
                    raise Closed from None
                self.sock.poll(100, zmq.POLLOUT)

    def skip(self, msg: Message) -> None:
        """Count `msg` as dropped on this edge (its stream's share), to be reported to the consumer."""
        self.pending_drops[msg.stream] = self.pending_drops.get(msg.stream, 0) + 1

    def delivered(self) -> bool:
        """Whether the consumer acknowledged end-of-stream (so it received everything before it) or is gone."""
        return os.path.exists(self.ack) or (self.shm is not None and not self.shm.host_alive(self.dst_host))

    def close(self) -> None:
        self.sock.close()


class ZmqPump:
    """Cross-process edges, consumer side: one thread moves received messages into the Inbox,
    reading a `block` connection only while its queue has room so back-pressure reaches the producer."""

    def __init__(self, ctx: zmq.Context, inbox: Inbox, endpoints: dict[int, str], shm: ShmContext | None = None,
                 counts: dict[int, np.ndarray] | None = None) -> None:
        self.inbox = inbox
        self.shm = shm
        # per connection, its ledger cells [-, messages taken off the socket]
        self.counts = {i: (counts or {}).get(i, np.zeros(2, np.int64)) for i in endpoints}
        self.acks = {i: ack_path(ep) for i, ep in endpoints.items()}
        self.socks: dict[int, zmq.Socket] = {}
        for i, ep in endpoints.items():
            s = ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVHWM, 4)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(ep)
            self.socks[i] = s
        self.open = set(self.socks)
        self.poller = zmq.Poller()
        self.polled: set[int] = set()
        self.stop = threading.Event()
        # every input remote and lossless: the engine's own thread reads the sockets when its queues run dry
        # (one thread hand-off less per message); otherwise a pump thread feeds the shared inbox (a drop-policy
        # socket is read all the time, so the inbox, not the socket, holds the backlog and drops the oldest)
        self.direct = len(self.socks) == len(inbox.queues) and set(inbox.policies) == {"block"}
        if self.direct:
            inbox.pump = self
        self.thread = threading.Thread(target=self._run, name="pump", daemon=True)

    def start(self) -> None:
        if self.socks and not self.direct:
            self.thread.start()

    def _run(self) -> None:
        while self.open and not self.stop.is_set():
            ok = self.pull(0.05)
            self.inbox.pump_cpu = time.thread_time()
            if not ok:
                return

    def pull(self, timeout: float) -> bool:
        """Move what has arrived (up to each queue's room) into the inbox, waiting up to `timeout` s for
        something; False once the inbox is closed."""
        with self.inbox.cond:
            ready = {i for i in self.open if self.inbox.room(i)}
        for i in self.polled - ready:
            self.poller.unregister(self.socks[i])
        for i in ready - self.polled:
            self.poller.register(self.socks[i], zmq.POLLIN)
        self.polled = ready
        if not ready:
            time.sleep(0.001)
            return True
        events = dict(self.poller.poll(int(timeout * 1000)))
        for i in list(ready):
            sock = self.socks[i]
            for _ in range(BURST):  # then the other sockets get their turn, however fast this one fills
                if not (i in self.open and sock in events and self.inbox.room(i)):
                    break
                dropped: dict[str, int] = {}
                try:
                    item, dropped = _decode(sock.recv_multipart(copy=False), self.shm)
                    self.counts[i][1] += isinstance(item, Message)
                except ShmError as exc:
                    # its frame died with its producer: not taken in, so the launcher counts it with what else was
                    # in flight from that process (or not, when the restarted source sends it again)
                    log.warning("connection %d: message lost: %s", i, exc)
                    item = None
                if dropped:
                    self.inbox.count_dropped(i, dropped)
                if item is not None:
                    try:
                        self.inbox.put(i, item, self.stop)
                    except Closed:
                        return False
                    if item is EOS:
                        self.open.discard(i)
                        with contextlib.suppress(OSError):  # no run folder: the run is over, nobody waits
                            open(self.acks[i], "w").close()  # everything before it was received: the producer may go
                if not sock.poll(0):
                    break
        return True

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(2)
        for s in self.socks.values():
            s.close()
