"""Runs a Graph: engine actors in threads (this process) or child processes, wired by channels."""
from __future__ import annotations

import ctypes
import inspect
import itertools
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np
import zmq

from .channel import Closed, Inbox, LocalLink, ZmqLink, ZmqPump, ack_path, encode
from .backoff import backoff
from .shm import MIN_BYTES, ShmContext, SlotPool
from .engine import Engine, EngineContext
from .errors import GraphflowError
from .graph import Graph, Node
from .message import EOS, Message, StreamEnd
from .meter import Meter
from .supervise import MAIN, Child, ErrorLog, Supervisor, Tally, Throttle, make_rundir

log = logging.getLogger(__name__)
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
                 closing: threading.Event | None = None) -> None:
        self.node = node
        self.inbox = inbox
        self.outlets = outlets
        self.report = report  # (kind, text) → launcher
        self.graph_stop = stop
        self.go = go  # set once every engine of the graph has finished setup: sources wait for it
        self.ready = threading.Event()
        self.stats = Stats(node.id)
        self.engine: Engine = node.cls(node.id, node.params)
        self.context = EngineContext(node.id, self._emit, self._slot)
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
                continue
            item.port = self.inbox.ports[i]
            self._count(item)
            self._held = (time.monotonic(), item.stream, item.seq)
            self._guarded("process", self.engine.process, item, msg=item)
            self._held = None
            self.stats.finished += 1

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
            if self.inbox.lost:  # arrived, but the frame could not be mapped: its producer was killed
                self.stats.lost_reasons["frame gone with its killed producer"] = self.inbox.lost
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
        for key in ("streams", "lost_reasons", "dropped_streams"):
            snap[key] = dict(snap[key])
        snap["last_seq"] = {port: dict(by) for port, by in list(snap["last_seq"].items())}
        return snap


