"""`graphflow serve --ray`: one graph replica per Ray node, streams placed on replicas, moved when a node dies.

Frames never cross machines: each node runs the ordinary `Service` (graphflow.service) inside a Ray actor, with the
graph's engines as on one box. The front (`ClusterController`, the same REST API and dashboard as one machine)
keeps the site's streams, rules and events in its SQLite store, asks the `Coordinator` (graphflow.placement) where
each stream goes, polls every replica for stream state, events and metrics, and re-places a dead replica's streams
on the survivors. Ray is imported inside the functions that need it, and only `serve --ray` imports this module,
so single-machine use never loads Ray."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GraphflowError
from .placement import Coordinator, Labels, stream_labels
from .service import LiveFeed, each_stream, stream_id
from .store import Store

log = logging.getLogger(__name__)

# a replica: the ordinary service inside a Ray actor ----------------------------------------------------------------
class _Relay(Store):
    """A replica's store: nothing kept on disk (the front keeps the site); events are numbered in a bounded ring
    for the front to fetch from its cursor on."""

    def __init__(self, keep: int = 10_000) -> None:
        super().__init__(":memory:")
        self.ring: deque[tuple[int, float, str, str, dict[str, Any]]] = deque(maxlen=keep)
        self.numbers = itertools.count(1)
        self.ring_lock = threading.Lock()

    def add_events(self, events: list[tuple[float, str, str, dict[str, Any]]]) -> None:
        with self.ring_lock:
            self.ring.extend((next(self.numbers), ts, stream, kind, body) for ts, stream, kind, body in events)

    def since(self, cursor: int) -> list[tuple[int, float, str, str, dict[str, Any]]]:
        with self.ring_lock:
            return [e for e in self.ring if e[0] > cursor]


_USER_ERRORS = (KeyError, FileExistsError, GraphflowError, ValueError)


def _answer(fn: Any, *args: Any) -> tuple[Any, ...]:
    """("ok", value), or ("error", kind, message) for a user's mistake, so it reaches the front as one line."""
    try:
        return ("ok", fn(*args))
    except _USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return ("error", type(exc).__name__, message)


class Replica:
    """One node's graph: a `Service` run inside a Ray actor, driven by the front through these methods."""

    def __init__(self, doc: dict[str, Any], path: str, overrides: dict[str, Any], source: str, rule: str | None,
                 media_roots: list[str]) -> None:
        from . import graph as graph_mod
        from .service import Service

        self.store = _Relay()
        topology = graph_mod.build(doc, path, overrides)
        self.service = Service(topology, self.store, source, rule, [Path(m) for m in media_roots])
        self.service.start()

    def ready(self) -> int:
        """The actor's process id, once the graph runs here (its engines set up); an error if it could not start."""
        import os

        if not self.service.ready():
            raise GraphflowError("the graph did not start on this node (its log says why)")
        return os.getpid()

    def add(self, spec: dict[str, Any], rules: list[dict[str, Any]] | None) -> tuple[Any, ...]:
        def add() -> None:
            self.service.add_stream(dict(spec))
            if rules is not None:
                self.service.set_rules(spec["id"], rules)
        return _answer(add)

    def remove(self, stream: str) -> tuple[Any, ...]:
        return _answer(self.service.remove_stream, stream)

    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> tuple[Any, ...]:
        return _answer(self.service.set_rules, stream, rules)

    def look(self, stream: str, after: int, wait_s: float) -> tuple[Any, ...]:
        """The stream's newest preview numbered above `after`, waiting up to `wait_s` (None if none came); previews
        go on being made for PREVIEW_HOLD_S after, for the viewer's next look."""
        def look() -> Any:
            self.service.stream(stream)  # KeyError when it does not run here
            previews = self.service.previews
            with previews.watch(stream):
                preview = previews.wait(stream, after, wait_s)
            previews.hold(stream, PREVIEW_HOLD_S)
            return preview
        return _answer(look)

    def preview_info(self, stream: str) -> dict[str, Any]:
        return self.service.previews.info(stream)

    def picture(self, stream: str, frame: int) -> Any:
        return self.service.previews.picture(stream, frame)

    def report(self, cursor: int, metrics: bool) -> dict[str, Any]:
        """Streams (with `kept`: frames the source passed on, to count what was in flight if the node dies), the
        events numbered above `cursor`, per-engine stats, the busiest infer's busy share and, when asked for,
        Prometheus text."""
        service = self.service
        service.flush_events()
        streams = {s["id"]: {**s, "kept": int(service._state(s["id"]).get("kept", 0))} for s in service.streams()}
        busy = [m["busy_fraction"] for m in ((st.get("metrics") or {}) for st in service.launcher.stats.values())
                if isinstance(m.get("busy_fraction"), (int, float))]
        return {"streams": streams, "events": self.store.since(cursor),
                "metrics": service.metrics()[0] if metrics else None,
                "graph": service.graph(), "busy": max(busy, default=0.0), "healthy": service.healthy()}

    def stop(self) -> int:
        """Drain and stop the graph; its exit code."""
        self.service.stop()
        return self.service.summary.exit_code if self.service.summary is not None else 1


