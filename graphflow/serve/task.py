"""A task: one graph the service runs, with the streams bound to it. Each task has a launcher of its own, so a task
is added, replaced or removed while the others run untouched (their queues, trackers and rule state included)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.graph.model import Graph
from graphflow.serve.tap import TAP

log = logging.getLogger(__name__)
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used in URLs, metric labels and file names
LABELS_MAX = 16  # placement labels a task may carry
TAP_TYPE = "graphflow.serve.tap:Tap"
READY_S = 120.0  # longest a new task's engines may take to set up (model loads) before the request fails
LIVE_POLICY = "drop_oldest"  # connections out of a task's source, unless the graph gives a policy


def task_id(value: Any, where: str = "id") -> str:
    """A task id as given, or a one-line error naming the field."""
    if not isinstance(value, str) or not TASK_ID.fullmatch(value):
        raise GraphflowError(f"{where}: a task id is 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                             f"or digit (got {str(value)[:80]!r})")
    return value


def task_labels(value: Any, where: str = "labels") -> dict[str, Any]:
    """A task's placement labels: a small object of names → plain values."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > LABELS_MAX:
        raise GraphflowError(f"{where}: an object of at most {LABELS_MAX} labels, e.g. {{\"gpu\": true}}")
    for key, v in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64 or not isinstance(v, (str, int, float, bool)):
            raise GraphflowError(f"{where}.{str(key)[:64]}: a label is a short name with a string, number or "
                                 f"boolean value")
    return dict(value)


class UnknownTask(KeyError):
    """No task of that id (the API answers 404)."""


class UnknownEvent(KeyError):
    """No event (or evidence file) of that id (the API answers 404)."""


@dataclass(frozen=True)
class Roles:
    """What the service needs to know of a task's graph: its source engine (takes the streams), its rule engine
    (takes each stream's rules, if any) and the engine whose output the service's tap reads."""

    source: str
    rule: str | None
    listen: str


def prepare_graph(graph_doc: dict[str, Any], where: str = "graph") -> Roles:
    """Make a graph document a task's graph, in place: its one `decode` engine waits for the service's streams
    instead of reading those in the file (they are ignored), and the tap engine listens at the end. The error names
    `where` (the file, or the request's field)."""
    engines = graph_doc.get("engines") if isinstance(graph_doc, dict) else None
    if not isinstance(engines, dict):
        raise GraphflowError(f"{where}.engines: a task's graph names its engines (an object)")
    sources = [eid for eid, e in engines.items() if isinstance(e, dict) and e.get("type") == "decode"]
    if len(sources) != 1:
        raise GraphflowError(f"{where}.engines: a task's graph needs exactly one 'decode' engine, which takes the "
                             f"service's streams (found {len(sources)})")
    if TAP in engines or any(isinstance(e, dict) and e.get("type") == TAP_TYPE for e in engines.values()):
        raise GraphflowError(f"{where}.engines: the engine id {TAP!r} and type {TAP_TYPE!r} are the service's own")
    rules = [eid for eid, e in engines.items() if isinstance(e, dict) and e.get("type") == "rule"]
    src = sources[0]
    params = engines[src].setdefault("params", {})
    if not isinstance(params, dict):
        raise GraphflowError(f"{where}.engines.{src}.params: must be an object")
    params["sources"] = []
    params["wait_for_sources"] = True
    listen = rules[0] if rules else src
    engines[TAP] = {"type": TAP_TYPE}
    connections = graph_doc.setdefault("connections", [])
    if not isinstance(connections, list):
        raise GraphflowError(f"{where}.connections: must be a list")
    connections[:] = [live_edge(c, src) for c in connections]
    connections.append([f"{listen}.out", f"{TAP}.in"])
    return Roles(src, rules[0] if rules else None, listen)


def live_edge(connection: Any, source: str) -> Any:
    """A connection out of the task's source engine with no policy of its own, made LIVE_POLICY: cameras do not
    wait, so a graph that cannot keep up drops each stream's oldest frames (counted) instead of falling ever further
    behind. Anything else is left as it is (the loader checks it)."""
    edge = connection
    if isinstance(connection, list) and len(connection) == 2:
        edge = {"from": connection[0], "to": connection[1]}
    if isinstance(edge, dict) and isinstance(edge.get("from"), str) \
            and edge["from"].partition(".")[0] == source and "policy" not in edge:
        return {**edge, "policy": LIVE_POLICY}
    return connection


