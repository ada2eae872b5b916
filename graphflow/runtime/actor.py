"""The data plane of one engine: an Actor runs an Engine in its own thread, between its inboxes and its links."""
from __future__ import annotations

import inspect
import math
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import anyio
import numpy as np

from graphflow.engine import Engine, EngineContext
from graphflow.errors import GraphflowError
from graphflow.graph.model import Node
from graphflow.message import EOS, Message, StreamEnd
from graphflow.runtime.backoff import backoff
from graphflow.runtime.links import Closed, Inbox, ZmqLink
from graphflow.runtime.meter import Meter
from graphflow.runtime.shm import MIN_BYTES, SlotPool
from graphflow.runtime.supervise import Throttle

ENDED_KEEP = 256  # ended streams whose per-stream counters stay in the stats


@dataclass
class Stats:
    """Counters of one engine, sent to the launcher for progress and the final summary."""

    engine: str
    received: int = 0
    sent: int = 0
    errors: int = 0
    busy_s: float = 0.0  # wall time inside the engine's own code (its sends excluded)
    runtime_cpu_s: float = 0.0  # CPU time of the runtime working for this engine: queues, channels, sends
    dropped: int = 0  # by a drop policy: by design, not a loss
    depth: int = 0
    state: str = "starting"  # starting, setup, running, flushing, done, failed, exited (SystemExit), died
    streams: dict[str, int] = field(default_factory=dict)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    finished: int = 0  # messages whose process() returned
    last_seq: dict[str, dict[str, int]] = field(default_factory=dict)  # port → stream → seq last received
    holding: dict[str, Any] = field(default_factory=dict)  # the message in process(): stream, seq, s (held for)
    lost: int = 0  # messages lost to a crash or to a dead consumer, counted by the launcher
    lost_reasons: dict[str, int] = field(default_factory=dict)
    discarded: int = 0  # inputs of a dead engine received and discarded by the launcher
    restarts: int = 0
    dropped_streams: dict[str, int] = field(default_factory=dict)  # drops on this engine's inputs, per stream


