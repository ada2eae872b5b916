"""The service's controller: one running graph whose streams and rules change through the API."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError, Unavailable
from graphflow.graph.model import Graph
from graphflow.message import Message
from graphflow.serve.live import LiveFeed
from graphflow.serve.previews import Previews, graph_png
from graphflow.serve.store import Store
from graphflow.serve.streams import StreamMeter, check_stream_uri, each_stream, stream_id
from graphflow.serve.tap import TAP

log = logging.getLogger(__name__)


class Service:
    """Implements graphflow.serve.api.Controller over a running Launcher."""

    def __init__(self, graph: Graph, store: Store, source: str, rule: str | None,
                 media_roots: list[Path] | None = None, preview_fps: float = 5.0, preview_width: int = 640) -> None:
        from graphflow import runtime

        self.topology, self.store, self.source, self.rule = graph, store, source, rule
        self.media_roots = [r.resolve() for r in (media_roots or [])]
        self.meters: dict[str, StreamMeter] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.rules_of: dict[str, list[dict[str, Any]]] = {}
        self.feed = LiveFeed()
        self.lock = threading.Lock()
        self.pending: list[tuple[float, str, str, dict[str, Any]]] = []
        self.previews = Previews(max_fps=preview_fps, max_width=preview_width)
        self.launcher = runtime.Launcher(graph, on_progress=self._watch_lag, services={TAP: self})
        self.thread = threading.Thread(target=self._run, name="graph", daemon=True)
        self.summary: Any = None
        self.started = time.monotonic()

    # lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        self.launcher.started.wait(60)
        for row in self.store.streams():
            try:
                self._open(row["spec"], row["rules"])
            except (GraphflowError, ValueError) as exc:
                log.error("stream %r from the state file not restored: %s", row["spec"].get("id"), exc)

    def _run(self) -> None:
        try:
            self.summary = self.launcher.run()
        finally:
            self.flush_events()

    def stop(self) -> None:
        self.launcher.on_signal(15)
        self.thread.join(self.topology.settings.get("shutdown_timeout", 10.0) + 5)
        self.flush_events()
        self.previews.close()

    def graph_png(self) -> bytes:
        return graph_png(self.topology)

    # controller --------------------------------------------------------------------------------------------
    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]:
        stream = stream_id(spec)
        with self.lock:
            if stream in self.specs:
                raise FileExistsError(f"stream {stream!r} exists (DELETE it first)")
        trouble = self.not_ready()
        if trouble:  # its frames could not get through: refused rather than accepted and starved
            raise Unavailable(f"streams: not accepting streams now: {trouble}")
        self._check_uri(spec)
        self._open(spec, None)
        self.store.put_stream(spec)
        return self.stream(stream)

    def _check_uri(self, spec: dict[str, Any]) -> None:
        check_stream_uri(spec, self.media_roots)

    def _open(self, spec: dict[str, Any], rules: list[dict[str, Any]] | None) -> None:
        stream = spec["id"]
        self.launcher.command(self.source, "add_source", {"entry": spec})
        with self.lock:
            self.specs[stream] = spec
            self.meters[stream] = StreamMeter()
        if rules is not None and self.rule is not None:
            self.launcher.command(self.rule, "set_rules", {"stream": stream, "rules": rules})
            self.rules_of[stream] = rules

    def remove_stream(self, stream: str) -> None:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            del self.specs[stream]
            self.rules_of.pop(stream, None)
        self.store.delete_stream(stream)
        self.launcher.command(self.source, "remove_source", {"stream": stream})

    def stream_ended(self, stream: str) -> None:
        """Its end reached the tap: every engine upstream has freed its state for it."""
        with self.lock:
            if stream not in self.specs:
                self.meters.pop(stream, None)
                self.previews.forget(stream)

    def _state(self, stream: str) -> dict[str, Any]:
        stats = self.launcher.stats.get(self.source, {})
        return ((stats.get("metrics") or {}).get("sources") or {}).get(stream, {})

    def _drops(self, stream: str, stats: dict[str, dict[str, Any]] | None = None) -> int:
        """Frames of `stream` dropped on the way by a drop policy (frames thinned by its `fps` are not drops)."""
        stats = self.launcher.stats if stats is None else stats
        return sum(int((s.get("dropped_streams") or {}).get(stream, 0)) for s in stats.values())

    def _watch_lag(self, stats: dict[str, dict[str, Any]]) -> None:
        """At each stats interval: which streams cannot keep up (dropping frames, or late); one log line when a
        stream starts lagging and one when it keeps up again."""
        now = time.monotonic()
        with self.lock:
            meters = dict(self.meters)
        for stream, meter in meters.items():
            change = meter.watch(now, self._drops(stream, stats))
            if change is True:
                log.warning("stream %r is lagging: the graph cannot keep up with it (%d frames dropped so far, "
                            "p50 latency %s ms)", stream, meter.drops, meter.percentiles()["p50"])
            elif change is False:
                log.warning("stream %r keeps up again (%d frames dropped in all)", stream, meter.drops)

    def stream(self, stream: str) -> dict[str, Any]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            spec, meter = self.specs[stream], self.meters.get(stream) or StreamMeter()
        src = self._state(stream)
        state, error = self._health(src.get("state", "connecting"), src.get("error", ""))
        if state == "running" and meter.lagging:
            state = "lagging"
        return {"id": stream, "uri": spec["uri"], "state": state,
                "frames": meter.frames, "fps": round(meter.fps(time.monotonic()), 2),
                "drops": self._drops(stream),
                "events": meter.events, "latency_ms": meter.percentiles(), "error": error}

    def _health(self, state: str, error: str) -> tuple[str, str]:
        """A stream's state and error as the graph's health changes them: a stream still being read is `failed`
        when an engine is gone for good (its frames go nowhere), `stalled` while one restarts."""
        if state in ("ended", "failed", "stopped"):
            return state, error
        down = self.launcher.down()
        gone = [why for lost, why in down.values() if lost]
        if gone or not self.thread.is_alive():
            return "failed", gone[0] if gone else "the graph has stopped"
        if down:
            return "stalled", next(iter(down.values()))[1]
        return state, error

    def streams(self) -> list[dict[str, Any]]:
        with self.lock:
            ids = list(self.specs)
        return each_stream(ids, self.stream)

    def rules(self, stream: str) -> list[dict[str, Any]]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            return self.rules_of.get(stream, self._graph_rules())

    def _graph_rules(self) -> list[dict[str, Any]]:
        return list(self.topology.nodes[self.rule].params.get("rules", [])) if self.rule else []

    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.rule is None:
            raise GraphflowError("this graph has no rule engine")
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
        self.launcher.command(self.rule, "set_rules", {"stream": stream, "rules": rules})
        with self.lock:
            self.rules_of[stream] = rules
        self.store.set_rules(stream, rules)
        return rules

    def graph(self) -> dict[str, Any]:
        nodes = {}
        for eid, node in self.topology.nodes.items():
            if eid == TAP:
                continue
            s = self.launcher.stats.get(eid, {})
            nodes[eid] = {"type": node.type, "placement": node.placement,
                          "stats": {**{k: s.get(k) for k in ("state", "received", "sent", "dropped", "errors",
                                                             "busy_s", "depth", "restarts")},
                                    "streams_held": (s.get("metrics") or {}).get("streams_held")}}
        edges = [{"from": f"{e.src}.{e.src_port}", "to": f"{e.dst}.{e.dst_port}", "policy": e.policy}
                 for e in self.topology.edges if e.dst != TAP]
        return {"name": self.topology.name, "engines": nodes, "connections": edges}

    def healthy(self) -> bool:
        """The graph runs and no engine is gone for good (one restarting is still healthy)."""
        return self.thread.is_alive() and not any(gone for gone, _ in self.launcher.down().values())

    def ready(self) -> bool:
        return not self.not_ready()

    def not_ready(self) -> str:
        """Why the service cannot take streams now, "" when it can: starting, stopped, or an engine down."""
        if not self.thread.is_alive():
            return "the graph has stopped" + (f" ({self.launcher.stop_reason})" if self.launcher.stop_reason else "")
        if not self.launcher.started.is_set():
            return "the graph is starting (engines setting up)"
        down = self.launcher.down()
        return "; ".join(sorted({why for _, why in down.values()}))

    def events(self, stream: str | None, kind: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
        self.flush_events()
        return self.store.events(stream, kind, since, limit)

    def metrics(self) -> tuple[bytes, str]:
        from graphflow.serve.metrics import render

        return render(self)

    # the tap -----------------------------------------------------------------------------------------------
    def observe(self, msg: Message) -> None:
        now = time.monotonic()
        capture = msg.times.get("capture")
        latency = time.time() - capture if capture else None
        events = msg.data.get("events") or []
        with self.lock:
            meter = self.meters.get(msg.stream)
            if meter is None:
                return  # a removed stream's last frames
            meter.add(now, latency)
            meter.events += len(events)
        if events:
            ts = capture or time.time()
            rows = [(ts, msg.stream, str(ev.get("event", ev.get("kind", "event"))), ev) for ev in events]
            with self.lock:
                self.pending.extend(rows)
                flush = len(self.pending) >= 100
            self.feed.publish([{"stream": s, "kind": k, "seq": msg.seq, "event": ev} for _, s, k, ev in rows])
            if flush:
                self.flush_events()

    def flush_events(self) -> None:
        with self.lock:
            rows, self.pending = self.pending, []
        self.store.add_events(rows)