class Host:
    """The actors of one OS process, their channels, and the stop/stats plumbing for them."""

    def __init__(self, graph: Graph, host_of: dict[str, str], name: str, rundir: str,
                 report: Callable[[str, str], None]) -> None:
        self.name = name
        self.stop = threading.Event()
        self.go = threading.Event()
        self.closing = threading.Event()
        self.ctx = zmq.Context.instance()
        self.shm = ShmContext(name, rundir, list(host_of.values()))
        mine = [n for n in graph.nodes.values() if host_of[n.id] == name]
        endpoints = {i: f"ipc://{rundir}/e{i}" for i in range(len(graph.edges))}
        self.inbound: dict[str, list[str]] = {}  # process → acknowledgements of its inputs from other processes
        for i, e in enumerate(graph.edges):
            if host_of[e.src] != host_of[e.dst]:
                self.inbound.setdefault(host_of[e.dst], []).append(ack_path(endpoints[i]))
        inboxes: dict[str, Inbox] = {}
        self.pumps: list[ZmqPump] = []
        for node in mine:
            incoming = [(i, e) for i, e in enumerate(graph.edges) if e.dst == node.id]
            if not incoming:
                continue
            inbox = Inbox([(e.dst_port, e.policy, e.capacity) for _, e in incoming])
            inboxes[node.id] = inbox
            remote = {k: endpoints[i] for k, (i, e) in enumerate(incoming) if host_of[e.src] != name}
            self.pumps.append(ZmqPump(self.ctx, inbox, remote, self.shm))
        self.actors: list[Actor] = []
        for node in mine:
            outlets: dict[str, list[Any]] = {p: [] for p in node.cls.outputs}
            for i, e in enumerate(graph.edges):
                if e.src != node.id:
                    continue
                fanout = sum(1 for x in graph.edges if x.src == e.src and x.src_port == e.src_port)
                if host_of[e.dst] == name:
                    index = [j for j, x in enumerate(graph.edges) if x.dst == e.dst].index(i)
                    outlets[e.src_port].append(LocalLink(inboxes[e.dst], index, isolate=fanout > 1))
                else:
                    outlets[e.src_port].append(ZmqLink(self.ctx, endpoints[i], self.shm, host_of[e.dst], e.policy,
                                                       graph.settings.get("shutdown_timeout", 10.0) / 2))
            actor = Actor(node, inboxes.get(node.id), outlets, report, self.stop, self.go,
                          self._pools(graph, host_of, node), self.closing)
            actor.end_sources = [upstream_sources(graph, e.src) for e in graph.edges if e.dst == node.id]
            self.actors.append(actor)

    def _pools(self, graph: Graph, host_of: dict[str, str], node: Node) -> dict[str, tuple[SlotPool, float | None]]:
        """A shared-memory pool for each output port of `node` with consumers in other processes."""
        pools = {}
        for port in node.cls.outputs:
            remote = [e for e in graph.edges if e.src == node.id and e.src_port == port and host_of[e.dst] != self.name]
            if remote:
                slots = max(e.slots or 2 * e.capacity + 8 for e in remote)
                lossless = any(e.policy == "block" for e in remote)  # else never wait: drop instead
                pools[port] = (self.shm.pool(f"{node.id}.{port}", slots), None if lossless else 0.0)
        return pools

    def start(self) -> None:
        for pump in self.pumps:
            pump.start()
        for actor in self.actors:
            actor.thread.start()

    def request_stop(self) -> None:
        """Drain: sources stop producing and send end-of-stream; the rest finishes what it holds."""
        for actor in self.actors:
            if actor.node.cls.is_source():
                actor.context.stopping.set()

    def ready(self) -> bool:
        """Every actor has finished (or failed) setup."""
        return all(a.ready.is_set() or not a.thread.is_alive() for a in self.actors)

    def alive(self) -> bool:
        return any(a.thread.is_alive() for a in self.actors)

    def delivered(self) -> bool:
        """Whether this process, its engines done, may close its links and pools: every consumer in another
        process acknowledged end-of-stream on each edge from here, and every process still holding a frame of
        its pools has received all it ever will (so it mapped them); consumers that are gone do not count."""
        links = [link for a in self.actors for ls in a.outlets.values() for link in ls if isinstance(link, ZmqLink)]
        if not all(link.delivered() for link in links):
            return False
        holders = set().union(*(pool.holders() for pool in self.shm.pools.values())) - {self.name}
        return all(all(map(os.path.exists, self.inbound.get(h, ()))) or not self.shm.host_alive(h) for h in holders)

    def close(self) -> None:
        self.closing.set()
        for actor in self.actors:
            actor.context.stopping.set()
            if actor.inbox is not None:
                actor.inbox.close()
        for actor in self.actors:
            actor.thread.join(2)
        for pump in self.pumps:
            pump.close()
        for actor in self.actors:
            for links in actor.outlets.values():
                for link in links:
                    link.close()
        self.shm.close()

    def snapshot(self) -> list[dict[str, Any]]:
        return [a.snapshot() for a in self.actors]

    def command(self, engine: str, op: str, args: dict[str, Any]) -> Any:
        """Run a launcher command on one of this process's engines."""
        for actor in self.actors:
            if actor.node.id == engine:
                return actor.command(op, args)
        raise KeyError(engine)


def upstream_sources(graph: Graph, engine: str) -> frozenset[str]:
    """The source engines whose messages reach `engine` (itself included, if it is one)."""
    import networkx as nx

    g = graph.nx()
    return frozenset(n for n in nx.ancestors(g, engine) | {engine} if graph.nodes[n].cls.is_source())


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the launcher dies, so no child is ever orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_main(graph: Graph, host_of: dict[str, str], name: str, rundir: str, control: str,
                sys_path: list[str], parent: int, interval: float,
                resume: dict[str, dict[str, int]] | None = None) -> None:
    """A child process: build this host's engines, start them, report to the launcher until all it sent is
    delivered, then close."""
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    sys.path[:] = sys_path
    final, early_stop = _child_signals()
    ctx = zmq.Context.instance()
    out, report = _reporter(ctx, control, name)
    try:
        host = Host(graph, host_of, name, rundir, report)
    except Exception:
        report("error", f"process {name!r} failed to start:\n{traceback.format_exc()}")
        report("stop", f"process {name!r} failed to start")
        out.close()
        _terminate(ctx, 5.0)
        return
    for actor in host.actors:
        actor.engine.resume = dict((resume or {}).get(actor.node.id, {}))
    threading.Thread(target=_serve_commands, args=(ctx, command_endpoint(rundir, name), host, report),
                     name="commands", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: host.request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: host.go.set())
    if early_stop.is_set():
        host.request_stop()
    host.start()
    while not host.ready():
        time.sleep(0.01)
    report("ready", "")
    _report_until_delivered(host, report, final, interval)
    host.close()
    report("stats", host.snapshot())
    out.close()
    _terminate(ctx, graph.settings.get("shutdown_timeout", 10.0) / 2)


