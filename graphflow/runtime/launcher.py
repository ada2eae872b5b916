"""The launcher, the run's control plane: starts every process of a graph, supervises it, stops it and
sums up what happened (thread engines run in the launcher's own process)."""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import zmq

from graphflow.errors import GraphflowError
from graphflow.graph.model import Graph, Node
from graphflow.runtime.actor import Stats
from graphflow.runtime.child import child_main, command_endpoint
from graphflow.runtime.ledger import totals
from graphflow.runtime.links import ack_path
from graphflow.runtime.process import EngineProcess
from graphflow.runtime.summary import Graveyard, Summary
from graphflow.runtime.supervise import MAIN, Child, ErrorLog, Supervisor, Tally, make_rundir


def hosts(graph: Graph) -> dict[str, str]:
    """The OS process of each engine: MAIN (this one) for thread placement, `proc:ID` for a process of its own,
    `group:NAME` for the one that all engines placed `process:NAME` share."""
    def host(node: Node) -> str:
        kind, _, group = node.placement.partition(":")
        return MAIN if kind == "thread" else f"group:{group}" if group else f"proc:{node.id}"
    return {n.id: host(n) for n in graph.nodes.values()}


class ControlSocket:
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
                 clock: Callable[[], float] = time.monotonic, services: Mapping[str, Any] | None = None) -> None:
        self.graph = graph
        self.services = services or {}  # handed to the engines placed in this process (EngineContext.service)
        self.on_progress = on_progress
        self.clock = clock
        self.host_of = hosts(graph)
        self.errlog = ErrorLog()
        self.tally = Tally({n: Stats(n).__dict__ for n in graph.nodes}, clock)
        self.stop_reason = ""
        self.signals = 0
        self.failed = False
        self.forced = False  # the stop was forced: what was in flight is counted by _unfinished instead
        self.pending_ends: dict[int, float] = {}  # edge → since when its end-of-stream may have to be sent again
        settings = graph.settings
        self.interval = settings.get("stats_interval", 0.5)
        self.timeout = settings.get("shutdown_timeout", 10.0)
        self.watchdog_s = settings.get("watchdog_s", 30.0)
        self.flagged: set[tuple] = set()  # what the watchdog reported already
        self.warnings: dict[str, int] = {}  # engine → watchdog reports
        self.stopping_since: float | None = None
        self.rundir = ""
        self.control: ControlSocket | None = None
        self.local: EngineProcess | None = None
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

    def down(self) -> dict[str, tuple[bool, str]]:
        """Engines that are not running while the graph runs, from any thread: engine → (gone for good, why); a
        process that died and waits for its restart is down but not gone."""
        out = self.supervisor.down() if self.supervisor is not None else {}
        for actor in self.local.actors if self.local is not None else ():
            if actor.stats.state == "exited":
                out[actor.node.id] = (True, f"engine {actor.node.id!r} {actor.stats.error}")
        return out

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
        self.control = ControlSocket(ctx, self.rundir)
        self.local = EngineProcess(self.graph, self.host_of, MAIN, self.rundir, self._report, self.services)
        self.graveyard = Graveyard(self.graph, self.host_of, self.rundir, ctx)
        self._spawner = mp.get_context("spawn")
        self.supervisor = Supervisor(self.graph, self.host_of, self.tally, self._spawn, self._engine_error,
                                     self._gone, self.clock, self.rundir)
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
        p = self._spawner.Process(target=child_main, name=f"graphflow {name}", daemon=True,
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
            if self.pending_ends:
                self._resend_ends()
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
        """A restarted child's inputs whose producers ended (or died for good) while it was down. Their
        end-of-stream may have gone to the dead incarnation (it acknowledged it: sent again now), died with it in
        the socket buffers, or still wait in the producer's queue for the new one: sent again only once that
        input is quiet (_resend_ends), so it never overtakes messages still on their way."""
        assert self.graveyard is not None and self.local is not None
        for s in self.local.snapshot():  # this process's producers as they are now
            self.tally.update(s)
        for i, e in enumerate(self.graph.edges):
            if self.host_of[e.dst] == name and self.host_of[e.src] != name \
                    and self.tally[e.src]["state"] in ("done", "failed", "exited", "died"):
                if os.path.exists(ack_path(f"ipc://{self.rundir}/e{i}")):
                    self.graveyard.end(i)
                else:
                    self.pending_ends[i] = self.clock()

    def _resend_ends(self) -> None:
        """Send end-of-stream again on a restarted consumer's ended input that is quiet (its queue empty and
        nothing new taken for a while) and still has not had it."""
        assert self.graveyard is not None
        quiet = max(1.0, 4 * self.interval)
        now = self.clock()
        for i, since in list(self.pending_ends.items()):
            e = self.graph.edges[i]
            if os.path.exists(ack_path(f"ipc://{self.rundir}/e{i}")):
                del self.pending_ends[i]  # the producer's own end arrived
            elif (self.tally.reported_at.get(e.dst, -1.0) > since + quiet and not self.tally[e.dst].get("depth")
                  and now - self.tally.moved_at.get((e.dst, e.dst_port), since) >= quiet):
                del self.pending_ends[i]
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
        self.failed = self.forced = True
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
            self.graveyard.drain()
            self._lost_in_flight()
            self.graveyard.close()
        if self.control is not None:
            self.control.close()
        with self._command_lock:
            for sock in self._command_socks.values():
                sock.close()
            self._command_socks.clear()

    def _lost_in_flight(self) -> None:
        """Messages handed to a connection that no incarnation of its consumer (nor the graveyard) took off the
        socket: they vanished with a process that died, in the socket buffers between the two. Counted lost for the
        consumer, from the ledgers' exact counts, unless a restarted source sends them again (it resumes after
        what its consumers received)."""
        assert self.supervisor is not None and self.graveyard is not None
        children = self.supervisor.children
        died = {name for name, c in children.items() if c.died is not None}
        if self.forced or not died:
            return
        edges, _ = totals(self.rundir, len(self.graph.edges), len(self.graph.nodes))
        for i, e in enumerate(self.graph.edges):
            src, dst = self.host_of[e.src], self.host_of[e.dst]
            resent = self.graph.nodes[e.src].cls.is_source() and src in died and not children[src].gone
            if src == dst or not {src, dst} & died or resent:
                continue
            gap = int(edges[i][0] - edges[i][1]) - self.graveyard.arrived.get(i, 0)
            if gap > 0:
                self.tally.add_lost(e.dst, gap, f"in flight from {e.src!r} when a process died")

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
