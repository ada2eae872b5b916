"""The service's controller: one running graph whose streams and rules change through the API."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.graph.model import Graph
from graphflow.message import Message
from graphflow.serve.live import LiveFeed
from graphflow.serve.previews import Previews, graph_png
from graphflow.serve.store import StateError, Store
from graphflow.serve.streams import StreamMeter, check_stream_uri, clashing, each_stream, redact, stream_id
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
        self.changing = threading.Lock()  # one change (add, remove, rules) at a time: each is saved, then applied
        self.pending: list[tuple[float, str, str, dict[str, Any]]] = []
        self.unsaved_events = 0  # events the state file refused (full disk): delivered live, not kept
        self.previews = Previews(max_fps=preview_fps, max_width=preview_width)
        self.launcher = runtime.Launcher(graph, services={TAP: self})
        self.thread = threading.Thread(target=self._run, name="graph", daemon=True)
        self.summary: Any = None
        self.started = time.monotonic()

    # lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        self.launcher.started.wait(60)
        for row in self.store.streams():
            try:
                self._admit(row["spec"])
                self._open(row["spec"], row["rules"])
            except (GraphflowError, ValueError, FileExistsError) as exc:
                log.error("stream %r from the state file not restored: %s", redact(str(row["spec"].get("id"))[:80]),
                          redact(str(exc)))

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
        """Checked, saved, then opened; a stream that does not open is taken out of the state file again."""
        with self.changing:
            stream = self._admit(spec)
            self.store.put_stream(spec)
            try:
                self._open(spec, None)
            except BaseException:
                self.store.delete_stream(stream)
                raise
        return self.stream(stream)

    def _admit(self, spec: dict[str, Any]) -> str:
        """The checks a new stream passes, from the API or the state file: its id, and its uri (made absolute)."""
        stream = stream_id(spec)
        with self.lock:
            other = clashing(stream, self.specs)
        if other is not None:
            raise FileExistsError(f"stream {stream!r} exists (DELETE it first)" if other == stream else
                                  f"stream {stream!r} would share file names with stream {other!r}")
        check_stream_uri(spec, self.media_roots)
        return stream

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
        """Deleted from the state file, then stopped; when the file refuses the change the stream goes on."""
        with self.changing:
            with self.lock:
                if stream not in self.specs:
                    raise KeyError(stream)
            self.store.delete_stream(stream)
            with self.lock:
                del self.specs[stream]
                self.rules_of.pop(stream, None)
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

    def _drops(self, stream: str) -> int:
        """Frames of `stream` dropped on the way by a drop policy (frames thinned by its `fps` are not drops)."""
        return sum(int((s.get("dropped_streams") or {}).get(stream, 0)) for s in self.launcher.stats.values())

    def stream(self, stream: str) -> dict[str, Any]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            spec, meter = self.specs[stream], self.meters.get(stream) or StreamMeter()
        src = self._state(stream)
        return {"id": stream, "uri": redact(spec["uri"]), "state": src.get("state", "connecting"),
                "frames": meter.frames, "fps": round(meter.fps(time.monotonic()), 2),
                "drops": self._drops(stream),
                "events": meter.events, "latency_ms": meter.percentiles(), "error": redact(src.get("error", ""))}

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
        """Checked, saved, then applied; rules the engine refuses after all are taken out of the state file again."""
        from graphflow.vision.rules import RuleSet

        if self.rule is None:
            raise GraphflowError("this graph has no rule engine")
        RuleSet(rules)
        with self.changing:
            with self.lock:
                if stream not in self.specs:
                    raise KeyError(stream)
                before = self.rules_of.get(stream)
            self.store.set_rules(stream, rules)
            try:
                self.launcher.command(self.rule, "set_rules", {"stream": stream, "rules": rules})
            except BaseException:
                self.store.set_rules(stream, before)
                raise
            with self.lock:
                self.rules_of[stream] = rules
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
        return self.thread.is_alive()

    def ready(self) -> bool:
        return self.launcher.started.is_set() and self.thread.is_alive()

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
        """Save the pending events; when the state file refuses them they are counted in `unsaved_events` (they
        were delivered live already)."""
        with self.lock:
            rows, self.pending = self.pending, []
        try:
            self.store.add_events(rows)
        except StateError as exc:
            self.unsaved_events += len(rows)
            log.error("%s", exc)
