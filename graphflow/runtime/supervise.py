"""The launcher's watch over engines: process deaths and restarts (with a budget that heals), resume points for
restarted sources, stats that survive restarts, rate-limited errors, stall reports and run folders."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from graphflow.graph.model import Graph, Node
from graphflow.runtime.backoff import backoff
from graphflow.runtime.ledger import ledger_path, read

log = logging.getLogger(__name__)
MAIN = "main"  # the launcher's own process, where thread-placed engines run
ENDED = ("done", "failed")  # states of an engine that finished its run (a failed setup included)
ADDED = ("received", "sent", "errors", "busy_s", "runtime_cpu_s", "dropped", "finished", "lost", "discarded")
Clock = Callable[[], float]


# ---- run folders -------------------------------------------------------------------------------------------
def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if it does not exist): with the pid, it names one
    process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def make_rundir() -> str:
    """A fresh `graphflow-*` run folder holding its owner's identity; stale ones of dead owners are removed first."""
    clean_stale_rundirs()
    path = tempfile.mkdtemp(prefix="graphflow-")
    Path(path, "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}")
    return path


def clean_stale_rundirs(parent: str | None = None) -> list[str]:
    """Remove `graphflow-*` run folders whose owner process is gone (a launcher killed by SIGKILL leaves one);
    folders without an owner file may be being made right now, so they stay."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob("graphflow-*"):
        try:
            pid, started = Path(path, "owner").read_text().split()
        except (OSError, ValueError):
            continue
        if _start_time(int(pid)) != started:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


# ---- errors --------------------------------------------------------------------------------------------------
class Throttle:
    """Rate limit for one engine's errors: the first `first` pass in full, then one line per `every` seconds
    says how many were held back, so an engine failing on every frame cannot flood logs or memory."""

    def __init__(self, first: int = 3, every: float = 10.0, clock: Clock = time.monotonic) -> None:
        self.first, self.every, self.clock = first, every, clock
        self.seen = 0
        self.held = 0
        self.last_line = 0.0

    def admit(self) -> bool:
        """Count one error; True when it is to be reported in full."""
        self.seen += 1
        if self.seen <= self.first:
            self.last_line = self.clock()
            return True
        self.held += 1
        return False

    def due(self, force: bool = False) -> int:
        """How many errors were held back, when a summary line is due now (or `force`); 0 otherwise."""
        if self.held and (force or self.clock() - self.last_line >= self.every):
            held, self.held, self.last_line = self.held, 0, self.clock()
            return held
        return 0


class ErrorLog:
    """The launcher's error texts, bounded: the first `keep` and the last `keep`, with a count of those between."""

    def __init__(self, keep: int = 20) -> None:
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=keep)
        self.keep = keep
        self.total = 0

    def add(self, text: str) -> None:
        self.total += 1
        log.error("%s", text)
        if len(self.head) < self.keep:
            self.head.append(text)
        else:
            self.tail.append(text)

    def texts(self) -> list[str]:
        between = self.total - len(self.head) - len(self.tail)
        return self.head + ([f"… {between} more errors not kept …"] if between > 0 else []) + list(self.tail)


