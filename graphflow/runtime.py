"""Runs a Graph: engine actors in threads (this process) or child processes, wired by channels."""
from __future__ import annotations

import ctypes
import inspect
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np
import zmq

from .channel import Closed, Inbox, LocalLink, ZmqLink, ZmqPump, encode
from .shm import MIN_BYTES, ShmContext, SlotPool
from .engine import Engine
from .errors import GraphflowError
from .graph import Graph, Node
from .message import EOS, Message

log = logging.getLogger(__name__)
MAIN = "main"


@dataclass
class Stats:
    """Counters of one engine, sent to the launcher for progress and the final summary."""

    engine: str
    received: int = 0
    sent: int = 0
    errors: int = 0
    busy_s: float = 0.0  # wall time inside the engine's own code (its sends excluded)
    runtime_cpu_s: float = 0.0  # CPU time of the runtime working for this engine: queues, channels, sends
    dropped: int = 0
    depth: int = 0
    state: str = "starting"
    streams: dict[str, int] = field(default_factory=dict)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class Actor:
    """One engine instance and the thread that feeds it: setup → process… → flush → EOS → teardown."""

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
        self.engine._send = self._send
        self.engine._alloc = self._alloc
        self.pools = pools or {}  # port → (shared-memory pool, how long to wait for a slot; None: until closing)
        self.closing = closing or threading.Event()
        self.shm_drops = 0
        self._setup_tries_left = node.max_restarts if node.restart == "on-failure" else 0
        self.thread = threading.Thread(target=self.run, name=f"engine:{node.id}", daemon=True)
        self._loop: Any = None
        self._send_lock = threading.Lock()  # engines may send from their own worker threads
        self._engine_cpu = 0.0  # CPU of this actor's thread inside engine calls (sends included)
        self._send_cpu = 0.0    # CPU of sends not already counted outside engine calls
        self._send_wall = 0.0   # wall time of sends and slot waits inside engine calls (taken off busy_s)
        self._in_engine = False
        self._thread_cpu = 0.0  # the actor thread's CPU when it ended

    def _send(self, msg: Message, port: str) -> None:
        links = self.outlets.get(port)
        if links is None:
            raise ValueError(f"engine {self.node.id!r} has no output port {port!r} "
                             f"(outputs: {', '.join(self.node.cls.outputs) or 'none'})")
        msg.times[self.node.id] = time.time()
        # a send from inside engine code or from another thread is runtime work not counted elsewhere
        # (a source's sends, between its engine calls, already are): only then is it timed
        mine = threading.current_thread() is self.thread
        timed = self._in_engine or not mine
        if timed:
            t0, c0 = time.perf_counter(), time.thread_time()
        with self._send_lock:
            try:
                remote = self._to_shared_memory(msg, port)
                for link in links:
                    if not remote and isinstance(link, ZmqLink):
                        self.shm_drops += 1
                        continue
                    link.send(msg, self.engine.stopping)
                self.stats.sent += 1
            finally:
                if timed:
                    self._send_cpu += time.thread_time() - c0
                    if mine:
                        self._send_wall += time.perf_counter() - t0

    def _to_shared_memory(self, msg: Message, port: str) -> bool:
        """Put the message's large arrays into the port's pool (once for every consumer process);
        False when no slot came free in time on a drop-policy channel: the message skips those consumers."""
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

    def _alloc(self, shape: tuple, dtype: np.dtype, port: str) -> np.ndarray:
        entry = self.pools.get(port)
        if entry is not None and math.prod(shape) * dtype.itemsize >= MIN_BYTES:
            t0 = time.perf_counter()
            arr = entry[0].acquire(shape, dtype, self.closing, entry[1])
            if self._in_engine and threading.current_thread() is self.thread:
                self._send_wall += time.perf_counter() - t0  # waiting for a free slot is back-pressure, not work
            if arr is not None:
                return arr
        return np.empty(shape, dtype)

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
        self.report("error", text)
        if what == "generate":
            self.report("failed", f"source {self.node.id!r} failed")  # the run's exit code says so
        if what == "setup" and self._setup_tries_left:
            return  # run() tries again after a back-off
        if self.node.on_error == "stop" or what in ("setup", "check"):
            self.report("stop", f"engine {self.node.id!r} {what} failed")
            self.graph_stop.set()

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any, msg: Message | None = None) -> bool:
        self._enter()
        try:
            self._call(fn, *args)
            return True
        except Closed:
            return False
        except Exception:
            self._fail(what, msg)
            return False
        finally:
            self._leave()

    def _enter(self) -> None:
        self._t0, self._c0, self._sent0 = time.perf_counter(), time.thread_time(), self._send_wall
        self._in_engine = True

    def _leave(self) -> None:
        self._in_engine = False
        self._engine_cpu += time.thread_time() - self._c0
        self.stats.busy_s += time.perf_counter() - self._t0 - (self._send_wall - self._sent0)

    def run(self) -> None:
        self.stats.state = "setup"
        ok = self._guarded("check", self.engine.check) and self._setup()
        self.ready.set()
        try:
            if ok:
                self.stats.state = "running"
                if self.node.cls.is_source():
                    self._run_source()
                else:
                    self._run_inbox()
                self.stats.state = "flushing"
                self._guarded("flush", self.engine.flush)
        finally:
            self._close_outputs()
            self._guarded("teardown", self.engine.teardown)
            if self._loop is not None:
                self._loop.__exit__(None, None, None)
            self._thread_cpu = time.thread_time()
            self.stats.state = "done" if ok else "failed"

    def _setup(self) -> bool:
        """setup(), tried again with exponential back-off while `restart: on-failure` allows."""
        tries = 0
        while not self._guarded("setup", self.engine.setup):
            if self._setup_tries_left == 0 or self.graph_stop.is_set():
                return False
            self._setup_tries_left -= 1
            tries += 1
            delay = min(0.5 * 2 ** (tries - 1), 8.0)
            self.report("error", f"engine {self.node.id!r}: setup retry {tries}/{self.node.max_restarts} in {delay:g}s")
            if self.graph_stop.wait(delay):
                return False
        return True

    def _run_source(self) -> None:
        while not self.go.wait(0.05):
            if self.engine.stopping.is_set() or self.graph_stop.is_set():
                return
        gen = self.engine.generate()
        try:
            while not self.engine.stopping.is_set() and not self.graph_stop.is_set():
                self._enter()
                try:
                    msg = next(gen)
                except StopIteration:
                    break
                except Exception:
                    self._leave()
                    self._fail("generate")
                    break
                finally:
                    if self._in_engine:
                        self._leave()
                if msg is not None:
                    msg.times.setdefault("capture", time.time())
                    self._count(msg)
                    try:
                        self._send(msg, "out")
                    except Closed:
                        break
        finally:
            gen.close()

    def _count(self, msg: Message) -> None:
        self.stats.received += 1
        self.stats.streams[msg.stream] = self.stats.streams.get(msg.stream, 0) + 1

    def _run_inbox(self) -> None:
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
            item.port = self.inbox.ports[i]
            self._count(item)
            self._guarded("process", self.engine.process, item, msg=item)

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
            self.stats.depth = self.inbox.depth()
        total = self._thread_cpu
        if self.thread.is_alive() and self.thread.ident is not None:
            try:
                total = time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))
            except OSError:  # the thread ended just now
                total = self._thread_cpu
        pump = self.inbox.pump_cpu if self.inbox is not None else 0.0
        self.stats.runtime_cpu_s = max(0.0, total - self._engine_cpu) + self._send_cpu + pump
        try:
            self.stats.metrics = dict(self.engine.metrics())
        except Exception as exc:  # a metrics bug must not stop the graph
            self.stats.metrics = {"error": f"metrics() failed: {exc}"}
        if self.pools:
            pools = [p for p, _ in self.pools.values()]
            self.stats.metrics["shm"] = {"slots_busy": sum(p.in_use() for p in pools), "waits": sum(p.waits for p in pools),
                                         "drops": self.shm_drops, "reclaimed": sum(p.reclaimed for p in pools)}
        return dict(self.stats.__dict__)


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
            self.actors.append(Actor(node, inboxes.get(node.id), outlets, report, self.stop, self.go,
                                     self._pools(graph, host_of, node), self.closing))

    def _pools(self, graph: Graph, host_of: dict[str, str], node: Node) -> dict[str, tuple[SlotPool, float | None]]:
        """A shared-memory pool for each output port of `node` with consumers in other processes."""
        pools = {}
        for port in node.cls.outputs:
            remote = [e for e in graph.edges if e.src == node.id and e.src_port == port and host_of[e.dst] != self.name]
            if remote:
                slots = max(e.slots or 2 * e.capacity + 8 for e in remote)
                lossless = any(e.policy == "block" for e in remote)
                pools[port] = (self.shm.pool(f"{node.id}.{port}", slots), None if lossless else 0.1)
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
                actor.engine.stopping.set()

    def ready(self) -> bool:
        """Every actor has finished (or failed) setup."""
        return all(a.ready.is_set() or not a.thread.is_alive() for a in self.actors)

    def alive(self) -> bool:
        return any(a.thread.is_alive() for a in self.actors)

    def close(self) -> None:
        self.closing.set()
        for actor in self.actors:
            actor.engine.stopping.set()
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


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the launcher dies, so no child is ever orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_main(graph: Graph, host_of: dict[str, str], name: str, rundir: str, control: str,
                sys_path: list[str], parent: int, interval: float) -> None:
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    sys.path[:] = sys_path
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    early_stop = threading.Event()  # a stop that arrives while the engines are still being built
    signal.signal(signal.SIGTERM, lambda *_: early_stop.set())
    ctx = zmq.Context.instance()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(control)
    lock = threading.Lock()

    def report(kind: str, text: str) -> None:
        with lock:
            out.send_pyobj((name, kind, text))

    try:
        host = Host(graph, host_of, name, rundir, report)
    except Exception:
        report("error", f"process {name!r} failed to start:\n{traceback.format_exc()}")
        report("stop", f"process {name!r} failed to start")
        out.close()
        _terminate(ctx, 5.0)
        return
    signal.signal(signal.SIGTERM, lambda *_: host.request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: host.go.set())
    if early_stop.is_set():
        host.request_stop()
    host.start()
    while not host.ready():
        time.sleep(0.01)
    report("ready", "")
    while host.alive():
        time.sleep(interval)
        if host.stop.is_set():
            report("stop", "")
            host.stop.clear()
        report("stats", host.snapshot())
    host.close()
    report("stats", host.snapshot())
    out.close()
    _terminate(ctx, graph.settings.get("shutdown_timeout", 10.0) / 2)