def _child_signals() -> tuple[threading.Event, threading.Event]:
    """A child's signal handlers while its engines are built: Ctrl-C and a closed terminal are the launcher's to
    handle. Returns (final: SIGUSR2, report the final counters now; early_stop: SIGTERM came before the host)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    final = threading.Event()
    signal.signal(signal.SIGUSR2, lambda *_: final.set())
    early_stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: early_stop.set())
    return final, early_stop


def _reporter(ctx: zmq.Context, control: str, name: str) -> tuple[zmq.Socket, Callable[[str, Any], None]]:
    """The child's socket to the launcher's control channel, and `report(kind, payload)` sending on it from any
    thread."""
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(control)
    lock = threading.Lock()

    def report(kind: str, payload: Any) -> None:
        with lock:
            out.send_pyobj((name, kind, payload))
    return out, report


def _report_until_delivered(host: Host, report: Callable[[str, Any], None], final: threading.Event,
                            interval: float) -> None:
    """Report stats every `interval` (and the final counters when asked) until the engines have ended and every
    consumer has everything sent from here."""
    while host.alive() or not host.delivered():
        if final.wait(interval if host.alive() else min(interval, 0.05)):
            report("stats", _frozen_snapshot(host.actors))
            final.clear()
            continue
        if host.stop.is_set():
            report("stop", "")
            host.stop.clear()
        report("stats", host.snapshot())


def command_endpoint(rundir: str, host: str) -> str:
    """Where a child process takes the launcher's commands for its engines."""
    return f"ipc://{rundir}/cmd-{host}"