@dataclass
class Task:
    """One task's graph, running on its own launcher in a thread of the service's process. `doc` is the graph
    document as the user gave it (kept, stored and shown), `topology` the built graph with the service's tap."""

    id: str
    doc: dict[str, Any]
    topology: Graph
    roles: Roles
    labels: dict[str, Any] = field(default_factory=dict)
    launcher: Any = None
    thread: threading.Thread | None = None
    summary: Any = None

    def start(self, services: dict[str, Any], on_progress: Any = None) -> None:
        """Start the task's engines and wait until every one is set up (or the graph ended while starting);
        `on_progress(stats)` is called at each stats interval, on the launcher's thread."""
        from graphflow.runtime.launcher import Launcher

        self.launcher = Launcher(self.topology, on_progress, services=services)
        self.thread = threading.Thread(target=self._run, name=f"task:{self.id}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + READY_S
        while not self.launcher.started.wait(0.1):
            if not self.thread.is_alive():
                raise GraphflowError(f"task {self.id!r}: its graph stopped while starting: "
                                     f"{'; '.join(self.launcher.errors[-3:]) or 'no error reported'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"task {self.id!r}: engines not set up after {READY_S:.0f} s")

    def _run(self) -> None:
        try:
            self.summary = self.launcher.run()
        except Exception:  # a bug of the runtime's: the task is gone, the service and the other tasks go on
            log.exception("task %r: its graph failed", self.id)

    def stop(self) -> None:
        """Drain and stop the task's graph: its sources end, what is in flight is processed, sinks flush."""
        if self.launcher is None or self.thread is None:
            return
        self.launcher.on_signal(15)
        self.thread.join(self.topology.settings.get("shutdown_timeout", 10.0) + 5)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def ready(self) -> bool:
        return not self.trouble()

    def down(self) -> dict[str, tuple[bool, str]]:
        """Its engines that are not running: engine → (gone for good, why) (runtime.Launcher.down)."""
        return self.launcher.down() if self.launcher is not None else {}

    def trouble(self) -> str:
        """Why the task cannot take streams now, "" when it can: starting, stopped, or an engine down."""
        if self.launcher is None or not self.launcher.started.is_set():
            return f"task {self.id!r} is starting (engines setting up)" if self.alive() or self.launcher is None \
                else f"task {self.id!r} stopped while starting"
        if not self.alive():
            why = f" ({self.launcher.stop_reason})" if self.launcher.stop_reason else ""
            return f"task {self.id!r}: its graph has stopped{why}"
        return "; ".join(f"task {self.id!r}: {why}" for why in sorted({why for _, why in self.down().values()}))

    def broken(self) -> str:
        """Why the task cannot deliver any more (stopped, or an engine gone for good), "" while it can."""
        if self.launcher is not None and self.launcher.started.is_set() and not self.alive():
            return self.trouble()
        gone = sorted({why for lost, why in self.down().values() if lost})
        return "; ".join(f"task {self.id!r}: {why}" for why in gone)

    def command(self, engine: str, op: str, args: dict[str, Any]) -> Any:
        return self.launcher.command(engine, op, args)

    def stats(self) -> dict[str, dict[str, Any]]:
        return dict(self.launcher.stats) if self.launcher is not None else {}

    def graph_rules(self) -> list[dict[str, Any]]:
        """The rules the task's graph file gives its rule engine (a stream without rules of its own has these)."""
        return list(self.topology.nodes[self.roles.rule].params.get("rules", [])) if self.roles.rule else []

    def check_rules(self, rules: list[dict[str, Any]]) -> None:
        """A stream's new rules, checked as the graph file's would be (keys, geometry, and class names against the
        model upstream); a one-line error naming the field."""
        from graphflow.graph.loader import complete_params, upstream_of

        if self.roles.rule is None:
            raise GraphflowError(f"task {self.id!r} has no rule engine")
        node = self.topology.nodes[self.roles.rule]
        hook = getattr(node.cls, "check_upstream", None)
        if hook is not None:
            hook({**complete_params(node), "rules": rules}, upstream_of(self.topology, node.id))

    def describe(self) -> dict[str, Any]:
        """The task's graph as the API shows it: engines with placement and stats, and connections (tap left out)."""
        stats = self.stats()
        nodes = {}
        for eid, node in self.topology.nodes.items():
            if eid == TAP:
                continue
            s = stats.get(eid, {})
            nodes[eid] = {"type": node.type, "placement": node.placement,
                          "stats": {**{k: s.get(k) for k in ("state", "received", "sent", "dropped", "errors",
                                                             "busy_s", "depth", "restarts")},
                                    "streams_held": (s.get("metrics") or {}).get("streams_held")}}
        edges = [{"from": f"{e.src}.{e.src_port}", "to": f"{e.dst}.{e.dst_port}", "policy": e.policy}
                 for e in self.topology.edges if e.dst != TAP]
        shared = {eid: (stats.get(eid, {}).get("metrics") or {}).get("shared_by") for eid in nodes}
        return {"name": self.topology.name, "engines": nodes, "connections": edges,
                "shared": {eid: n for eid, n in shared.items() if n}}


def build_task(tid: str, doc: Any, file: str, overrides: dict | None = None, restrictions: Any = None,
               labels: Any = None, where: str = "graph") -> Task:
    """A task from a graph document, checked as a graph file is (with `restrictions` for one from the network);
    not started. The document is copied: the one given is kept as the user wrote it."""
    from graphflow import graph as graph_mod

    tid = task_id(tid)
    if not isinstance(doc, dict):
        raise GraphflowError(f"{where}: a task's graph is a JSON object (a graph document)")
    user_doc = copy.deepcopy(doc)
    working = copy.deepcopy(doc)
    roles = prepare_graph(working, where)
    if restrictions is not None:  # the tap is the service's own engine, not the graph's: allowed by exact name
        restrictions = dataclasses.replace(restrictions, engines=restrictions.engines | {TAP_TYPE})
    topology = graph_mod.build(working, file, overrides or {}, restrictions=restrictions)
    return Task(tid, user_doc, topology, roles, task_labels(labels))
