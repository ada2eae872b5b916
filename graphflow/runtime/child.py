"""A child process's main: builds its engines, reports to the launcher, answers its commands."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import zmq

from graphflow.errors import GraphflowError
from graphflow.graph.model import Graph
from graphflow.runtime.actor import Actor
from graphflow.runtime.process import EngineProcess


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the launcher dies, so no child is ever orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_main(graph: Graph, host_of: dict[str, str], name: str, rundir: str, control: str,
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
        host = EngineProcess(graph, host_of, name, rundir, report)
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


def _report_until_delivered(host: EngineProcess, report: Callable[[str, Any], None], final: threading.Event,
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


def _serve_commands(ctx: zmq.Context, endpoint: str, host: EngineProcess, report: Callable[[str, Any], None]) -> None:
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
    `EngineProcess.delivered`). The wait is bounded (a socket an engine left open, or one a stray engine thread still
    uses, would hold `term` forever, as would a link to a consumer that is gone), and no socket is closed here."""
    t = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    t.start()
    t.join(wait_s)