# ---- stats across incarnations ---------------------------------------------------------------------------------
def _combine(base: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """`report` (the live incarnation's stats) on top of `base` (what dead ones counted): counters add up,
    per-stream counts add up, the last seq seen per port and stream is the newest."""
    out = {**base, **report}
    for key in ADDED:
        out[key] = base.get(key, 0) + report.get(key, 0)
    streams = dict(base.get("streams", {}))
    for stream, n in report.get("streams", {}).items():
        streams[stream] = streams.get(stream, 0) + n
    out["streams"] = streams
    seen = {port: dict(by) for port, by in base.get("last_seq", {}).items()}
    for port, by in report.get("last_seq", {}).items():
        seen.setdefault(port, {}).update(by)
    out["last_seq"] = seen
    reasons = dict(base.get("lost_reasons", {}))
    for reason, n in report.get("lost_reasons", {}).items():
        reasons[reason] = reasons.get(reason, 0) + n
    out["lost_reasons"] = reasons
    return out


class Tally:
    """Per-engine stats as the launcher keeps them: every engine always has a complete dict, and a restarted
    engine's counters continue (dead incarnations' counts plus the live one's)."""

    def __init__(self, blank: dict[str, dict[str, Any]], clock: Clock = time.monotonic) -> None:
        self.blank = blank
        self.clock = clock
        self.base: dict[str, dict[str, Any]] = {e: {} for e in blank}  # dead incarnations, summed
        self.live: dict[str, dict[str, Any]] = {e: dict(s) for e, s in blank.items()}  # the live one's last report
        self.own: dict[str, dict[str, Any]] = {e: {} for e in blank}  # launcher-set fields (state, restarts)
        self.reported_at: dict[str, float] = {}
        self.moved_at: dict[tuple[str, str], float] = {}  # (engine, port) → when its last seq received changed

    def update(self, report: dict[str, Any]) -> None:
        engine, now = report["engine"], self.clock()
        before = self.live[engine].get("last_seq", {})
        for port, seen in report.get("last_seq", {}).items():
            if seen != before.get(port):
                self.moved_at[(engine, port)] = now
        self.live[engine] = report
        self.reported_at[engine] = now

    def __getitem__(self, engine: str) -> dict[str, Any]:
        return {**_combine(self.base[engine], self.live[engine]), **self.own[engine]}

    def all(self) -> dict[str, dict[str, Any]]:
        return {e: self[e] for e in self.blank}

    def died(self, engine: str, cause: str, source: bool, held: int | None = None) -> int:
        """Close the live incarnation: its counts join the dead ones'. What it held (in its inbox or in process():
        `held`, exact from its ledger; else as its last report tells) is counted lost; returns that number."""
        last = self.live[engine]
        estimate = max(0, last.get("received", 0) - last.get("finished", 0)) + last.get("depth", 0)
        lost = 0 if source else estimate if held is None else held
        self.base[engine] = _combine(self.base[engine], last)
        self.live[engine] = {**self.blank[engine], "state": "restarting"}
        self.add_lost(engine, lost, f"held by the engine when it died ({cause})")
        self.base[engine]["errors"] = self.base[engine].get("errors", 0) + 1
        self.base[engine]["error"] = f"died: {cause}"
        return lost

    def add_lost(self, engine: str, n: int, reason: str) -> None:
        if n:
            base = self.base[engine]
            base["lost"] = base.get("lost", 0) + n
            base.setdefault("lost_reasons", {})[reason] = base.get("lost_reasons", {}).get(reason, 0) + n

    def set(self, engine: str, **fields: Any) -> None:
        self.own[engine].update(fields)


# ---- process supervision -----------------------------------------------------------------------------------------
@dataclass
class Child:
    """One child process and its history: restarts in the current budget window, when it died, when it restarts."""

    name: str
    nodes: list[Node]
    proc: Any  # multiprocessing.Process
    started: float
    restarts: int = 0
    ready: bool = False
    ended: bool = False  # its stats said every engine in it finished
    exit_seen: float | None = None  # exit code 0 seen, waiting briefly for the final stats that may follow
    died: float | None = None
    handled: bool = False  # the death of the current process was dealt with
    cause: str = ""  # what its engine said before it was killed (an early exit)
    due: float | None = None
    gone: bool = False
    death: str = ""  # the cause of its last death

    @property
    def what(self) -> str:
        return (f"engine {self.nodes[0].id!r}" if len(self.nodes) == 1
                else f"engines {', '.join(repr(n.id) for n in self.nodes)}")

    def waiting(self) -> bool:
        """Alive, or about to be started again."""
        return self.proc.is_alive() or self.due is not None or self.exit_seen is not None


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def exit_cause(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode} before its engines finished"


class Supervisor:
    """Watches the child processes. Any exit before a child's engines finished is a death (a signal, an error
    code, or exit code 0); per the engines' `restart` policy it is started again after a capped back-off, within
    a budget of `max_restarts` that heals after `restart_window` healthy seconds (as systemd's start limit does).
    A restarted source resumes after the last frame its consumers received."""

    EXIT_GRACE = 0.5  # how long a child that exited with code 0 may take for its final stats to arrive
    RESUME_WAIT = 15.0  # how long a restarting source waits for its consumers to take in what was on its way

    def __init__(self, graph: Graph, host_of: dict[str, str], tally: Tally,
                 spawn: Callable[[str, dict[str, dict[str, int]]], Any],
                 error: Callable[[str, str], None], gone: Callable[[Child, str, bool], None],
                 clock: Clock = time.monotonic, rundir: str = "") -> None:
        self.graph, self.host_of, self.tally, self.spawn = graph, host_of, tally, spawn
        self.rundir = rundir  # where each child's ledger is: what a dead one held, exactly
        self.error, self.gone, self.clock = error, gone, clock
        self.window = float(graph.settings.get("restart_window", 60.0))
        self.interval = float(graph.settings.get("stats_interval", 0.5))
        self.children: dict[str, Child] = {}
        for name in sorted(set(host_of.values()) - {MAIN}):
            nodes = [n for n in graph.nodes.values() if host_of[n.id] == name]
            self.children[name] = Child(name, nodes, spawn(name, {}), clock())

    def waiting(self) -> bool:
        return any(c.waiting() for c in self.children.values())

    def ready(self, name: str) -> None:
        self.children[name].ready = True

    def exited(self, name: str, cause: str) -> None:
        """An engine of the child ended early (SystemExit): the process is ended now and handled as a death."""
        child = self.children[name]
        child.cause = cause
        if child.proc.is_alive():
            child.proc.kill()

    def reported(self, name: str, states: list[str]) -> None:
        """A child's stats arrived: it has ended once every engine in it has."""
        self.children[name].ended = all(s in ENDED for s in states)

    def check(self, stopping: bool) -> None:
        """Notice deaths (restart or give up per policy), enforce memory limits, start the restarts that are due."""
        now = self.clock()
        for c in self.children.values():
            if c.gone or c.handled:
                continue
            if c.proc.is_alive():
                self._limit_memory(c)
                continue
            code = c.proc.exitcode
            if code == 0 and c.ended:
                c.exit_seen, c.handled = None, True
                continue
            if code == 0 and (c.exit_seen is None or now - c.exit_seen < self.EXIT_GRACE):
                c.exit_seen = c.exit_seen if c.exit_seen is not None else now  # its final stats may be on the way
                continue
            c.exit_seen = None
            self._died(c, c.cause or exit_cause(code), now, stopping)
        for c in self.children.values():
            if c.due is None or now < c.due:
                continue
            if stopping:
                c.due, c.gone = None, True
                self.gone(c, "not restarted: the graph is stopping", False)
                continue
            resume = self._resume(c, now)
            if resume is not None:
                c.due = None
                c.proc, c.started, c.ready, c.ended = self.spawn(c.name, resume), now, False, False
                c.handled, c.cause = False, ""

    def _limit_memory(self, c: Child) -> None:
        """Kill a child over the smallest `max_rss_mb` of its engines (0: no limit); it then dies as a crash does."""
        limit = min((n.max_rss_mb for n in c.nodes if getattr(n, "max_rss_mb", 0)), default=0)
        if limit and not c.cause:
            rss = rss_mb(c.proc.pid)
            if rss > limit:
                c.cause = f"memory limit: RSS {rss:.0f} MB over max_rss_mb {limit}"
                c.proc.kill()

    def _died(self, c: Child, cause: str, now: float, stopping: bool) -> None:
        c.died, c.ready, c.handled, c.death = now, False, True, cause
        held = self._held(c)
        for node in c.nodes:
            self.tally.died(node.id, cause, node.cls.is_source(), held.get(node.id))
        if now - c.started >= self.window:
            c.restarts = 0  # healthy long enough: the budget is whole again
        # a shared process restarts only if every engine in it asks for that, at most as often as the strictest allows
        limit = min(n.max_restarts for n in c.nodes)
        policy = all(n.restart == "on-failure" for n in c.nodes)
        if policy and c.restarts < limit and not stopping:
            c.restarts += 1
            delay = max(backoff(c.restarts), 0.5)
            c.due = now + delay
            for node in c.nodes:
                self.tally.set(node.id, restarts=self.tally[node.id].get("restarts", 0) + 1)
            self.error(c.nodes[0].id, f"{c.what} (process {c.proc.pid}) died: {cause}; restart {c.restarts}/{limit} "
                                      f"in {delay:g}s")
            return
        c.gone = True
        self.gone(c, cause, policy and not stopping)

    def _held(self, c: Child) -> dict[str, int]:
        """Per engine of the dead child, the messages it held (in its inbox or being processed), from its ledger."""
        if not self.rundir:
            return {}
        position = {eid: k for k, eid in enumerate(self.graph.nodes)}
        _, engines = read(ledger_path(self.rundir, c.name, c.proc.pid), len(self.graph.edges), len(self.graph.nodes))
        return {n.id: int(max(0, engines[position[n.id]] @ (1, -1, -1))) for n in c.nodes}

    def _resume(self, c: Child, now: float) -> dict[str, dict[str, int]] | None:
        """Per source engine of `c`, stream → last seq its consumers took in; None until every consumer outside `c`
        has taken in what was on its way (frames sent before the death still arrive): its queue empty and its last
        seq unchanged for a quiet period. Waited for at most RESUME_WAIT seconds, then duplicates are possible."""
        sources = {n.id for n in c.nodes if n.cls.is_source()}
        edges = [e for e in self.graph.edges if e.src in sources]
        died = c.died or 0.0
        quiet = max(1.0, 4 * self.interval)
        settled = all(self._gone(e.dst) or self.host_of[e.dst] == c.name
                      or self.tally.reported_at.get(e.dst, -1.0) > died + quiet and not self.tally[e.dst].get("depth")
                      and now - self.tally.moved_at.get((e.dst, e.dst_port), died) >= quiet for e in edges)
        if not settled and now < died + self.RESUME_WAIT:
            return None
        resume: dict[str, dict[str, int]] = {}
        for src in sources:
            views = [self.tally[e.dst].get("last_seq", {}).get(e.dst_port, {}) for e in edges
                     if e.src == src and not self._gone(e.dst)]
            if views:
                streams = set.intersection(*(set(v) for v in views))
                resume[src] = {s: min(v[s] for v in views) for s in sorted(streams)}
        return resume

    def _gone(self, engine: str) -> bool:
        child = self.children.get(self.host_of[engine])
        return child is not None and child.gone

    def down(self) -> dict[str, tuple[bool, str]]:
        """Engines whose process is not running now: engine → (gone for good, why), for health reports. Safe from
        other threads (only fields this supervisor sets are read, no process is polled): a poll (50 ms) behind."""
        out = {}
        for c in list(self.children.values()):
            if c.gone:
                why = f"{c.what} died ({c.death or 'not restarted'}) and is not restarted"
            elif c.died is not None and not c.ready:
                why = f"{c.what} died ({c.death}); restarting ({c.restarts}/{min(n.max_restarts for n in c.nodes)})"
            else:
                continue
            out.update({n.id: (c.gone, why) for n in c.nodes})
        return out

    def silent(self, now: float, limit: float) -> list[tuple[Child, float]]:
        """Live children whose last stats are older than `limit` seconds (stopped or stuck), with that age."""
        out = []
        for c in self.children.values():
            if c.proc.is_alive() and c.ready and not c.ended:
                last = max([self.tally.reported_at.get(n.id, c.started) for n in c.nodes] + [c.started])
                if now - last > limit:
                    out.append((c, now - last))
        return out
