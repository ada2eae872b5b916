"""Cross-stream batching: frames queued per stream (a FairQueue: bounded, drop policies, fair rounds) become
batches when full or when the oldest frame's wait is over, under a cap an optional latency target adapts.

No graphflow runtime here: the infer and secondary engines drive it (through BatchPipeline), tests drive it directly.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphflow.batching.settings import BatchSettings
from graphflow.batching.stats import BatchStats
from graphflow.runtime.queues import FairQueue

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often blocked threads look at stop requests


@dataclass
class Queued:
    """One frame in the scheduler; `origin` (wall clock, the capture stamp when known) is where its end-to-end
    latency starts. (The wait deadline counts from its stamp in the fair queue, the scheduler's clock.)"""

    stream: str
    item: Any
    origin: float


class LatencyController:
    """Adapts the batch cap (and the wait with it) to hold the worst per-stream p95 latency under a target.

    Every `period_s`: over target with no backlog → halve the cap (waiting and batch time make the latency);
    over target with a backlog (most batches left full with frames still queued) → add one, since only more
    throughput lowers queueing; under 80% of target → add one to win throughput.
    """

    def __init__(self, settings: BatchSettings, period_s: float = 0.25) -> None:
        self.max_batch = settings.max_batch
        self.max_wait_s = settings.max_wait_ms / 1e3
        self.target_s = settings.target_latency_ms / 1e3
        self.period_s = period_s
        self.cap = settings.max_batch
        self._recent: dict[str, list[float]] = {}
        self._batches = 0
        self._backlogged = 0
        self._next_at: float | None = None

    @property
    def wait_s(self) -> float:
        return min(self.max_wait_s, self.target_s / 4) * self.cap / self.max_batch

    def batch(self, size: int, left: int) -> None:
        self._batches += 1
        self._backlogged += size >= self.cap and left > 0

    def observe(self, stream: str, latency_s: float, now: float) -> bool:
        """Record one frame's latency; at the end of a period adjust the cap. True when it changed."""
        self._recent.setdefault(stream, []).append(latency_s)
        if self._next_at is None:
            self._next_at = now + self.period_s
        if now < self._next_at:
            return False
        worst = max(float(np.percentile(v, 95)) for v in self._recent.values())
        target = self.target_s
        old = self.cap
        if worst > target and self._backlogged * 2 <= self._batches:
            self.cap = max(1, self.cap // 2)
        elif worst > target or worst < 0.8 * target:
            self.cap = min(self.max_batch, self.cap + 1)
        self._recent.clear()
        self._batches = self._backlogged = 0
        self._next_at = now + self.period_s
        return self.cap != old


class Scheduler:
    """Frames of every stream queued in one FairQueue (bounded per stream by `queue`, served in fair rounds,
    longest-waiting first) and taken as batches: `put` (producers) and `take` (the batch former) may run on
    different threads.

    Drop policies when a stream's queue is full: `block` makes `put` wait (back-pressure, lossless); `drop_oldest`
    drops that stream's oldest queued frame; `latest` keeps only each stream's newest frame (dropping the older
    ones as it comes), so no frame is processed stale. A batch goes when `cap` frames are queued or the oldest has
    waited `max_wait_ms` (under `latest`, a stream's frame waits since the first of those it replaced came).
    """

    def __init__(self, settings: BatchSettings, stats: BatchStats | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[Queued], None] | None = None) -> None:
        self.settings = settings
        self.max_wait_s = settings.max_wait_ms / 1e3
        self.stats = stats or BatchStats(settings.max_batch, clock=clock)
        self.clock = clock
        self.waiting = FairQueue(settings.drop, per_stream=settings.queue, on_drop=on_drop)  # on_drop: told of each
        # queued frame a drop policy dropped (under the scheduler's lock)
        self.block = settings.drop == "block"
        self.cond = threading.Condition()
        self.closed = False  # no more input: what is queued goes out without waiting
        self.rushing = 0  # producers at their end of input (see `rush`): what is queued goes out without waiting
        self.aborted = False  # stop now: what is queued is abandoned
        self.controller = LatencyController(settings) if settings.target_latency_ms > 0 else None
        self.lead_s = 0.0  # time to assemble a batch (set by the pipeline): a partial batch leaves that much early

    @property
    def queues(self) -> dict[str, deque]:
        """The per-stream queues of the streams with something queued (the FairQueue's own)."""
        return self.waiting.streams

    @property
    def cap(self) -> int:
        return self.controller.cap if self.controller else self.settings.max_batch

    @property
    def wait_s(self) -> float:
        return self.controller.wait_s if self.controller else self.max_wait_s

    def put(self, stream: str, item: Any, origin: float | None = None, stop: threading.Event | None = None,
            keep: bool = False) -> bool:
        """Queue a frame of `stream`; False when it was not queued because of a stop (block policy) or abort.
        `keep`: an item that is not a frame (a message passed on, a stream's end) — never dropped, never waits."""
        block = self.block and not keep
        with self.cond:
            if self.closed:
                raise RuntimeError(f"scheduler closed: frame of stream {stream!r} after end of stream")
            if stream not in self.waiting.streams:
                self.stats.revive(stream)
            full = block and self.waiting.full(stream)
            while full and not self.aborted and not (stop and stop.is_set()):
                self.cond.wait(POLL_S)
                full = self.waiting.full(stream)
            if self.aborted or full:
                self.stats.dropped(stream)  # stopped while waiting for room
                return False
            entry = Queued(stream, item, time.time() if origin is None else origin)
            dropped = self.waiting.append(stream, entry, self.clock(), keep)
            if dropped:  # made room (or replaced a stale frame): what a batch could take did not grow
                for name, n in dropped.items():
                    self.stats.dropped(name, n)
                return True
            # wake the taker only when its decision changes: the first frame starts a deadline, the frame that fills
            # the batch makes it due now (a wake-up per frame costs the GIL-bound threads dearly)
            ready = len(self.waiting)
            if ready == 1 or ready == self.cap:
                self.cond.notify_all()
            return True

    def take(self, ready_at: Callable[[], float | None] | None = None) -> list[Queued] | None:
        """Wait until a batch is due (cap reached, oldest frame's wait over, or closed) and, with `ready_at`,
        until the consumer is ready for it (a monotonic time; None: until notified); return it. None once
        closed and empty, or aborted."""
        with self.cond:
            while not self.aborted:
                delay = self._due()
                if delay is None and self.closed:
                    return None
                if delay == 0.0 and ready_at is not None:
                    at = ready_at()
                    delay = None if at is None else max(0.0, at - self.clock())
                if delay == 0.0:
                    batch = self._form()
                    self.cond.notify_all()
                    return batch
                self.cond.wait(delay)
            return None

    def poll(self) -> list[Queued] | None:
        """The batch `take` would return now, or None at once when none is due: for a caller that keeps its own
        time (a simulation on a fake clock)."""
        with self.cond:
            if self.aborted or self._due() != 0.0:
                return None
            batch = self._form()
            self.cond.notify_all()
            return batch

    @contextmanager
    def rush(self) -> Iterator[None]:
        """While inside, queued frames go out without waiting for their batch to fill: one producer of several
        sharing this scheduler is at its end of input and waits for its frames, while the others go on."""
        with self.cond:
            self.rushing += 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.rushing -= 1

    def close(self) -> None:
        """End of input: queued frames are dispatched at once, then `take` returns None."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def abort(self) -> None:
        """Stop: wake every waiter; `take` returns None and `put` refuses."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def forget(self, stream: str) -> None:
        """`stream` ended and none of its frames is queued: it leaves the round; its stats record is retired."""
        with self.cond:
            self.waiting.forget(stream)
        self.stats.retire(stream)

    def depths(self) -> dict[str, int]:
        with self.cond:
            return {name: len(q) for name, q in self.queues.items()}

    def completed(self, entry: Queued, now_wall: float | None = None) -> None:
        """A frame left the stage: record its end-to-end latency and let the controller adapt."""
        latency = (time.time() if now_wall is None else now_wall) - entry.origin
        self.stats.done(entry.stream, latency)
        if self.controller is not None:
            with self.cond:
                if self.controller.observe(entry.stream, latency, self.clock()):
                    log.debug("batch cap now %d (wait %.1f ms)", self.controller.cap, self.controller.wait_s * 1e3)
                    self.cond.notify_all()

    def metrics(self) -> dict[str, Any]:
        extra = {"batch_cap": self.cap, "wait_ms": round(self.wait_s * 1e3, 2)} if self.controller else None
        return self.stats.snapshot(self.depths(), extra)

    def _due(self) -> float | None:
        """0.0 when a batch should go now, else seconds until the oldest frame's deadline; None when empty."""
        oldest = self.waiting.oldest()
        if oldest is None:
            return None
        if len(self.waiting) >= self.cap or self.closed or self.rushing:
            return 0.0
        # the oldest frame waits at most wait_s until its batch is *ready to run*: assembling it counts too
        delay = oldest + self.wait_s - min(self.lead_s, self.wait_s / 2) - self.clock()
        return delay if delay > 0 else 0.0

    def _form(self) -> list[Queued]:
        """Take up to `cap` frames in the queue's fair round order (a round goes on across batches)."""
        depth = len(self.waiting)
        batch = [self.waiting.popleft() for _ in range(min(self.cap, depth))]
        self.stats.batch(len(batch), depth)
        if self.controller is not None:
            self.controller.batch(len(batch), depth - len(batch))
        return batch