def _serve_commands(ctx: zmq.Context, endpoint: str, host: Host, report: Callable[[str, Any], None]) -> None:
    """A child's command thread: (id, engine, op, args) in, ("reply", (id, ok, result or error)) back."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    try:
        while True:
            req, engine, op, args = sock.recv_pyobj()
            try:
                report("reply", (req, True, host.command(engine, op, args)))
            except Exception as exc:  # (a user's mistake?, one line)
                report("reply", (req, False, (isinstance(exc, GraphflowError), f"{type(exc).__name__}: {exc}")))
    except zmq.ContextTerminated:
        sock.close()


def _frozen_snapshot(actors: list[Actor]) -> list[dict[str, Any]]:
    """Every actor's stats with its sends held (the locks are kept: the process is about to be killed), so the
    counters reported are final and agree with what consumers received."""
    for actor in actors:
        actor.hold_sends(timeout=1.0)
    return [a.snapshot() for a in actors]


def _terminate(ctx: zmq.Context, wait_s: float) -> None:
    """Deliver what this process's closed sockets still queue before it exits, for up to `wait_s`: its last
    reports to the launcher (consumers acknowledged every message before the links closed, see
    `Host.delivered`). The wait is bounded (a socket an engine left open, or one a stray engine thread still
    uses, would hold `term` forever, as would a link to a consumer that is gone), and no socket is closed here."""
    t = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    t.start()
    t.join(wait_s)


@dataclass
class Summary:
    """What a run did: per-engine stats, errors, losses, wall time and how it ended. Its exit code:
    0 clean: the sources ended (or a stop signal drained the graph), no engine reported an error, nothing was
      lost (a drop policy's drops are by design, not losses);
    1 failed: an engine is gone for good, a setup failed, or the stop had to be forced or timed out;
    3 finished, not clean: engines reported errors or messages were lost (`lost`, by reason).
    (2 is the command line's: a usage or validation error.)"""

    stats: dict[str, dict[str, Any]]
    errors: list[str]  # the first and the last texts (bounded), with a line counting those between
    wall_s: float
    stopped_by: str = ""
    failed: bool = False
    lost: int = 0
    lost_reasons: dict[str, int] = field(default_factory=dict)  # "engine: reason" → messages
    errors_by_engine: dict[str, int] = field(default_factory=dict)  # engines with errors (deaths included)

    @property
    def exit_code(self) -> int:
        if self.failed:
            return 1
        return 3 if self.lost or any(self.errors_by_engine.values()) else 0


class Graveyard:
    """Stands in for process engines that died for good: their consumers get end-of-stream so the rest of
    the graph can finish, and what their producers still send them is received and discarded (counted),
    so no producer blocks on a dead consumer; their shared-memory holds are reclaimed by the owners."""

    def __init__(self, graph: Graph, host_of: dict[str, str], rundir: str, ctx: zmq.Context) -> None:
        self.graph, self.host_of, self.rundir, self.ctx = graph, host_of, rundir, ctx
        self.socks: list[tuple[zmq.Socket, str]] = []  # (socket, engine whose inputs it discards, or "")
        self.discarded: dict[str, int] = {}

    def bury(self, node: Node) -> None:
        host = self.host_of[node.id]
        for i, e in enumerate(self.graph.edges):
            if self.host_of[e.src] == self.host_of[e.dst] == host:
                continue  # both ends died together: an in-process link, no socket
            if e.src == node.id:
                self.end(i)
            if e.dst == node.id:
                pull = self.ctx.socket(zmq.PULL)
                pull.setsockopt(zmq.LINGER, 0)
                pull.bind(f"ipc://{self.rundir}/e{i}")
                self.socks.append((pull, node.id))
        self.discarded.setdefault(node.id, 0)

    def end(self, edge: int) -> None:
        """Send end-of-stream on a cross-process edge on behalf of its producer: one that died, or one that ended
        while its consumer was dead (the restarted consumer would wait for it forever)."""
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"ipc://{self.rundir}/e{edge}")
        push.send_multipart(encode(EOS), zmq.NOBLOCK)
        self.socks.append((push, ""))

    def drain(self) -> None:
        for sock, engine in self.socks:
            while engine and sock.poll(0):
                sock.recv_multipart(copy=False)
                self.discarded[engine] += 1

    def close(self) -> None:
        for sock, _ in self.socks:
            sock.close()


def hosts(graph: Graph) -> dict[str, str]:
    """The OS process of each engine: MAIN (this one) for thread placement, `proc:ID` for a process of its own,
    `group:NAME` for the one that all engines placed `process:NAME` share."""
    def host(node: Node) -> str:
        kind, _, group = node.placement.partition(":")
        return MAIN if kind == "thread" else f"group:{group}" if group else f"proc:{node.id}"
    return {n.id: host(n) for n in graph.nodes.values()}


class Control:
    """The launcher's end of the control channel: each child sends (host, kind, payload) tuples to it."""

    def __init__(self, ctx: zmq.Context, rundir: str) -> None:
        self.endpoint = f"ipc://{rundir}/control"
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)

    def receive(self, timeout_ms: int) -> list[tuple[str, str, Any]]:
        """What has arrived (waiting up to `timeout_ms` for the first), at most 1000 at a time: a bounded batch,
        so children reporting often cannot keep the launcher from its other checks."""
        got: list[tuple[str, str, Any]] = []
        if self.sock.poll(timeout_ms):
            for _ in range(1000):
                try:
                    got.append(self.sock.recv_pyobj(zmq.NOBLOCK))
                except zmq.Again:
                    break
        return got

    def close(self) -> None:
        self.sock.close()


