"""Runs a Graph: engine actors in threads (this process) or child processes, wired by channels."""
from __future__ import annotations

import ctypes
import inspect
import logging
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
from typing import Any, Callable

import anyio
import zmq

from .channel import Closed, Inbox, LocalLink, ZmqLink, ZmqPump
from .engine import Engine
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
    busy_s: float = 0.0
    dropped: int = 0
    depth: int = 0
    state: str = "starting"
    streams: dict[str, int] = field(default_factory=dict)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class Actor:
    """One engine instance and the thread that feeds it: setup → process… → flush → EOS → teardown."""

    def __init__(self, node: Node, inbox: Inbox | None, outlets: dict[str, list[Any]],
                 report: Callable[[str, str], None], stop: threading.Event, go: threading.Event) -> None:
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
        self.thread = threading.Thread(target=self.run, name=f"engine:{node.id}", daemon=True)
        self._loop: Any = None
        self._send_lock = threading.Lock()  # engines may send from their own worker threads

    def _send(self, msg: Message, port: str) -> None:
        links = self.outlets.get(port)
        if links is None:
            raise ValueError(f"engine {self.node.id!r} has no output port {port!r} "
                             f"(outputs: {', '.join(self.node.cls.outputs) or 'none'})")
        msg.times[self.node.id] = time.time()
        with self._send_lock:
            for link in links:
                link.send(msg, self.engine.stopping)
            self.stats.sent += 1

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
        text = f"engine {self.node.id!r} failed in {what}{where}:\n{traceback.format_exc()}"
        self.stats.error = text.splitlines()[-1]
        self.report("error", text)
        if self.node.on_error == "stop" or what in ("setup", "check"):
            self.report("stop", f"engine {self.node.id!r} {what} failed")
            self.graph_stop.set()

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any, msg: Message | None = None) -> bool:
        t0 = time.perf_counter()
        try:
            self._call(fn, *args)
            return True
        except Closed:
            return False
        except Exception:
            self._fail(what, msg)
            return False
        finally:
            self.stats.busy_s += time.perf_counter() - t0

    def run(self) -> None:
        self.stats.state = "setup"
        ok = self._guarded("check", self.engine.check) and self._guarded("setup", self.engine.setup)
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
            self.stats.state = "done" if ok else "failed"

    def _run_source(self) -> None:
        while not self.go.wait(0.05):
            if self.engine.stopping.is_set() or self.graph_stop.is_set():
                return
        gen = self.engine.generate()
        try:
            while not self.engine.stopping.is_set() and not self.graph_stop.is_set():
                t0 = time.perf_counter()
                try:
                    msg = next(gen)
                except StopIteration:
                    break
                except Exception:
                    self.stats.busy_s += time.perf_counter() - t0
                    self._fail("generate")
                    break
                self.stats.busy_s += time.perf_counter() - t0
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
        try:
            self.stats.metrics = self.engine.metrics()
        except Exception as exc:  # a metrics bug must not stop the graph
            self.stats.metrics = {"error": f"metrics() failed: {exc}"}
        return dict(self.stats.__dict__)


class Host:
    """The actors of one OS process, their channels, and the stop/stats plumbing for them."""

    def __init__(self, graph: Graph, host_of: dict[str, str], name: str, rundir: str,
                 report: Callable[[str, str], None]) -> None:
        self.name = name
        self.stop = threading.Event()
        self.go = threading.Event()
        self.ctx = zmq.Context.instance()
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
            self.pumps.append(ZmqPump(self.ctx, inbox, remote))
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
                    outlets[e.src_port].append(ZmqLink(self.ctx, endpoints[i]))
            self.actors.append(Actor(node, inboxes.get(node.id), outlets, report, self.stop, self.go))

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


class Launcher:
    """Starts every host (this process + one child per process-placed engine), supervises, stops."""

    def __init__(self, graph: Graph, on_progress: Callable[[dict[str, dict]], None] | None = None) -> None:
        self.graph = graph
        self.on_progress = on_progress
        self.host_of = {n.id: (MAIN if n.placement == "thread" else f"proc:{n.id}") for n in graph.nodes.values()}
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
        spawn = mp.get_context("spawn")
        children: dict[str, mp.Process] = {}
        for name in sorted(set(self.host_of.values()) - {MAIN}):
            p = spawn.Process(target=_child_main, name=f"graphflow {name}", daemon=True,
                              args=(self.graph, self.host_of, name, rundir, control_ep, list(sys.path),
                                    os.getpid(), interval))
            p.start()
            children[name] = p
        local.start()
        ready: set[str] = set()
        stopping_since: float | None = None
        timeout = self.graph.settings.get("shutdown_timeout", 10.0)
        next_progress = time.monotonic()
        try:
            while local.alive() or any(p.is_alive() for p in children.values()):
                while control.poll(50):
                    name, kind, payload = control.recv_pyobj()
                    if kind == "stats":
                        for s in payload:
                            self.stats[s["engine"]] = s
                    elif kind == "ready":
                        ready.add(name)
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
                    if not p.is_alive() and p.exitcode not in (0, None) and not getattr(p, "_gf_reported", False):
                        p._gf_reported = True
                        self._report("error", f"process {name!r} died with exit code {p.exitcode}")
                        self.failed = True
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
                for s in local.snapshot():
                    self.stats[s["engine"]] = s
                if self.on_progress and time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + interval
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
            for s in local.snapshot():
                self.stats[s["engine"]] = s
            control.close()
            shutil.rmtree(rundir, ignore_errors=True)
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