PREVIEW_HOLD_S = 2.0


# the front ---------------------------------------------------------------------------------------------------------
CAPACITY_RESOURCE = "graphflow_streams"  # declared by `ray start --resources '{"graphflow_streams": 40}'`
STREAMS_PER_CPU, STREAMS_PER_GPU = 4, 32  # a node's capacity when it declares none
RETRY_S, RETRY_MAX_S = 5.0, 120.0  # a node whose replica died gets a new one after RETRY_S, doubled per failed start


@dataclass(eq=False)
class _Node:
    """A replica as the front sees it."""

    rid: str
    node_id: str
    name: str  # hostname and the start of the Ray node id: the `node` label of metrics
    host: str
    actor: Any
    capacity: int
    labels: Labels
    ready_ref: Any
    started: float
    joined: bool = False
    lost: bool = False
    pid: int | None = None  # the actor's process on its node
    cursor: int = 0
    report_ref: Any = None
    report_sent: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)
    metrics: bytes | None = None  # its last Prometheus text
    metrics_at: float = -1e9


@dataclass(eq=False)
class _Stream:
    """A stream as the front keeps it: what follows it from replica to replica, and its counts so far."""

    spec: dict[str, Any]  # as given, with its `node` labels
    rules: list[dict[str, Any]] | None
    replica: str | None = None
    frames_before: int = 0  # frames and events on the replicas it ran on before this one
    events_before: int = 0
    moves: int = 0
    lost: int = 0  # frames in flight on replicas that died under it
    error: str = ""
    last: dict[str, Any] | None = None  # its state in its replica's last report


@dataclass
class ClusterSummary:
    """The outcome of a cluster run, as `graphflow serve` reports it (the codes of `graphflow launch`)."""

    exit_code: int


