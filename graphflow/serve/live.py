"""The live event feed: events fanned out to API subscribers, each with a bounded queue read by an asyncio task."""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


class Subscription:
    """One live reader's bounded queue: filled from any thread, read by one asyncio task (`take`), which waits on
    its loop without holding a thread. Items that do not fit are counted in `lost` (the store keeps them)."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.size, self.loop, self.lost = size, loop, 0
        self.items: deque[dict[str, Any]] = deque()
        self.ready = asyncio.Event()  # set (on the loop) after items were added

    def put(self, items: list[dict[str, Any]]) -> None:
        room = self.size - len(self.items)
        self.items.extend(items[:max(room, 0)])
        self.lost += max(len(items) - max(room, 0), 0)
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the reader's loop is closed: it is gone
            pass

    async def take(self, timeout: float) -> list[dict[str, Any]] | None:
        """Whatever the queue holds, waiting up to `timeout` s for the first item; None if nothing came."""
        if not self.items:
            self.ready.clear()
            if not self.items:  # put() appends before it sets `ready`: nothing can be missed between the checks
                try:
                    await asyncio.wait_for(self.ready.wait(), timeout)
                except TimeoutError:
                    return None
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out or None


class LiveFeed:
    """The live event stream's subscribers: each reads its own bounded queue; one that does not read loses live
    events (the store keeps them) rather than holding up the graph."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._subscriptions: list[Subscription] = []
        self._lock = threading.Lock()

    def subscribe(self) -> Subscription:
        """A new subscription, read from the running event loop."""
        sub = Subscription(self.size, asyncio.get_running_loop())
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    def publish(self, items: list[dict[str, Any]]) -> None:
        """Hand `items` (one dict per event) to every subscriber."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        for sub in subscriptions:
            sub.put(items)
