"""Live previews fetched from the replica that runs a stream."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREVIEW_HOLD_S = 2.0


class RemotePreviews:
    """The dashboard's previews (the interface of graphflow.serve.previews.Previews that graphflow.serve.api uses), fetched from
    the replica running each stream while someone watches: only the JPEGs cross machines, at most `max_fps` per
    stream. Numbers go on rising when a stream moves, so a viewer's `after` stays valid."""

    def __init__(self, front: Any, max_fps: float = 5.0) -> None:
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

    def _node(self, stream: str) -> Any:
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