class ClusterController:
    """graphflow.api.Controller over replicas on a Ray cluster: one per live node, watched every `poll_s`; a replica
    that fails a call, leaves with its node or does not answer for `hang_s` is killed and its streams re-placed."""

    def __init__(self, topology: Any, doc: dict[str, Any], path: str, overrides: dict[str, Any], store: Store,
                 source: str, rule: str | None, media_roots: list[Path], address: str, poll_s: float = 1.0,
                 hang_s: float = 20.0, start_s: float = 180.0, metrics_s: float = 5.0) -> None:
        self.topology, self.store, self.source, self.rule = topology, store, source, rule
        self.replica_args = (doc, str(Path(path).resolve()), overrides, source, rule,
                             [str(r.resolve()) for r in media_roots])
        self.media_roots = [r.resolve() for r in media_roots]
        self.address, self.poll_s, self.hang_s, self.start_s = address, poll_s, hang_s, start_s
        self.metrics_s = metrics_s  # replicas send their Prometheus text this often, stream state every poll_s
        self.coordinator = Coordinator()
        self.nodes: dict[str, _Node] = {}  # replica id → replica
        self.records: dict[str, _Stream] = {}
        self.retry_at: dict[str, float] = {}  # Ray node id → when a replica may be started there again
        self.start_failures: dict[str, int] = {}  # Ray node id → replicas in a row that did not start there
        self.feed = LiveFeed()
        self.lock = threading.RLock()
        self.halt = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="cluster", daemon=True)
        self.serial = itertools.count(1)
        self.lost_replicas = 0
        self.summary: ClusterSummary | None = None
        self.previews = RemotePreviews(self)

    # lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Join the Ray cluster, start a replica per live node and wait (up to `start_s`) for them to run."""
        try:
            import ray
        except ImportError:
            raise GraphflowError("serve --ray needs the cluster extra: pip install 'graphflow[cluster]'") from None
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, namespace="graphflow", logging_level=logging.WARNING,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise GraphflowError(f"serve --ray {self.address}: cannot join the Ray cluster "
                                 f"({' '.join(str(exc).split())[:200]}); start one with `ray start --head`") from None
        self._actor = ray.remote(Replica)
        for row in self.store.streams():
            spec = row["spec"]
            try:
                want = stream_labels(spec)
            except GraphflowError as exc:
                log.error("stream %r from the state file not restored: %s", spec.get("id"), exc)
                continue
            self.records[spec["id"]] = _Stream(spec, row["rules"])
            self.coordinator.place(spec["id"], want, wait=True)
        self._tick()
        self.watcher.start()
        deadline = time.monotonic() + self.start_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.nodes and all(n.joined for n in self.nodes.values()):
                    return
            time.sleep(0.2)
        log.warning("some replicas did not start within %.0f s; they join when ready", self.start_s)

    def stop(self) -> None:
        """Stop watching, drain and stop every replica's graph, leave the Ray cluster; sets `summary`."""
        import ray

        self.halt.set()
        if self.watcher.is_alive():
            self.watcher.join(self.hang_s + 10)
        with self.lock:
            nodes = list(self.nodes.values())
        codes: list[int] = []
        refs = [(n, n.actor.stop.remote()) for n in nodes]
        for n, ref in refs:
            try:
                codes.append(ray.get(ref, timeout=self.topology.settings.get("shutdown_timeout", 10.0) + 10))
            except Exception as exc:  # a replica that cannot stop cleanly: the run failed
                log.error("replica %s on %s did not stop cleanly: %s", n.rid, n.name, _first_line(exc))
                codes.append(1)
            ray.kill(n.actor, no_restart=True)
        ray.shutdown()
        if 1 in codes:
            code = 1
        elif 3 in codes or self.lost_replicas:
            code = 3  # what was in flight on a lost replica is lost
        else:
            code = 0
        self.summary = ClusterSummary(code)

    def graph_png(self) -> bytes:
        from .preview import graph_png

        return graph_png(self.topology)

    # controller --------------------------------------------------------------------------------------------
    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]:
        from .service import check_stream_uri

        stream = stream_id(spec)
        want = stream_labels(spec)
        check_stream_uri(spec, self.media_roots)
        with self.lock:
            if stream in self.records:
                raise FileExistsError(f"stream {stream!r} exists (DELETE it first)")
            rid = self.coordinator.place(stream, want)
            self.records[stream] = _Stream(spec, None, rid)
        try:
            self._send_add(rid, stream)
        except _USER_ERRORS:
            with self.lock:
                self.records.pop(stream, None)
                self.coordinator.remove(stream)
            raise
        self.store.put_stream(spec)
        return self.stream(stream)

    def remove_stream(self, stream: str) -> None:
        with self.lock:
            if stream not in self.records:
                raise KeyError(stream)
            del self.records[stream]
            rid = self.coordinator.remove(stream)
            node = self.nodes.get(rid) if rid else None
        self.store.delete_stream(stream)
        if node is not None:
            try:
                self._call(node, "remove", stream)
            except KeyError:
                pass  # it ended there already

    def stream(self, stream: str) -> dict[str, Any]:
        with self.lock:
            rec = self.records.get(stream)
            if rec is None:
                raise KeyError(stream)
            node = self.nodes.get(rec.replica) if rec.replica else None
            last = dict(rec.last or {})
            out = {"id": stream, "uri": rec.spec["uri"],
                   "state": last.get("state") or ("connecting" if node else "pending"),
                   "frames": rec.frames_before + int(last.get("frames", 0)), "fps": last.get("fps", 0.0),
                   "drops": last.get("drops", 0), "events": rec.events_before + int(last.get("events", 0)),
                   "latency_ms": last.get("latency_ms") or {"p50": None, "p95": None},
                   "error": last.get("error") or rec.error,
                   "placement": {"replica": rec.replica, "node": node.name if node else None,
                                 "host": node.host if node else None},
                   "moves": rec.moves, "lost": rec.lost}
        return out

    def streams(self) -> list[dict[str, Any]]:
        with self.lock:
            ids = list(self.records)
        return each_stream(ids, self.stream)

    def rules(self, stream: str) -> list[dict[str, Any]]:
        with self.lock:
            rec = self.records.get(stream)
            if rec is None:
                raise KeyError(stream)
            if rec.rules is not None:
                return rec.rules
        return list(self.topology.nodes[self.rule].params.get("rules", [])) if self.rule else []

    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from .vision.rules import RuleSet

        if self.rule is None:
            raise GraphflowError("this graph has no rule engine")
        with self.lock:
            rec = self.records.get(stream)
            if rec is None:
                raise KeyError(stream)
            node = self.nodes.get(rec.replica) if rec.replica else None
        if node is not None:
            self._call(node, "set_rules", stream, rules)
        else:
            RuleSet(rules)  # a waiting stream's rules are checked here; its replica applies them when it starts
        with self.lock:
            rec.rules = rules
        self.store.set_rules(stream, rules)
        return rules

    def graph(self) -> dict[str, Any]:
        from .service import TAP

        with self.lock:
            nodes = list(self.nodes.values())
            replicas = [{"replica": n.rid, "node": n.name, "host": n.host, "capacity": n.capacity,
                         "labels": n.labels, "ready": n.joined, "pid": n.pid,
                         "streams": len(self.coordinator.streams_of(n.rid)),
                         "busy": n.last.get("busy", 0.0)} for n in nodes]
        engines: dict[str, Any] = {}
        for eid, node in self.topology.nodes.items():
            if eid == TAP:
                continue
            total: dict[str, Any] = {}
            for n in nodes:
                stats = (((n.last.get("graph") or {}).get("engines") or {}).get(eid) or {}).get("stats") or {}
                for key, value in stats.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        total[key] = (total.get(key) or 0) + value
                    else:
                        total.setdefault(key, value)
            engines[eid] = {"type": node.type, "placement": node.placement, "stats": total}
        edges = [{"from": f"{e.src}.{e.src_port}", "to": f"{e.dst}.{e.dst_port}", "policy": e.policy}
                 for e in self.topology.edges if e.dst != TAP]
        return {"name": self.topology.name, "engines": engines, "connections": edges, "replicas": replicas}

    def healthy(self) -> bool:
        return self.watcher.is_alive()

    def ready(self) -> bool:
        with self.lock:
            return self.watcher.is_alive() and any(n.joined for n in self.nodes.values())

    def events(self, stream: str | None, kind: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
        return self.store.events(stream, kind, since, limit)

    def metrics(self) -> tuple[bytes, str]:
        return render_cluster_metrics(self)

    # replicas ----------------------------------------------------------------------------------------------
    def _call(self, node: _Node, method: str, *args: Any) -> Any:
        """Call a replica's method and wait for its answer (see `_result`)."""
        return self._result(node, getattr(node.actor, method).remote(*args))

    def _result(self, node: _Node, ref: Any) -> Any:
        """A replica's answer; a user's mistake is raised as its own type (one line), a replica that fails is lost
        (its streams move) and the caller gets TimeoutError (503)."""
        import ray

        try:
            answer = ray.get(ref, timeout=self.hang_s)
        except Exception as exc:  # the actor died, its node left, or it did not answer in time
            self._lose(node, _first_line(exc))
            raise TimeoutError(f"replica {node.rid} on {node.name} failed; its streams move to other nodes") from None
        if answer[0] == "error":
            _, kind, message = answer
            raise {"KeyError": KeyError, "FileExistsError": FileExistsError,
                   "ValueError": ValueError}.get(kind, GraphflowError)(message)
        return answer[1]

    def _ask_add(self, rid: str, stream: str) -> tuple[_Node, Any] | None:
        """Ask replica `rid` to open `stream` with its rules, without waiting; None if it is no longer placed there."""
        with self.lock:
            node, rec = self.nodes.get(rid), self.records.get(stream)
            if node is None or rec is None or rec.replica != rid:
                return None
            spec = {k: v for k, v in rec.spec.items() if k != "node"}
            return node, node.actor.add.remote(spec, rec.rules)

    def _settle_add(self, stream: str, rid: str, node: _Node, ref: Any) -> None:
        """Wait for an add; a replica that failed meanwhile is not an error when the stream moved on already."""
        try:
            self._result(node, ref)
        except TimeoutError:
            with self.lock:
                rec = self.records.get(stream)
                if rec is not None and rec.replica == rid:
                    raise

    def _send_add(self, rid: str, stream: str) -> None:
        asked = self._ask_add(rid, stream)
        if asked is not None:
            self._settle_add(stream, rid, *asked)

    def _start_replica(self, node_id: str, info: dict[str, Any]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        resources = info.get("Resources") or {}
        gpus = int(resources.get("GPU", 0))
        capacity = int(resources.get(CAPACITY_RESOURCE) or
                       max(1, STREAMS_PER_CPU * int(resources.get("CPU", 1)) + STREAMS_PER_GPU * gpus))
        hostname = str(info.get("NodeManagerHostname") or info.get("NodeManagerAddress") or "node")
        labels = {k: v for k, v in (info.get("Labels") or {}).items() if not k.startswith("ray.io/")}
        labels.update(gpu=gpus > 0, host=hostname)
        actor = self._actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                                    num_cpus=0, max_concurrency=32, max_restarts=0).remote(*self.replica_args)
        rid = f"r{next(self.serial)}-{node_id[:8]}"
        node = _Node(rid, node_id, f"{hostname}-{node_id[:8]}", str(info.get("NodeManagerAddress", "")), actor,
                     capacity, labels, actor.ready.remote(), time.monotonic())
        with self.lock:
            self.nodes[rid] = node
        log.info("replica %s starting on node %s (capacity %d, labels %s)", rid, node.name, capacity, labels)

    def _joined(self, node: _Node) -> None:
        with self.lock:
            node.joined = True
            placed = self.coordinator.add_replica(node.rid, node.capacity, node.labels)
            for stream, rid in placed.items():
                self.records[stream].replica = rid
        log.info("replica %s on node %s ready (capacity %d)", node.rid, node.name, node.capacity)
        self._start_streams(placed)

    def _start_streams(self, placed: dict[str, str | None]) -> None:
        """Open streams on the replicas they were placed on, all asked at once; one a replica refuses shows why."""
        asked = [(stream, rid, self._ask_add(rid, stream)) for stream, rid in placed.items() if rid is not None]
        for stream, rid, pending in asked:
            if pending is None:
                continue
            try:
                self._settle_add(stream, rid, *pending)
            except (TimeoutError, *_USER_ERRORS) as exc:
                with self.lock:
                    if stream in self.records:
                        self.records[stream].error = _first_line(exc)
                log.error("stream %r not started on replica %s: %s", stream, rid, _first_line(exc))

    def _lose(self, node: _Node, why: str) -> None:
        """A replica is gone: kill it (so no stream can run twice) and re-place its streams on the others."""
        import ray

        t0 = time.monotonic()
        with self.lock:
            if node.lost:
                return
            node.lost = True
            self.nodes.pop(node.rid, None)
            fails = 0 if node.joined else self.start_failures.get(node.node_id, 0) + 1
            self.start_failures[node.node_id] = fails  # a replica that cannot start there waits longer each time
            self.retry_at[node.node_id] = time.monotonic() + min(RETRY_MAX_S, RETRY_S * 2 ** fails)
            moved = self.coordinator.lose_replica(node.rid) if node.joined else {}
            for stream, rid in moved.items():
                rec = self.records[stream]
                last = rec.last or {}
                rec.frames_before += int(last.get("frames", 0))
                rec.events_before += int(last.get("events", 0))
                rec.lost += max(0, int(last.get("kept", 0)) - int(last.get("frames", 0)))
                rec.moves += 1
                rec.replica, rec.last, rec.error = rid, None, ""
            if moved:
                self.lost_replicas += 1
        try:
            ray.kill(node.actor, no_restart=True)
        except Exception:  # gone already with its node
            pass
        self._start_streams(moved)
        where = ", ".join(f"{s}→{r or 'waiting'}" for s, r in moved.items()) or "none"
        log.warning("replica %s on node %s lost (%s); %d streams re-placed in %.2f s: %s", node.rid, node.name, why,
                    len(moved), time.monotonic() - t0, where)

    def _apply(self, node: _Node, report: dict[str, Any]) -> None:
        """A replica's report: stream states, its load, new events into the store and to live subscribers; a
        stream it runs that is no longer placed there is removed from it. A replica whose graph stopped is lost."""
        if not report.get("healthy", True):
            self._lose(node, "its graph stopped")
            return
        rows = []
        with self.lock:
            if node.lost:
                return
            node.last = report
            if report.get("metrics") is not None:
                node.metrics = report["metrics"]
            self.coordinator.update_load(node.rid, float(report.get("busy", 0.0)))
            mine = self.coordinator.streams_of(node.rid)
            for stream, state in report["streams"].items():
                if stream in mine:
                    self.records[stream].last = state
            stray = set(report["streams"]) - mine
            for n, ts, stream, kind, body in report["events"]:
                node.cursor = max(node.cursor, n)
                if stream in self.records:
                    rows.append((ts, stream, kind, body))
        self.store.add_events(rows)
        self.feed.publish([{"stream": stream, "kind": kind, "seq": body.get("frame"), "event": body}
                           for _, stream, kind, body in rows])
        for stream in stray:
            try:
                self._call(node, "remove", stream)
            except (KeyError, TimeoutError):
                pass

    def _watch(self) -> None:
        while not self.halt.is_set():
            try:
                self._tick()
            except Exception:  # keep watching: a failed round is retried at the next
                log.exception("cluster watch round failed")
                self.halt.wait(self.poll_s)

    def _tick(self) -> None:
        """One round: replicas for new nodes, joins, reports (this waits up to `poll_s`), losses."""
        import ray

        now = time.monotonic()
        self._follow_membership({n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}, now)
        with self.lock:
            nodes = list(self.nodes.values())
        self._check_starting([n for n in nodes if not n.joined], now)
        self._collect_reports(nodes, now)

    def _follow_membership(self, alive: dict[str, dict[str, Any]], now: float) -> None:
        """Lose the replicas whose node left; start one on each live node without one (unless it waits to retry)."""
        with self.lock:
            nodes = list(self.nodes.values())
        for node in nodes:
            if node.node_id not in alive:
                self._lose(node, "its node left the cluster")
        with self.lock:
            covered = {n.node_id for n in self.nodes.values()}
        for node_id, info in alive.items():
            if node_id not in covered and self.retry_at.get(node_id, 0.0) <= now:
                self._start_replica(node_id, info)

    def _check_starting(self, starting: list[_Node], now: float) -> None:
        """Starting replicas whose graph is up join; one that failed, or is not up after `start_s`, is lost."""
        import ray

        for node in starting:
            done, _ = ray.wait([node.ready_ref], timeout=0)
            if done:
                try:
                    node.pid = ray.get(node.ready_ref)
                except Exception as exc:  # its graph could not start there
                    self._lose(node, f"did not start: {_first_line(exc)}")
                    continue
                self._joined(node)
            elif now - node.started > self.start_s:
                self._lose(node, f"not ready after {self.start_s:.0f} s")

    def _collect_reports(self, nodes: list[_Node], now: float) -> None:
        """Ask each joined replica for its report (metrics every `metrics_s`), apply what comes within `poll_s`, and
        lose a replica that has not answered for `hang_s`; the round lasts `poll_s` either way."""
        import ray

        for node in nodes:
            if node.joined and not node.lost and node.report_ref is None:
                with_metrics = now - node.metrics_at >= self.metrics_s
                node.metrics_at = now if with_metrics else node.metrics_at
                node.report_ref = node.actor.report.remote(node.cursor, with_metrics)
                node.report_sent = time.monotonic()
        waiting = {n.report_ref: n for n in nodes if n.report_ref is not None and not n.lost}
        if not waiting:
            self.halt.wait(self.poll_s)
            return
        asked = time.monotonic()
        done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=self.poll_s)
        for ref in done:
            node = waiting[ref]
            node.report_ref = None
            try:
                report = ray.get(ref)
            except Exception as exc:  # the actor died or its node went
                self._lose(node, _first_line(exc))
                continue
            self._apply(node, report)
        now = time.monotonic()
        for ref, node in waiting.items():
            if node.report_ref is ref and now - node.report_sent > self.hang_s:
                self._lose(node, f"no answer for {self.hang_s:.0f} s")
        if len(done) == len(waiting):  # every replica answered early: the round still lasts poll_s
            self.halt.wait(max(0.0, self.poll_s - (now - asked)))


