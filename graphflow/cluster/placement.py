"""Where streams run: a pure-Python `Coordinator` places streams on graph replicas by declared capacity, measured
load and labels, and re-places a lost replica's streams on the survivors. `graphflow serve --ray`
(graphflow/cluster/) drives it; it imports nothing heavy, so `bench/cluster.py` runs it with simulated replicas."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from graphflow.errors import GraphflowError

Labels = dict[str, Any]


class NoCapacity(TimeoutError):
    """No live replica has room for a stream (with its labels); the API answers 503."""


@dataclass(eq=False)
class ReplicaLoad:
    """What the coordinator knows of one replica: declared capacity and labels, its streams and measured load."""

    id: str
    capacity: int
    labels: Labels
    streams: set[str] = field(default_factory=set)
    busy: float = 0.0  # share of time its busiest infer engine ran batches, as last reported
    alive: bool = True
    version: int = 0  # bumped on every change; heap entries of older versions are stale

    def score(self) -> float:
        """The replica's load once one more stream is on it: the larger of its stream share and its infer busy
        share scaled to one more stream (0 = idle, 1 = full)."""
        n = len(self.streams)
        busy = self.busy * (n + 1) / n if n else self.busy
        return max((n + 1) / self.capacity, busy)

    def has_room(self) -> bool:
        return self.alive and len(self.streams) < self.capacity


class _Pool:
    """The replicas matching one label set, in a heap by score (lazy: stale entries are skipped when popped)."""

    def __init__(self, want: frozenset[tuple[str, Any]]) -> None:
        self.want = want
        self.heap: list[tuple[float, str, int]] = []
        self.members = 0

    def matches(self, labels: Labels) -> bool:
        return all(labels.get(k, _MISSING) == v for k, v in self.want)

    def push(self, r: ReplicaLoad, replicas: dict[str, ReplicaLoad]) -> None:
        if r.has_room():
            heapq.heappush(self.heap, (r.score(), r.id, r.version))
        if len(self.heap) > 4 * self.members + 64:  # mostly stale entries: keep the current ones only
            self.heap = [e for e in self.heap if e[1] in replicas and replicas[e[1]].version == e[2]]
            heapq.heapify(self.heap)

    def best(self, replicas: dict[str, ReplicaLoad]) -> ReplicaLoad | None:
        """The least loaded replica with room, leaving it in the heap."""
        while self.heap:
            _, rid, version = self.heap[0]
            r = replicas.get(rid)
            if r is not None and r.version == version and r.has_room():
                return r
            heapq.heappop(self.heap)
        return None


_MISSING = object()


class Coordinator:
    """Places streams on replicas: the least loaded live replica (stream share or infer busy share, whichever is
    higher) whose labels match the stream's, never above its declared capacity; ties go to the smaller replica
    id, so the same calls give the same placement. A lost replica's streams are re-placed on the survivors; those
    that find no room wait and are placed when a replica joins. No Ray here: it is driven by the front, and by
    bench/cluster.py with simulated replicas."""

    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaLoad] = {}
        self.where: dict[str, str] = {}  # stream → replica id
        self.wants: dict[str, frozenset[tuple[str, Any]]] = {}  # stream → its label constraint
        self.pending: dict[str, None] = {}  # streams with no room anywhere, in the order they came
        self._pools: dict[frozenset[tuple[str, Any]], _Pool] = {frozenset(): _Pool(frozenset())}

    # replicas -----------------------------------------------------------------------------------------------
    def add_replica(self, rid: str, capacity: int, labels: Labels | None = None) -> dict[str, str]:
        """A replica ready for streams; places waiting streams that fit it. Returns {stream: replica} placed."""
        if rid in self.replicas:
            raise ValueError(f"replica {rid!r} is known already")
        if capacity < 1:
            raise ValueError(f"replica {rid!r}: capacity must be ≥ 1 (got {capacity})")
        r = ReplicaLoad(rid, capacity, dict(labels or {}))
        self.replicas[rid] = r
        for pool in self._pools.values():
            if pool.matches(r.labels):
                pool.members += 1
        self._changed(r)
        return self._place_pending()

    def update_load(self, rid: str, busy: float) -> None:
        """A replica's measured infer busy share (0..1), as reported."""
        r = self.replicas.get(rid)
        if r is not None and r.alive and r.busy != busy:
            r.busy = min(max(float(busy), 0.0), 1.0)
            self._changed(r)

    def lose_replica(self, rid: str) -> dict[str, str | None]:
        """A replica died: its streams are placed on the others, in name order. Returns {stream: new replica, or
        None when it waits for room}."""
        r = self.replicas.get(rid)
        if r is None or not r.alive:
            return {}
        r.alive = False
        for pool in self._pools.values():
            if pool.matches(r.labels):
                pool.members -= 1
        moved: dict[str, str | None] = {}
        for stream in sorted(r.streams):
            del self.where[stream]
            moved[stream] = None
        r.streams.clear()
        self._changed(r)
        del self.replicas[rid]
        for stream in moved:
            try:
                moved[stream] = self._assign(stream, self.wants[stream])
            except NoCapacity:
                self.pending[stream] = None
        return moved

    # streams ------------------------------------------------------------------------------------------------
    def place(self, stream: str, want: Labels | None = None, wait: bool = False) -> str | None:
        """Put a new stream on the best replica for it and return that replica's id. With no room: NoCapacity
        (the stream is not kept), or with `wait` None (it waits for room). ValueError if the stream is placed or
        waiting already."""
        if stream in self.where or stream in self.pending:
            raise ValueError(f"stream {stream!r} is placed already")
        key = frozenset((want or {}).items())
        try:
            return self._assign(stream, key)
        except NoCapacity:
            if not wait:
                raise
            self.wants[stream] = key
            self.pending[stream] = None
            return None

    def remove(self, stream: str) -> str | None:
        """Free a stream; returns the replica it ran on (None if it was waiting or unknown)."""
        self.wants.pop(stream, None)
        self.pending.pop(stream, None)
        rid = self.where.pop(stream, None)
        if rid is not None:
            r = self.replicas[rid]
            r.streams.discard(stream)
            self._changed(r)
        return rid

    def streams_of(self, rid: str) -> set[str]:
        r = self.replicas.get(rid)
        return set(r.streams) if r is not None else set()

    # machinery ----------------------------------------------------------------------------------------------
    def _assign(self, stream: str, want: frozenset[tuple[str, Any]]) -> str:
        pool = self._pools.get(want)
        if pool is None:
            pool = self._pools[want] = _Pool(want)
            for r in self.replicas.values():
                if r.alive and pool.matches(r.labels):
                    pool.members += 1
                    pool.push(r, self.replicas)
        r = pool.best(self.replicas)
        if r is None:
            wanted = ", ".join(f"{k}={v!r}" for k, v in sorted(want, key=lambda kv: kv[0]))
            raise NoCapacity(f"no replica has room for stream {stream!r}" + (f" with node {wanted}" if wanted else "")
                             + f" ({sum(x.alive for x in self.replicas.values())} live replicas)")
        r.streams.add(stream)
        self.where[stream] = r.id
        self.wants[stream] = want
        self._changed(r)
        return r.id

    def _changed(self, r: ReplicaLoad) -> None:
        r.version += 1
        for pool in self._pools.values():
            if pool.matches(r.labels):
                pool.push(r, self.replicas)

    def _place_pending(self) -> dict[str, str]:
        placed: dict[str, str] = {}
        for stream in list(self.pending):
            try:
                placed[stream] = self._assign(stream, self.wants[stream])
            except NoCapacity:
                continue
            del self.pending[stream]
        return placed




def stream_labels(spec: dict[str, Any]) -> Labels:
    """The `node` labels a stream asks of its replica (`{"gpu": true}`, `{"zone": "north"}`); one-line errors."""
    want = spec.get("node", {})
    if not isinstance(want, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                             for k, v in want.items()):
        raise GraphflowError("streams.node: must be an object of labels with string, number or boolean values "
                             f"(got {want!r})")
    return dict(want)