def _terminate(ctx: zmq.Context, wait_s: float) -> None:
    """Deliver what this process's closed sockets still queue before it exits, for up to `wait_s`. A
    process that exits without terminating its ZeroMQ context loses it, end-of-stream included, and its
    consumer then waits for it forever. The wait is bounded (a socket an engine left open, or one a
    stray engine thread still uses, would hold `term` forever), and no socket is closed from here."""
    t = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    t.start()
    t.join(wait_s)


@dataclass
class Summary:
    """What a run did: per-engine stats, errors, wall time and how it ended."""

    stats: dict[str, dict[str, Any]]
    errors: list[str]
    wall_s: float
    stopped_by: str = ""
    failed: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


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
                push = self.ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 1000)
                push.connect(f"ipc://{self.rundir}/e{i}")
                push.send_multipart(encode(EOS), zmq.NOBLOCK)
                self.socks.append((push, ""))
            if e.dst == node.id:
                pull = self.ctx.socket(zmq.PULL)
                pull.setsockopt(zmq.LINGER, 0)
                pull.bind(f"ipc://{self.rundir}/e{i}")
                self.socks.append((pull, node.id))
        self.discarded.setdefault(node.id, 0)

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


class Launcher:
    """Starts every host (this process + one child per process-placed engine or process group), supervises, stops."""

    def __init__(self, graph: Graph, on_progress: Callable[[dict[str, dict]], None] | None = None) -> None:
        self.graph = graph
        self.on_progress = on_progress
        self.host_of = hosts(graph)
        self.errors: list[str] = []
        self.stats: dict[str, dict[str, Any]] = {}
        self.stop_reason = ""
        self.signals = 0
        self.failed = False

    def _report(self, kind: str, text: Any) -> None:
        if kind == "error":
            self.errors.append(text)
            log.error("%s", text)
        elif kind == "stop" and text:
            self.failed = True
            self.stop_reason = self.stop_reason or text
        elif kind == "failed":
            self.failed = True

    def on_signal(self, signum: int, _frame: Any = None) -> None:
        self.signals += 1
        self.stop_reason = self.stop_reason or signal.Signals(signum).name

    def run(self) -> Summary:
        t0 = time.monotonic()
        rundir = tempfile.mkdtemp(prefix="graphflow-")
        ctx = zmq.Context.instance()
        control = ctx.socket(zmq.PULL)
        control.setsockopt(zmq.LINGER, 0)
        control_ep = f"ipc://{rundir}/control"
        control.bind(control_ep)
        interval = self.graph.settings.get("stats_interval", 0.5)
        local = Host(self.graph, self.host_of, MAIN, rundir, self._report)
        self.graveyard = Graveyard(self.graph, self.host_of, rundir, ctx)
        spawn = mp.get_context("spawn")

        def start(name: str) -> mp.Process:
            p = spawn.Process(target=_child_main, name=f"graphflow {name}", daemon=True,
                              args=(self.graph, self.host_of, name, rundir, control_ep, list(sys.path),
                                    os.getpid(), interval))
            p.start()
            # its pid file at once, not only once the child runs: a child that dies while starting still
            # has its shared-memory leases forgiven (producers waiting for slots would hang otherwise)
            Path(rundir, f"pid-{name}").write_text(str(p.pid))
            return p
        children = {name: start(name) for name in sorted(set(self.host_of.values()) - {MAIN})}
        restarts = {name: 0 for name in children}
        due: dict[str, float] = {}  # process → when it restarts
        self.rundir = rundir
        local.start()
        ready: set[str] = set()
        stopping_since: float | None = None
        timeout = self.graph.settings.get("shutdown_timeout", 10.0)
        next_progress = time.monotonic()
        try:
            while local.alive() or any(p.is_alive() for p in children.values()) or due:
                # what has arrived, then on to the checks below: `while poll(50)` never left the loop
                # while children reported more often than every 50 ms (stats_interval 0.01 held every
                # source back for seconds)
                for _ in range(1000 if control.poll(50) else 0):
                    try:
                        name, kind, payload = control.recv_pyobj(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if kind == "stats":
                        for s in payload:
                            self.stats[s["engine"]] = s
                    elif kind == "ready":
                        ready.add(name)
                        if local.go.is_set() and children[name].is_alive():  # a restarted process
                            os.kill(children[name].pid, signal.SIGUSR1)
                    elif kind == "stop":
                        local.stop.set()
                        self._report(kind, payload)
                    else:
                        self._report(kind, payload)
                if not local.go.is_set() and local.ready() and all(
                        n in ready or not p.is_alive() for n, p in children.items()):
                    local.go.set()  # every engine is set up: let the sources start
                    for p in children.values():
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGUSR1)
                for name, p in children.items():
                    if name not in due and not p.is_alive() and p.exitcode not in (0, None) \
                            and not getattr(p, "_gf_reported", False):
                        p._gf_reported = True
                        ready.discard(name)
                        nodes = [n for n in self.graph.nodes.values() if self.host_of[n.id] == name]
                        what = (f"engine {nodes[0].id!r}" if len(nodes) == 1
                                else f"engines {', '.join(repr(n.id) for n in nodes)}")
                        cause = (f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
                                 else f"exit code {p.exitcode}")
                        # a shared process restarts only if every engine in it asks for that, at most as often as
                        # the strictest of them allows
                        limit = min(n.max_restarts for n in nodes)
                        if all(n.restart == "on-failure" for n in nodes) and restarts[name] < limit \
                                and stopping_since is None:
                            restarts[name] += 1
                            delay = min(0.5 * 2 ** (restarts[name] - 1), 8.0)
                            due[name] = time.monotonic() + delay
                            self._report("error", f"{what} (process {p.pid}) died: {cause}; restart "
                                                  f"{restarts[name]}/{limit} in {delay:g}s")
                        else:
                            self._report("error", f"{what} (process {p.pid}) died: {cause}; "
                                                  "consumers in other processes get end-of-stream, inputs from "
                                                  "them are discarded")
                            self.failed = True
                            for node in nodes:
                                self.stats.setdefault(node.id, {"engine": node.id})["state"] = "died"
                                self.graveyard.bury(node)
                for name, when in list(due.items()):
                    if time.monotonic() >= when:
                        del due[name]
                        if stopping_since is None:
                            children[name] = start(name)
                self.graveyard.drain()
                if (self.signals or local.stop.is_set()) and stopping_since is None:
                    stopping_since = time.monotonic()
                    self.stop_reason = self.stop_reason or "engine error"
                    local.request_stop()
                    for p in children.values():
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGTERM)
                if self.signals > 1 or (stopping_since and time.monotonic() - stopping_since > timeout):
                    self.failed = True
                    self.stop_reason += " (forced)" if self.signals > 1 else f" (not drained in {timeout:g}s)"
                    break
                if time.monotonic() >= next_progress:  # engines' metrics() are read at the stats interval only
                    next_progress = time.monotonic() + interval
                    for s in local.snapshot():
                        self.stats[s["engine"]] = s
                    if self.on_progress:
                        self.on_progress(self.stats)
        finally:
            for p in children.values():
                p.join(0.5 if not self.failed else 0)
                if p.is_alive():
                    p.kill()
                    p.join(2)
            while control.poll(100):
                name, kind, payload = control.recv_pyobj()
                if kind == "stats":
                    for s in payload:
                        self.stats[s["engine"]] = s
            local.close()
            self.graveyard.close()
            for s in local.snapshot():
                self.stats[s["engine"]] = s
            control.close()
            shutil.rmtree(rundir, ignore_errors=True)
        for engine, n in self.graveyard.discarded.items():
            self.stats[engine]["discarded"] = n
        ordered = {n: self.stats[n] for n in self.graph.nodes if n in self.stats}
        return Summary(ordered, self.errors, time.monotonic() - t0, self.stop_reason, self.failed)


def run(graph: Graph, on_progress: Callable[[dict[str, dict]], None] | None = None,
        handle_signals: bool = True) -> Summary:
    """Run `graph` to completion (all sources ended) or until SIGINT/SIGTERM; returns the Summary."""
    launcher = Launcher(graph, on_progress)
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, launcher.on_signal)
    try:
        return launcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