class RemotePreviews:
    """The dashboard's previews (the interface of graphflow.preview.Previews that graphflow.api uses), fetched from
    the replica running each stream while someone watches: only the JPEGs cross machines, at most `max_fps` per
    stream. Numbers go on rising when a stream moves, so a viewer's `after` stays valid."""

    def __init__(self, front: ClusterController, max_fps: float = 5.0) -> None:
        self.front, self.max_fps = front, max_fps
        self.lock = threading.Lock()
        self.watching: Counter[str] = Counter()
        self.seen: dict[str, tuple[str, int, Any]] = {}  # stream → (replica, number offset, newest preview)

    @contextmanager
    def watch(self, stream: str) -> Iterator[None]:
        with self.lock:
            self.watching[stream] += 1
        try:
            yield
        finally:
            with self.lock:
                self.watching[stream] -= 1
                if self.watching[stream] <= 0:
                    del self.watching[stream]

    def hold(self, stream: str, seconds: float) -> None:
        """Replicas keep a looked-at stream's previews coming for PREVIEW_HOLD_S by themselves."""

    def viewers(self, stream: str) -> int:
        with self.lock:
            return self.watching.get(stream, 0)

    def latest(self, stream: str) -> Any:
        with self.lock:
            seen = self.seen.get(stream)
        return seen[2] if seen is not None else None

    async def next(self, stream: str, after: int = 0, timeout: float = 1.0) -> Any:
        """The stream's newest preview numbered above `after`, waiting up to `timeout`; None if none came."""
        return await asyncio.get_running_loop().run_in_executor(None, self._look, stream, after, timeout)

    def _look(self, stream: str, after: int, timeout: float) -> Any:
        node = self._node(stream)
        if node is None:
            time.sleep(min(timeout, 0.5))
            return None
        with self.lock:
            rid, offset, latest = self.seen.get(stream, (node.rid, 0, None))
            if rid != node.rid:  # moved: the new replica counts from 1 again
                rid, offset = node.rid, latest.n if latest is not None else 0
        try:
            preview = self.front._call(node, "look", stream, max(0, after - offset), timeout)
        except (KeyError, TimeoutError):  # not running there yet, or that replica just failed
            return None
        if preview is None:
            return None
        preview = dataclasses.replace(preview, n=preview.n + offset)
        with self.lock:
            self.seen[stream] = (rid, offset, preview)
        return preview if preview.n > after else None

    def info(self, stream: str) -> dict[str, Any]:
        return self._ask(stream, "preview_info", stream) or {"pictures": []}

    def picture(self, stream: str, frame: int) -> Any:
        return self._ask(stream, "picture", stream, frame)

    def _node(self, stream: str) -> _Node | None:
        with self.front.lock:
            rec = self.front.records.get(stream)
            return self.front.nodes.get(rec.replica) if rec is not None and rec.replica else None

    def _ask(self, stream: str, method: str, *args: Any) -> Any:
        import ray

        node = self._node(stream)
        if node is None:
            return None
        try:
            return ray.get(getattr(node.actor, method).remote(*args), timeout=PREVIEW_HOLD_S)
        except Exception:  # the replica is busy or failing: the page asks again, the watcher handles the failure
            return None


