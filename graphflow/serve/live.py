"""The live event feed: events fanned out to API subscribers, each with a bounded queue."""
from __future__ import annotations

import queue
import threading
from typing import Any


class LiveFeed:
    """The live event stream's subscribers: each reads its own bounded queue; one that does not read loses live
    events (the store keeps them) rather than holding up the graph."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._queues: list[queue.Queue] = []
        self._lock = threading.Lock()

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=self.size)
        with self._lock:
            self._queues.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._queues:
                self._queues.remove(q)

    def publish(self, items: list[dict[str, Any]]) -> None:
        """Hand `items` (one dict per event) to every subscriber."""
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            for item in items:
                try:
                    q.put_nowait(item)
                except queue.Full:
                    break
