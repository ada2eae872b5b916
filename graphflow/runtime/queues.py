"""Per-stream fair queues: a FIFO per stream, served in rounds, bounded per stream and in all, with the drop policy
a connection or a batching stage applies when full. One implementation for both (links.StreamQueue, the batching
Scheduler); not thread-safe: its owner holds its own lock."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

DROP_POLICIES = ("block", "latest", "drop_oldest")


class FairQueue:
    """Items of many streams, taken in rounds: each stream with an item queued gives one per round, and within a
    round streams go in the order they started waiting (their oldest item's stamp), so a busy stream cannot crowd
    the others out and a stream that joins, or whose item comes late, does not overtake items already waiting. A
    round goes on across `popleft` calls until every stream with an item has had its turn or nothing is queued.

    Bounds: `per_stream` items of one stream, `capacity` in all (None: none). Over a bound, `drop_oldest` and
    `latest` drop the oldest item of the stream with the most queued (ties: the one waiting longest); `latest`
    also keeps only each stream's newest item, which takes the place of those it replaces (the stream keeps its
    turn and its waiting time). `block` never drops: the owner waits for room (`full`) before it appends.
    An item appended with `keep=True` (a stream's end marker) is never dropped, counts against no bound and keeps
    its place in its stream's order. A stream drops out of `streams` when nothing of it is queued."""

    def __init__(self, policy: str, per_stream: int | None = None, capacity: int | None = None,
                 on_drop: Callable[[Any], None] | None = None) -> None:
        if policy not in DROP_POLICIES:
            raise ValueError(f"drop policy must be one of {', '.join(DROP_POLICIES)} (got {policy!r})")
        self.policy, self.per_stream, self.capacity = policy, per_stream, capacity
        self.latest, self.drops = policy == "latest", policy != "block"
        self.streams: dict[str, deque[tuple[Any, bool, Any]]] = {}  # (stamp, kept, item), oldest first
        self.counts: dict[str, int] = {}  # items that count against the bounds (not kept ones), per queued stream
        self.size = 0  # counted items in all
        self.kept = 0  # kept items in all
        self.turn: deque[str] = deque()  # streams still to give an item this round, in order
        self.served: set[str] = set()  # streams that gave theirs this round
        self.on_drop = on_drop  # told of each item dropped (e.g. to settle what its producer waits for)

    def __len__(self) -> int:
        return self.size + self.kept

    def full(self, stream: str) -> bool:
        """Whether one more counted item of `stream` would pass a bound."""
        return ((self.per_stream is not None and self.counts.get(stream, 0) >= self.per_stream)
                or (self.capacity is not None and self.size >= self.capacity))

    def oldest(self) -> Any:
        """The stamp of the item waiting longest (a stream's head), None when empty."""
        return min((q[0][0] for q in self.streams.values()), default=None)

    def append(self, stream: str, item: Any, stamp: Any, keep: bool = False) -> dict[str, int]:
        """Queue `item` of `stream`, stamped `stamp` (its arrival: a clock reading or a counter, never less than
        earlier stamps); returns the items dropped to make room, per stream."""
        q = self.streams.get(stream)
        if q is None:
            q = self.streams[stream] = deque()
            self.counts[stream] = 0
            if stream not in self.served:  # its head is the newest item: last in this round's order
                self.turn.append(stream)
        if keep:
            q.append((stamp, True, item))
            self.kept += 1
            return {}
        if self.latest and self.counts[stream]:
            return self._replace(stream, q, item)
        q.append((stamp, False, item))
        self.counts[stream] += 1
        self.size += 1
        if not self.drops:
            return {}
        dropped: dict[str, int] = {}
        if self.per_stream is not None and self.counts[stream] > self.per_stream:
            dropped[stream] = self._drop(stream, 1)
        while self.capacity is not None and self.size > self.capacity:
            victim = self._victim()
            dropped[victim] = dropped.get(victim, 0) + self._drop(victim, 1)
        return dropped

    def popleft(self) -> Any:
        """The next item in round order; IndexError when empty."""
        if not self.turn:  # every stream with an item had its turn: a new round, longest waiting first
            self.served.clear()
            self.turn = deque(sorted(self.streams, key=lambda s: self.streams[s][0][0]))
        stream = self.turn.popleft()  # IndexError when nothing is queued
        q = self.streams[stream]
        _, kept, item = q.popleft()
        if kept:
            self.kept -= 1
        else:
            self.size -= 1
            self.counts[stream] -= 1
        if not q:
            del self.streams[stream], self.counts[stream]
        if self.size or self.kept:
            self.served.add(stream)
        else:  # nothing waits: the next item starts a new round
            self.served.clear()
        return item

    def forget(self, stream: str) -> None:
        """`stream` ended: if nothing of it is queued, it no longer counts as served in this round."""
        if stream not in self.streams:
            self.served.discard(stream)

    def _replace(self, stream: str, q: deque[tuple[Any, bool, Any]], item: Any) -> dict[str, int]:
        """`latest`: `item` takes the place of the counted items of `stream` (their oldest one's stamp: the stream
        waits since it came), which are dropped; its kept items stay where they are."""
        stale = self.counts[stream]
        stamp = self._head(stream) if self.kept else q[0][0]
        if not self.kept:  # every queued item is counted
            if self.on_drop is not None:
                for _, _, old in q:
                    self.on_drop(old)
            q.clear()
            q.append((stamp, False, item))
            self.counts[stream] = 1
            self.size -= stale - 1
            return {stream: stale}
        q.append((stamp, False, item))
        self.counts[stream] += 1
        self.size += 1
        return {stream: self._drop(stream, stale)}

    def _dropped(self, item: Any) -> None:
        if self.on_drop is not None:
            self.on_drop(item)

    def _victim(self) -> str:
        """The stream that pays for room: the one with the most counted items; of those, the one waiting longest."""
        most = max(self.counts.values())
        tied = [s for s, n in self.counts.items() if n == most]
        if len(tied) == 1:
            return tied[0]
        if not self.kept:  # every head is a counted item
            return min(tied, key=lambda s: self.streams[s][0][0])
        return min(tied, key=self._head)

    def _head(self, stream: str) -> Any:
        """Stamp of the oldest counted item of `stream`."""
        return next(stamp for stamp, kept, _ in self.streams[stream] if not kept)

    def _drop(self, stream: str, n: int) -> int:
        """Drop the `n` oldest counted items of `stream` (kept ones stay, in order); returns n."""
        q = self.streams[stream]
        if not self.kept:  # nothing kept anywhere: the oldest are the first
            for _ in range(n):
                self._dropped(q.popleft()[2])
        else:
            left, rest = n, deque()
            for entry in q:
                if left and not entry[1]:
                    left -= 1
                    self._dropped(entry[2])
                    continue
                rest.append(entry)
            q = self.streams[stream] = rest
        self.counts[stream] -= n
        self.size -= n
        if not q:  # nothing of it left: it leaves the round's order too
            del self.streams[stream], self.counts[stream]
            if stream in self.turn:
                self.turn.remove(stream)
        return n