def _check_reachable(address: str) -> None:
    """A `HOST:PORT` that nothing answers on fails now in one line (Ray itself would retry for minutes). A loopback
    host is left to Ray, which reaches it through this machine's own address."""
    import socket

    from .service import is_loopback

    host, _, port = address.rpartition(":")
    if address == "auto" or not host or not port.isdigit() or is_loopback(host):
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise GraphflowError(f"serve --ray {address}: nothing answers there ({exc.strerror or exc}); give the "
                             "address `ray start --head` printed, or `auto` on a node of the cluster") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def render_cluster_metrics(front: ClusterController) -> tuple[bytes, str]:
    """Every replica's metrics with a `node` label, and the cluster's own: replicas up, streams per node, moves."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families

    with front.lock:
        nodes = [(n.name, n.rid, n.joined, n.capacity, n.metrics, len(front.coordinator.streams_of(n.rid)))
                 for n in front.nodes.values()]
        moves = sum(rec.moves for rec in front.records.values())
        lost = sum(rec.lost for rec in front.records.values())
        waiting = len(front.coordinator.pending)

    class Collector:
        def collect(self) -> Any:
            families: dict[str, Metric] = {}
            for name, _, _, _, text, _ in nodes:
                if not text:
                    continue
                for fam in text_string_to_metric_families(text.decode()):
                    out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                    for sample in fam.samples:
                        out.add_sample(sample.name, {**sample.labels, "node": name}, sample.value)
            yield from families.values()
            up = GaugeMetricFamily("graphflow_cluster_replica_up", "1 when the node's replica runs the graph",
                                   labels=["node", "replica"])
            placed = GaugeMetricFamily("graphflow_cluster_streams", "streams placed on the node's replica",
                                       labels=["node"])
            capacity = GaugeMetricFamily("graphflow_cluster_capacity", "streams the node's replica may take",
                                         labels=["node"])
            for name, rid, joined, cap, _, count in nodes:
                up.add_metric([name, rid], 1.0 if joined else 0.0)
                placed.add_metric([name], count)
                capacity.add_metric([name], cap)
            yield from (up, placed, capacity)
            yield GaugeMetricFamily("graphflow_cluster_streams_waiting", "streams waiting for room on a replica",
                                    value=waiting)
            yield CounterMetricFamily("graphflow_cluster_stream_moves", "streams moved off lost replicas", value=moves)
            yield CounterMetricFamily("graphflow_cluster_frames_lost", "frames in flight on lost replicas", value=lost)

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