class Launcher:
    """Starts every host (this process + one child per process-placed engine or process group), then leaves the
    children to the Supervisor, collects stats and errors, watches for stalls and stops the graph."""

    def __init__(self, graph: Graph, on_progress: Callable[[dict[str, dict]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.graph = graph
        self.on_progress = on_progress
        self.clock = clock
        self.host_of = hosts(graph)
        self.errlog = ErrorLog()
        self.tally = Tally({n: Stats(n).__dict__ for n in graph.nodes}, clock)
        self.stop_reason = ""
        self.signals = 0
        self.failed = False
        settings = graph.settings
        self.interval = settings.get("stats_interval", 0.5)
        self.timeout = settings.get("shutdown_timeout", 10.0)
        self.watchdog_s = settings.get("watchdog_s", 30.0)
        self.flagged: set[tuple] = set()  # what the watchdog reported already
        self.warnings: dict[str, int] = {}  # engine → watchdog reports
        self.stopping_since: float | None = None
        self.rundir = ""
        self.control: Control | None = None
        self.local: Host | None = None
        self.graveyard: Graveyard | None = None
        self.supervisor: Supervisor | None = None
        self.started = threading.Event()  # every engine is set up and the sources were let go
        self._replies: dict[int, tuple[bool, Any]] = {}
        self._reply_ready = threading.Condition()
        self._requests = itertools.count(1)
        self._command_socks: dict[str, zmq.Socket] = {}
        self._command_lock = threading.Lock()

    @property
    def errors(self) -> list[str]:
        return self.errlog.texts()

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Every engine's stats as last reported: complete dicts, a restarted engine's counters continued."""
        return self.tally.all()

    def _report(self, kind: str, text: Any) -> None:
        """A report of this process's engines (or forwarded from a child's)."""
        if kind == "error":
            self.errlog.add(text)
        elif kind == "stop" and text:
            self.failed = True
            self.stop_reason = self.stop_reason or text
        elif kind in ("failed", "exited"):
            self.failed = True  # a source that failed, a thread engine that exited early: gone for good
            if kind == "exited":
                self.errlog.add(text)

    def on_signal(self, signum: int, _frame: Any = None) -> None:
        self.signals += 1
        self.stop_reason = self.stop_reason or signal.Signals(signum).name

    def run(self) -> Summary:
        t0 = self.clock()
        self.rundir = make_rundir()
        try:
            try:
                self._open()
                self._supervise()
            finally:
                self._close()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)
        return self._summary(self.clock() - t0)

    def _open(self) -> None:
        ctx = zmq.Context.instance()
        self.control = Control(ctx, self.rundir)
        self.local = Host(self.graph, self.host_of, MAIN, self.rundir, self._report)
        self.graveyard = Graveyard(self.graph, self.host_of, self.rundir, ctx)
        self._spawner = mp.get_context("spawn")
        self.supervisor = Supervisor(self.graph, self.host_of, self.tally, self._spawn, self._engine_error,
                                     self._gone, self.clock)
        self.local.start()

    def command(self, engine: str, op: str, args: dict[str, Any], timeout: float = 10.0) -> Any:
        """Run `op` on a running engine, thread or process (`Engine.on_command`), from any thread; returns its
        result. Its error comes back as the same exception type when it is a user error (ParamError,
        GraphflowError), else as RuntimeError; TimeoutError if no answer came within `timeout` s."""
        if engine not in self.graph.nodes:
            raise KeyError(engine)
        host = self.host_of[engine]
        if host == MAIN:
            if self.local is None:
                raise RuntimeError("the graph is not running")
            return self.local.command(engine, op, args)
        req = next(self._requests)
        with self._command_lock:
            sock = self._command_socks.get(host)
            if sock is None:
                sock = self._command_socks[host] = zmq.Context.instance().socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
                sock.connect(command_endpoint(self.rundir, host))
            sock.send_pyobj((req, engine, op, args))
        deadline = time.monotonic() + timeout
        with self._reply_ready:
            while req not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"engine {engine!r} did not answer {op!r} within {timeout:g}s")
                self._reply_ready.wait(left)
            ok, result = self._replies.pop(req)
        if ok:
            return result
        user, text = result
        if user:
            raise GraphflowError(text.split(": ", 1)[1])
        raise RuntimeError(f"engine {engine!r}: {text}")

    def _spawn(self, name: str, resume: dict[str, dict[str, int]]) -> mp.Process:
        assert self.control is not None
        p = self._spawner.Process(target=_child_main, name=f"graphflow {name}", daemon=True,
                                  args=(self.graph, self.host_of, name, self.rundir, self.control.endpoint,
                                        list(sys.path), os.getpid(), self.interval, resume))
        p.start()
        # its pid file at once, not only once the child runs: a child that dies while starting still
        # has its shared-memory leases forgiven (producers waiting for slots would hang otherwise)
        Path(self.rundir, f"pid-{name}").write_text(str(p.pid))
        return p

    def _supervise(self) -> None:
        """Until every engine has ended: messages, the start barrier, deaths and restarts, stalls, stopping."""
        assert self.local is not None and self.supervisor is not None and self.control is not None
        next_progress = self.clock()
        while self.local.alive() or self.supervisor.waiting():
            for name, kind, payload in self.control.receive(50):
                self._on_message(name, kind, payload)
            self._open_gate()
            self.supervisor.check(stopping=self.stopping_since is not None)
            assert self.graveyard is not None
            self.graveyard.drain()
            if (self.signals or self.local.stop.is_set()) and self.stopping_since is None:
                self._begin_stop()
            if self.signals > 1 or (self.stopping_since is not None
                                    and self.clock() - self.stopping_since > self.timeout):
                self._force_stop()
                return
            if self.clock() >= next_progress:  # engines' metrics() are read at the stats interval only
                next_progress = self.clock() + self.interval
                for s in self.local.snapshot():
                    self.tally.update(s)
                self._watchdog()
                if self.on_progress:
                    self.on_progress(self.tally.all())

    def _on_message(self, name: str, kind: str, payload: Any) -> None:
        assert self.supervisor is not None and self.local is not None
        if kind == "stats":
            for s in payload:
                self.tally.update(s)
            self.supervisor.reported(name, [s["state"] for s in payload])
        elif kind == "ready":
            self.supervisor.ready(name)
            if self.local.go.is_set():  # a restarted process
                self._go(name)
                self._ended_inputs(name)
        elif kind == "reply":
            req, ok, result = payload
            with self._reply_ready:
                self._replies[req] = (ok, result)
                self._reply_ready.notify_all()
        elif kind == "exited":
            self.errlog.add(payload)
            first = payload.splitlines()[0]
            self.supervisor.exited(name, first[first.find("exited early"):])
        elif kind == "stop":
            self.local.stop.set()
            self._report(kind, payload)
        else:
            self._report(kind, payload)

    def _go(self, name: str) -> None:
        """Let a child's sources start: only once it said it is ready, so its handler is installed."""
        assert self.supervisor is not None
        child = self.supervisor.children[name]
        if child.ready and child.proc.is_alive():
            try:
                os.kill(child.proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def _ended_inputs(self, name: str) -> None:
        """A restarted child's inputs whose producers ended (or died for good) while it was down: their
        end-of-stream went to the dead incarnation, so it is sent again."""
        assert self.graveyard is not None and self.local is not None
        for s in self.local.snapshot():  # this process's producers as they are now
            self.tally.update(s)
        for i, e in enumerate(self.graph.edges):
            if self.host_of[e.dst] == name and self.host_of[e.src] != name \
                    and self.tally[e.src]["state"] in ("done", "failed", "exited", "died"):
                self.graveyard.end(i)

    def _open_gate(self) -> None:
        """Once every engine is set up (or its process is dead), let the sources start."""
        assert self.local is not None and self.supervisor is not None
        children = self.supervisor.children.values()
        if not self.local.go.is_set() and self.local.ready() and all(c.ready or not c.proc.is_alive()
                                                                     for c in children):
            self.local.go.set()
            for name in self.supervisor.children:
                self._go(name)
            self.started.set()

    def _engine_error(self, engine: str, text: str) -> None:
        self.errlog.add(text)

    def _gone(self, child: Child, cause: str, gave_up: bool) -> None:
        """A child that will not run again: its consumers get end-of-stream, its inputs are discarded; past its
        restart budget an engine with inputs means the graph cannot deliver, so the graph is stopped."""
        assert self.graveyard is not None and self.local is not None
        self.failed = True
        text = f"{child.what} (process {child.proc.pid}) died: {cause}; "
        if gave_up:
            text += f"gave up after {child.restarts} restarts; "
            if any(not n.cls.is_source() for n in child.nodes):
                self.stop_reason = self.stop_reason or f"{child.what} gave up: the graph cannot deliver without it"
                self.local.stop.set()
                text += "stopping the graph; "
        self.errlog.add(text + "consumers in other processes get end-of-stream, inputs from them are discarded")
        for node in child.nodes:
            self.tally.set(node.id, state="died")
            self.graveyard.bury(node)

    def _watchdog(self) -> None:
        """Report, once each, an engine holding one message longer than `watchdog_s`, and a child process that
        has not reported for that long (stopped, or stuck where even its stats thread cannot run)."""
        assert self.supervisor is not None
        if not self.watchdog_s:
            return
        for engine, s in self.tally.all().items():
            held = s.get("holding") or {}
            key = (engine, held.get("stream"), held.get("seq"))
            if held and held["s"] > self.watchdog_s and key not in self.flagged:
                self.flagged.add(key)
                self._warn(engine, f"watchdog: engine {engine!r} has held stream {held['stream']!r} frame "
                                   f"{held['seq']} for {held['s']:.0f}s (watchdog_s {self.watchdog_s:g})")
        for child, age in self.supervisor.silent(self.clock(), self.watchdog_s):
            key = (child.name, child.proc.pid)
            if key not in self.flagged:
                self.flagged.add(key)
                held = [f"; {n.id!r} last held stream {h['stream']!r} frame {h['seq']}" for n in child.nodes
                        if (h := self.tally[n.id].get("holding"))]
                self._warn(child.nodes[0].id, f"watchdog: {child.what} (process {child.proc.pid}) has not reported "
                                              f"for {age:.0f}s: stopped or stuck{''.join(held)}")

    def _warn(self, engine: str, text: str) -> None:
        self.warnings[engine] = self.warnings.get(engine, 0) + 1
        self.errlog.add(text)

    def _begin_stop(self) -> None:
        """Drain: sources stop producing and send end-of-stream; the rest finishes what it holds."""
        assert self.local is not None and self.supervisor is not None
        self.stopping_since = self.clock()
        self.stop_reason = self.stop_reason or "engine error"
        self.local.request_stop()
        for child in self.supervisor.children.values():
            if child.proc.is_alive():
                os.kill(child.proc.pid, signal.SIGTERM)

    def _force_stop(self) -> None:
        """A second signal, or a drain longer than `shutdown_timeout`: collect the children's final counters,
        kill them and say which engines had not finished."""
        assert self.supervisor is not None and self.local is not None
        self.failed = True
        timed_out = self.signals <= 1
        self.stop_reason += f" (not drained in {self.timeout:g}s)" if timed_out else " (forced)"
        alive = [c for c in self.supervisor.children.values() if c.proc.is_alive()]
        self._final_reports(alive)
        for child in alive:
            child.proc.kill()
            if timed_out and not child.ended:
                self.errlog.add(f"{child.what} (process {child.proc.pid}) had not finished "
                                f"{self.timeout:g}s after the stop began: killed")
            for node in child.nodes:
                self.tally.add_lost(node.id, self._unfinished(node.id), "queued or held when the stop was forced")
        if timed_out:
            for actor in self.local.actors:
                if actor.thread.is_alive() and actor.stats.state not in ("done", "failed"):
                    self.errlog.add(f"engine {actor.node.id!r} had not finished {self.timeout:g}s after the "
                                    "stop began: left behind")

    def _unfinished(self, engine: str) -> int:
        """Messages sent to `engine` that it had not finished, as far as the counters tell: what its producers sent
        (those whose only consumer it is) beyond what it finished; else what it held at its last report."""
        s = self.tally[engine]
        held = max(0, s["received"] - s["finished"]) + s["depth"]
        producers = {e.src for e in self.graph.edges if e.dst == engine}
        if not producers or any(sum(1 for x in self.graph.edges if x.src == p) != 1 for p in producers):
            return held
        finished = s["finished"]
        consumers = {e.dst for e in self.graph.edges if e.src == engine}
        if consumers and all({e.src for e in self.graph.edges if e.dst == c} == {engine} for c in consumers) \
                and len(self.graph.nodes[engine].cls.outputs) == 1:
            # what its own consumers received from it is newer than its last report (a stopped process reports
            # nothing): one message out per message in, as most engines do, at most
            finished = max(finished, max(self.tally[c]["received"] for c in consumers))
        return max(held, sum(self.tally[p]["sent"] for p in producers) - finished)

    def _final_reports(self, alive: list[Child]) -> None:
        """Ask each live child for its final counters (SIGUSR2) and wait for them a little, so the summary does
        not mix a stale count of one engine with a fresh one of its consumer."""
        assert self.control is not None
        asked = self.clock()
        for child in alive:
            try:
                os.kill(child.proc.pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
        pending = {n.id for c in alive for n in c.nodes}
        while pending and self.clock() - asked < 1.5:
            for name, kind, payload in self.control.receive(50):
                self._on_message(name, kind, payload)
            pending = {e for e in pending if self.tally.reported_at.get(e, -1.0) < asked}

    def _close(self) -> None:
        """Every exit path: children joined (killed if they linger), last reports read, this host closed."""
        if self.supervisor is not None:
            for child in self.supervisor.children.values():
                child.proc.join(0.5 if not self.failed else 0)
                if child.proc.is_alive():
                    child.proc.kill()
                    child.proc.join(2)
        if self.control is not None:
            for name, kind, payload in self.control.receive(100):
                if kind == "stats":
                    for s in payload:
                        self.tally.update(s)
        if self.local is not None:
            self.local.close()
            for s in self.local.snapshot():
                self.tally.update(s)
        if self.graveyard is not None:
            self.graveyard.close()
        if self.control is not None:
            self.control.close()
        with self._command_lock:
            for sock in self._command_socks.values():
                sock.close()
            self._command_socks.clear()

    def _summary(self, wall_s: float) -> Summary:
        if self.graveyard is not None:
            for engine, n in self.graveyard.discarded.items():
                self.tally.set(engine, discarded=n)
                self.tally.add_lost(engine, n, "inputs discarded after it died")
        stats = self.tally.all()
        lost = {f"{e}: {reason}": n for e, s in stats.items() for reason, n in s["lost_reasons"].items() if n}
        for e, s in stats.items():  # what an engine counts itself (publish: items its sinks did not write)
            n = (s.get("metrics") or {}).get("lost")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                lost[f"{e}: counted lost by the engine (metrics.lost)"] = n
        errors = {e: s["errors"] + self.warnings.get(e, 0) for e, s in stats.items()}
        return Summary(stats, self.errors, wall_s, self.stop_reason, self.failed, sum(lost.values()), lost,
                       {e: n for e, n in errors.items() if n})


def run(graph: Graph, on_progress: Callable[[dict[str, dict]], None] | None = None,
        handle_signals: bool = True) -> Summary:
    """Run `graph` to completion (all sources ended) or until SIGINT/SIGTERM/SIGHUP (a closed terminal): the
    first drains the graph, a second forces the stop. Returns the Summary."""
    launcher = Launcher(graph, on_progress)
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, launcher.on_signal)
    try:
        return launcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
