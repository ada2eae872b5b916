"""The cluster front: the service's controller over Ray, placing streams on replicas and watching them."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.cluster.metrics import render_cluster_metrics
from graphflow.cluster.placement import Coordinator, Labels, stream_labels
from graphflow.cluster.previews import RemotePreviews
from graphflow.cluster.replica import USER_ERRORS, Replica
from graphflow.errors import GraphflowError
from graphflow.serve.live import LiveFeed
from graphflow.serve.store import Store
from graphflow.serve.streams import clashing, each_stream, redact, stream_id

log = logging.getLogger(__name__)




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
    """graphflow.serve.api.Controller over replicas on a Ray cluster: one per live node, watched every `poll_s`; a replica
    that fails a call, leaves with its node or does not answer for `hang_s` is killed and its streams re-placed."""

    def __init__(self, topology: Any, doc: dict[str, Any], path: str, overrides: dict[str, Any], store: Store,
                 source: str, rule: str | None, media_roots: list[Path], address: str, poll_s: float = 1.0,
                 hang_s: float = 20.0, start_s: float = 180.0, metrics_s: float = 5.0) -> None:
        self.topology, self.store, self.source, self.rule = topology, store, source, rule
        self.replica_args = (doc, str(Path(path).resolve()), overrides, [str(r.resolve()) for r in media_roots])
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
        from graphflow.serve.streams import check_stream_uri

        for row in self.store.streams():
            spec = row["spec"]
            try:
                if clashing(stream_id(spec), self.records) is not None:
                    raise GraphflowError(f"stream {spec['id']!r} is in the state file twice")
                check_stream_uri(spec, self.media_roots)
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
        from graphflow.serve.previews import graph_png

        return graph_png(self.topology)

    # controller --------------------------------------------------------------------------------------------
    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]:
        from graphflow.serve.streams import check_stream_uri

        stream = stream_id(spec)
        want = stream_labels(spec)
        check_stream_uri(spec, self.media_roots)
        with self.lock:
            other = clashing(stream, self.records)
            if other is not None:
                raise FileExistsError(f"stream {stream!r} exists (DELETE it first)" if other == stream else
                                      f"stream {stream!r} would share file names with stream {other!r}")
            rid = self.coordinator.place(stream, want)
            try:
                self.store.put_stream(spec)  # saved before it is sent: a StateError leaves nothing placed
            except BaseException:
                self.coordinator.remove(stream)
                raise
            self.records[stream] = _Stream(spec, None, rid)
        try:
            self._send_add(rid, stream)
        except USER_ERRORS:
            with self.lock:
                self.records.pop(stream, None)
                self.coordinator.remove(stream)
            self.store.delete_stream(stream)
            raise
        return self.stream(stream)

    def remove_stream(self, stream: str) -> None:
        with self.lock:
            if stream not in self.records:
                raise KeyError(stream)
            self.store.delete_stream(stream)  # deleted first: a StateError leaves the stream running
            del self.records[stream]
            rid = self.coordinator.remove(stream)
            node = self.nodes.get(rid) if rid else None
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
            out = {"id": stream, "uri": redact(rec.spec["uri"]),
                   "state": last.get("state") or ("connecting" if node else "pending"),
                   "frames": rec.frames_before + int(last.get("frames", 0)), "fps": last.get("fps", 0.0),
                   "drops": last.get("drops", 0), "events": rec.events_before + int(last.get("events", 0)),
                   "latency_ms": last.get("latency_ms") or {"p50": None, "p95": None},
                   "error": redact(last.get("error") or rec.error),
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
        from graphflow.vision.rules import RuleSet

        if self.rule is None:
            raise GraphflowError("this graph has no rule engine")
        with self.lock:
            rec = self.records.get(stream)
            if rec is None:
                raise KeyError(stream)
            node = self.nodes.get(rec.replica) if rec.replica else None
            before = rec.rules
        RuleSet(rules)  # checked, saved, then applied (a waiting stream's replica applies them when it starts)
        self.store.set_rules(stream, rules)
        if node is not None:
            try:
                self._call(node, "set_rules", stream, rules)
            except BaseException:
                self.store.set_rules(stream, before)
                raise
        with self.lock:
            rec.rules = rules
        return rules

    def graph(self) -> dict[str, Any]:
        from graphflow.serve.tap import TAP

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
        return not self.not_ready()

    def not_ready(self) -> str:
        with self.lock:
            if not self.watcher.is_alive():
                return "the cluster watcher has stopped"
            return "" if any(n.joined for n in self.nodes.values()) else "no replica has joined yet"

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
            except (TimeoutError, *USER_ERRORS) as exc:
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
                    rows.append((ts, stream, kind, body, ""))
        self.store.add_events(rows)
        self.feed.publish([{"stream": stream, "kind": kind, "seq": body.get("frame"), "event": body}
                           for _, stream, kind, body, _ in rows])
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


def _check_reachable(address: str) -> None:
    """A `HOST:PORT` that nothing answers on fails now in one line (Ray itself would retry for minutes). A loopback
    host is left to Ray, which reaches it through this machine's own address."""
    import socket

    from graphflow.serve.streams import is_loopback

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