class Actor:
    """One engine instance and the thread that feeds it: check → setup → process… → flush → EOS → teardown
    (only after a setup that returned). The engine reaches the actor only through its EngineContext."""

    def __init__(self, node: Node, inbox: Inbox | None, outlets: dict[str, list[Any]],
                 report: Callable[[str, str], None], stop: threading.Event, go: threading.Event,
                 pools: dict[str, tuple[SlotPool, float | None]] | None = None,
                 closing: threading.Event | None = None, services: Mapping[str, Any] | None = None) -> None:
        self.node = node
        self.inbox = inbox
        self.outlets = outlets
        self.report = report  # (kind, text) → launcher
        self.graph_stop = stop
        self.go = go  # set once every engine of the graph has finished setup: sources wait for it
        self.ready = threading.Event()
        self.stats = Stats(node.id)
        self.engine: Engine = node.cls(node.id, node.params)
        self.context = EngineContext(node.id, self._emit, self._slot, services=services)
        self.engine.attach(self.context)
        self.set_up = False  # setup() returned: metrics() may be read, teardown() is due
        self.pools = pools or {}  # port → (shared-memory pool, how long to wait for a slot; None: until closing)
        self.closing = closing or threading.Event()
        self.shm_drops = 0
        self._setup_tries_left = node.max_restarts if node.restart == "on-failure" else 0
        self.thread = threading.Thread(target=self.run, name=f"engine:{node.id}", daemon=True)
        self._loop: Any = None
        self._out_lock = threading.Lock()  # one send at a time: engines may send from their own worker threads
        self.meter = Meter()
        self.meter.owner = self.thread
        self._held: tuple[float, str, int] | None = None  # (since, stream, seq) of the message in process()
        self.throttle = Throttle()
        self._last_failure = ""  # what and where the last error happened, for the throttle's summary lines
        self.end_sources: list[frozenset[str]] = []  # per input: the sources upstream of it (set by the Host)
        self._ends: dict[tuple[str, str], set[int]] = {}  # stream ends seen on some inputs, not yet on all
        self._ended: OrderedDict[str, None] = OrderedDict()  # streams that ended, oldest first (see _retire)

    def _emit(self, msg: Message | StreamEnd, port: str) -> None:
        """The engine's send: stamp and count a message, place its arrays in shared memory, put it on each link."""
        links = self.outlets.get(port)
        if links is None:
            raise ValueError(f"engine {self.node.id!r} has no output port {port!r} "
                             f"(outputs: {', '.join(self.node.cls.outputs) or 'none'})")
        frame = isinstance(msg, Message)  # else a stream's end marker: passed on, not stamped nor counted
        if frame:
            msg.times[self.node.id] = time.time()
        started = self.meter.send_started()
        with self._out_lock:
            try:
                remote = self._to_shared_memory(msg, port)
                for link in links:
                    if not remote and isinstance(link, ZmqLink):
                        self.shm_drops += 1
                        link.skip(msg)  # counted as a drop of that edge, reported to its consumer
                        continue
                    link.send(msg, self.context.stopping)
                self.stats.sent += frame
            finally:
                self.meter.send_ended(started)

    def hold_sends(self, timeout: float) -> None:
        """Take the send lock and keep it: no send goes out any more (the process is about to be killed)."""
        self._out_lock.acquire(timeout=timeout)

    def _to_shared_memory(self, msg: Message, port: str) -> bool:
        """Put the message's large arrays into the port's pool (once for every consumer process);
        False when no slot is free on a drop-policy channel: the message skips those consumers."""
        entry = self.pools.get(port)
        if entry is None or not isinstance(msg, Message):
            return True
        pool, wait = entry
        shm = pool.shm
        for name, arr in msg.arrays.items():
            placed = shm.place(arr, pool, self.closing, wait)
            if placed is None:
                return False
            msg.arrays[name] = placed
        return True

    def _slot(self, shape: tuple[int, ...], dtype: np.dtype, port: str) -> np.ndarray | None:
        """The engine's alloc: a shared-memory slot of the port's pool, or None when a plain array will do."""
        entry = self.pools.get(port)
        if entry is None or math.prod(shape) * dtype.itemsize < MIN_BYTES:
            return None
        t0 = time.perf_counter()
        arr = entry[0].acquire(shape, dtype, self.closing, entry[1])
        self.meter.slot_waited(time.perf_counter() - t0)
        return arr

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = anyio.from_thread.start_blocking_portal()
                self._portal = self._loop.__enter__()

            async def wait() -> Any:
                return await result
            return self._portal.call(wait)
        return result

    def _fail(self, what: str, msg: Message | None = None) -> None:
        """Report the exception being handled with engine id (and stream/frame); apply `on_error`."""
        self.stats.errors += 1
        where = f" on stream {msg.stream!r} frame {msg.seq}" if msg is not None else ""
        exc = sys.exc_info()[1]
        detail = f" {exc}" if isinstance(exc, GraphflowError) else f"\n{traceback.format_exc()}"  # user errors: one line
        text = f"engine {self.node.id!r} failed in {what}{where}:{detail}"
        self.stats.error = text.splitlines()[-1]
        self._last_failure = f"{what}{where}: {self.stats.error}"
        if self.throttle.admit():
            self.report("error", text)
        else:
            self._report_held()
        if what == "generate":
            self.report("failed", f"source {self.node.id!r} failed")  # the run's exit code says so
        if what == "setup" and self._setup_tries_left:
            return  # run() tries again after a back-off
        if self.node.on_error == "stop" or what in ("setup", "check"):
            self.report("stop", f"engine {self.node.id!r} {what} failed")
            self.graph_stop.set()

    def _report_held(self, force: bool = False) -> None:
        """One line for the errors the throttle held back, when one is due (or `force`: at the end of the run)."""
        held = self.throttle.due(force)
        if held:
            self.report("error", f"engine {self.node.id!r}: {held} more errors (last: in {self._last_failure})")

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any, msg: Message | None = None) -> bool:
        self.meter.enter()
        try:
            self._call(fn, *args)
            return True
        except Closed:
            return False
        except Exception:
            self._fail(what, msg)
            return False
        finally:
            self.meter.leave()

    def run(self) -> None:
        self.stats.state = "setup"
        ended = "failed"
        try:
            # the engine built here is not the one the graph's loader validated: it is checked once, now
            self.set_up = self._guarded("check", self.engine.check) and self._setup()
            self.ready.set()
            if self.set_up:
                self.stats.state = "running"
                if self.node.cls.is_source():
                    self._run_source()
                else:
                    self._run_inbox()
                self.stats.state = "flushing"
                self._guarded("flush", self.engine.flush)
                ended = "done"
        except BaseException as exc:  # SystemExit in engine code ends this engine early: a failure, as a crash is
            ended = "exited"
            self.stats.errors += 1
            self.stats.error = f"exited early: {type(exc).__name__}({exc})"
            trace = "" if isinstance(exc, SystemExit) else f"\n{traceback.format_exc()}"  # a bug: where it was
            self.report("exited", f"engine {self.node.id!r} {self.stats.error}{trace}")
            if self.inbox is not None:  # its producers must not block on it
                self._run_inbox(discard=True)
        finally:
            self.ready.set()
            self._held = None
            self._close_outputs()
            if self.set_up:
                self._guarded("teardown", self.engine.teardown)
            if self._loop is not None:
                self._loop.__exit__(None, None, None)
            self.meter.ended()
            self._report_held(force=True)
            self.stats.state = ended

    def _setup(self) -> bool:
        """setup(), tried again with exponential back-off while `restart: on-failure` allows."""
        tries = 0
        while not self._guarded("setup", self.engine.setup):
            if self._setup_tries_left == 0 or self.graph_stop.is_set():
                return False
            self._setup_tries_left -= 1
            tries += 1
            delay = backoff(tries)
            self.report("error", f"engine {self.node.id!r}: setup retry {tries}/{self.node.max_restarts} in {delay:g}s")
            if self.graph_stop.wait(delay):
                return False
        return True

    def _run_source(self) -> None:
        while not self.go.wait(0.05):
            if self.context.stopping.is_set() or self.graph_stop.is_set():
                return
        gen = self.engine.generate()
        try:
            while not self.context.stopping.is_set() and not self.graph_stop.is_set():
                self.meter.enter()
                try:
                    msg = next(gen)
                except StopIteration:
                    self.meter.leave()
                    break
                except Exception:
                    self.meter.leave()
                    self._fail("generate")
                    break
                self.meter.leave(busy=msg is not None)  # a heartbeat (None) is time spent waiting for input, not work
                if msg is not None:
                    if isinstance(msg, Message):  # a frame or event; a stream's end marker is passed on as it is
                        msg.times.setdefault("capture", time.time())
                        self._count(msg)
                    elif isinstance(msg, StreamEnd) and not msg.source:
                        msg = StreamEnd(msg.stream, self.node.id)
                    try:
                        self._emit(msg, "out")
                    except Closed:
                        break
                    if isinstance(msg, StreamEnd):
                        self._retire(msg.stream)
            else:  # stopped: one more step, so a source that ends on `stopping` raises what failed meanwhile
                self.context.stopping.set()
                self.meter.enter()
                try:
                    next(gen)
                except StopIteration:
                    pass
                except Exception:
                    self.meter.leave(busy=False)
                    self._fail("generate")
                finally:
                    if self.meter.inside:
                        self.meter.leave(busy=False)
        finally:
            gen.close()

    def _count(self, msg: Message) -> None:
        self.stats.received += 1
        self.stats.streams[msg.stream] = self.stats.streams.get(msg.stream, 0) + 1
        if msg.port:  # what a restarted source resumes after
            self.stats.last_seq.setdefault(msg.port, {})[msg.stream] = msg.seq

    def _run_inbox(self, discard: bool = False) -> None:
        """Feed the inbox to process() until every input has ended; `discard`: count what arrives as lost instead."""
        assert self.inbox is not None
        open_ = set(range(len(self.inbox.queues)))
        while open_:
            try:
                got = self.inbox.get(0.2)
            except Closed:
                return
            if got is None:
                continue
            i, item = got
            if item is EOS:
                open_.discard(i)
                continue
            if isinstance(item, StreamEnd):
                if not discard:
                    self._stream_end(i, item)
                continue
            if discard:
                self.stats.lost += 1
                self.stats.lost_reasons["received after the engine exited"] = self.stats.lost
                self.inbox.counts[2] += 1  # counted lost already: no longer held
                continue
            item.port = self.inbox.ports[i]
            self._count(item)
            self._held = (time.monotonic(), item.stream, item.seq)
            self._guarded("process", self.engine.process, item, msg=item)
            self._held = None
            self.stats.finished += 1
            self.inbox.counts[2] += 1

    def _stream_end(self, i: int, end: StreamEnd) -> None:
        """A stream's end on input i: once it has come on every input its source feeds, the engine frees the
        stream (`on_stream_end`) and passes the end on (`pass_end`)."""
        key = (end.stream, end.source)
        got = self._ends.setdefault(key, set())
        got.add(i)
        needed = {k for k, sources in enumerate(self.end_sources) if end.source in sources} or {i}
        if not needed <= got:
            return
        del self._ends[key]
        self._guarded("on_stream_end", self.engine.on_stream_end, end.stream)
        self._guarded("pass_end", self.engine.pass_end, end)
        self._retire(end.stream)

    def _retire(self, stream: str) -> None:
        """An ended stream's counters stay for the summary among the last ENDED_KEEP ended streams, then go, so
        streams coming and going all day do not grow the stats."""
        self._ended[stream] = None
        self._ended.move_to_end(stream)
        while len(self._ended) > ENDED_KEEP:
            old, _ = self._ended.popitem(last=False)
            self.stats.streams.pop(old, None)
            for seen in self.stats.last_seq.values():
                seen.pop(old, None)
            if self.inbox is not None:
                with self.inbox.cond:
                    self.inbox.dropped_streams.pop(old, None)

    def command(self, op: str, args: dict[str, Any]) -> Any:
        """Run a launcher command on the engine (from the calling thread); its exception is the caller's."""
        if not self.ready.is_set() or self.stats.state not in ("running", "setup"):
            raise RuntimeError(f"engine {self.node.id!r} is not running (state {self.stats.state})")
        return self.engine.on_command(op, args)

    def _close_outputs(self) -> None:
        stop = threading.Event()
        for links in self.outlets.values():
            for link in links:
                try:
                    link.send(EOS, stop)
                except Closed:
                    pass

    def snapshot(self) -> dict[str, Any]:
        if self.inbox is not None:
            self.stats.dropped = sum(self.inbox.dropped)
            self.stats.dropped_streams = dict(self.inbox.dropped_streams)
            self.stats.depth = self.inbox.depth()
        self.stats.runtime_cpu_s = self.meter.runtime_cpu(self.inbox.pump_cpu if self.inbox is not None else 0.0)
        self.stats.busy_s = self.meter.busy_own + self.context.busy_s
        held = self._held
        self.stats.holding = ({"stream": held[1], "seq": held[2], "s": round(time.monotonic() - held[0], 3)}
                              if held is not None else {})
        try:
            self.stats.metrics = dict(self.engine.metrics()) if self.set_up else {}
        except Exception as exc:  # a metrics bug must not stop the graph
            self.stats.metrics = {"error": f"metrics() failed: {exc}"}
        if self.pools:
            pools = [p for p, _ in self.pools.values()]
            self.stats.metrics["shm"] = {"slots_busy": sum(p.in_use() for p in pools), "waits": sum(p.waits for p in pools),
                                         "drops": self.shm_drops, "reclaimed": sum(p.reclaimed for p in pools)}
        snap = dict(self.stats.__dict__)  # nested dicts copied: the engine's thread goes on counting
        own = self.stats.metrics.get("errors")  # errors the engine reported itself (decode: sources that failed)
        if isinstance(own, int) and not isinstance(own, bool) and own > 0:
            snap["errors"] += own
        for key in ("streams", "lost_reasons", "dropped_streams"):
            snap[key] = dict(snap[key])
        snap["last_seq"] = {port: dict(by) for port, by in list(snap["last_seq"].items())}
        return snap
