"""A replica: one node's copy of the service's graph, run as a Ray actor."""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

from graphflow.cluster.previews import PREVIEW_HOLD_S
from graphflow.errors import GraphflowError
from graphflow.serve.store import Store

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

    def add_events(self, events: list[tuple[float, str, str, dict[str, Any], str]]) -> None:
        with self.ring_lock:
            self.ring.extend((next(self.numbers), ts, stream, kind, body) for ts, stream, kind, body, _ in events)

    def since(self, cursor: int) -> list[tuple[int, float, str, str, dict[str, Any]]]:
        with self.ring_lock:
            return [e for e in self.ring if e[0] > cursor]


USER_ERRORS = (KeyError, FileExistsError, GraphflowError, ValueError)


def _answer(fn: Any, *args: Any) -> tuple[Any, ...]:
    """("ok", value), or ("error", kind, message) for a user's mistake, so it reaches the front as one line."""
    try:
        return ("ok", fn(*args))
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return ("error", type(exc).__name__, message)


class Replica:
    """One node's graph: a `Service` run inside a Ray actor, driven by the front through these methods."""

    def __init__(self, doc: dict[str, Any], path: str, overrides: dict[str, Any], media_roots: list[str]) -> None:
        from graphflow.serve.controller import Service
        from graphflow.serve.task import build_task

        self.store = _Relay()
        task = build_task(Path(path).stem, doc, path, overrides, where=path)
        self.service = Service(self.store, [Path(m) for m in media_roots])
        self.service.start([task])

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
        streams = {s["id"]: {**s, "kept": int(service.source_state(s["id"]).get("kept", 0))} for s in service.streams()}
        stats = [st for task in service.engine_stats().values() for st in task.values()]
        busy = [m["busy_fraction"] for m in ((st.get("metrics") or {}) for st in stats)
                if isinstance(m.get("busy_fraction"), (int, float))]
        return {"streams": streams, "events": self.store.since(cursor),
                "metrics": service.metrics()[0] if metrics else None,
                "graph": service.graph(), "busy": max(busy, default=0.0), "healthy": service.healthy()}

    def stop(self) -> int:
        """Drain and stop the graph; its exit code."""
        self.service.stop()
        return self.service.summary.exit_code if self.service.summary is not None else 1
