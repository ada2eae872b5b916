"""Cross-stream batching: per-stream bounded queues, batches formed in fair rounds (longest-waiting first) with a
deadline, drop policies, an optional latency-driven batch cap, a three-stage pipeline (assemble → run → finish)
and the records of all that.

No graphflow runtime here: the infer engine drives it, and tests drive it directly.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphflow.engine import Param
from graphflow.graph.fields import schema

log = logging.getLogger(__name__)

DROP_POLICIES = ("block", "latest", "drop_oldest")
WINDOW_S = 0.1  # utilisation timeline resolution
TIMELINE_KEEP = 600  # windows kept for metrics (one minute); busy_fraction/busy_cv cover the whole run
LATENCY_KEEP = 1000  # latencies kept per stream for its percentiles
RETIRED_KEEP = 256  # ended streams whose records stay for the summary
POLL_S = 0.1  # how often blocked threads look at stop requests


BATCH_POLICY = schema(
    max_batch=Param(int, 1, ge=1, doc="most frames in one batch"),
    max_wait_s=Param(float, 0.0, ge=0.0, doc="seconds the oldest queued frame waits for its batch to fill"),
    queue=Param(int, 8, ge=1, doc="frames queued per stream before the drop policy applies"),
    drop=Param(str, "block", choices=DROP_POLICIES,
               doc="a full stream queue: block the sender, keep only the newest frame, or drop the oldest"),
    target_latency_s=Param(float, 0.0, ge=0.0, doc="worst per-stream p95 latency the batch cap adapts to (0: off)"))


@dataclass(frozen=True)
class BatchPolicy:
    """How frames become batches: size and wait limits, per-stream queue bound, drop policy, latency target; each
    field checked by its Param in BATCH_POLICY (ParamError naming the field)."""

    max_batch: int = BATCH_POLICY["max_batch"].default
    max_wait_s: float = BATCH_POLICY["max_wait_s"].default
    queue: int = BATCH_POLICY["queue"].default
    drop: str = BATCH_POLICY["drop"].default
    target_latency_s: float = BATCH_POLICY["target_latency_s"].default

    def __post_init__(self) -> None:
        for name, p in BATCH_POLICY.items():
            object.__setattr__(self, name, p.coerce(getattr(self, name)))


@dataclass
class Queued:
    """One frame in the scheduler: `arrived` (monotonic) drives the wait deadline, `origin` (wall clock, the
    capture stamp when known) is where its end-to-end latency starts."""

    stream: str
    item: Any
    arrived: float
    origin: float


def percentile(ordered: np.ndarray, q: float) -> float:
    """The q-th percentile of sorted values, interpolated linearly (NumPy's default), without np.percentile's
    overhead: snapshots compute several per stream many times a second."""
    pos = q / 100 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass
class StreamRecord:
    """Per-stream counts and the last LATENCY_KEEP end-to-end latencies (seconds, a ring in arrival order
    modulo its size), with their p50/p95 cached until a new one arrives: stats snapshots come often."""

    frames: int = 0
    dropped: int = 0
    latencies: np.ndarray = field(default_factory=lambda: np.empty(LATENCY_KEEP))
    _cached: tuple[int, float | None, float | None] = (0, None, None)

    def add(self, latency_s: float) -> None:
        self.latencies[self.frames % len(self.latencies)] = latency_s
        self.frames += 1

    def percentiles_ms(self) -> tuple[float | None, float | None]:
        """(p50, p95) of the kept latencies in ms, None before the first."""
        if self._cached[0] != self.frames:
            ordered = np.sort(self.latencies[:min(self.frames, len(self.latencies))])
            p50, p95 = (round(percentile(ordered, q) * 1e3, 2) for q in (50, 95))
            self._cached = (self.frames, p50, p95)
        return self._cached[1], self._cached[2]


class BatchStats:
    """Thread-safe records of a batching stage: accelerator busy timeline, batch sizes, queue depth at dispatch,
    per-stream latency and drops. `running()` brackets work on the accelerator; busy time is the share of its
    `slots` (model instances running at once) in use, so one instance busy of two is half busy. A device that
    times its own work (GPU events) reports it through `busy_span()` instead."""

    def __init__(self, max_batch: int, slots: int = 1, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch = max_batch
        self.slots = slots
        self.window_s = window_s
        self.clock = clock
        self.lock = threading.Lock()
        self.streams: dict[str, StreamRecord] = {}
        self._retired: OrderedDict[str, None] = OrderedDict()  # ended streams whose records are kept, oldest first
        self._retired_dropped = 0  # drops of ended streams whose records are gone
        self.batches = 0
        self.batched = 0
        self.depth_sum = 0
        self.max_depth = 0
        self.failed_frames = 0
        self.run_s = 0.0  # host wall time of the model runs (call to return), all batches
        self._t0: float | None = None  # start of window 0: the first busy moment
        self._open: dict[int, float] = {}  # busy seconds of windows not yet closed
        self._timeline: deque[float] = deque(maxlen=TIMELINE_KEEP)
        self._closed = 0  # windows closed so far (index of the next one to close)
        self._sum = 0.0
        self._sumsq = 0.0
        self._active = 0  # brackets open now
        self._since = 0.0  # last change of `_active`
        self._span_end = float("-inf")  # end of the latest device span credited

    def _stream(self, name: str) -> StreamRecord:
        rec = self.streams.get(name)
        if rec is None:
            rec = self.streams[name] = StreamRecord()
        return rec

    def dropped(self, stream: str, n: int = 1) -> None:
        with self.lock:
            self._stream(stream).dropped += n

    def retire(self, stream: str) -> None:
        """`stream` ended: its record stays for the summary among the last RETIRED_KEEP ended streams, then goes
        (its drops still count in the total), so streams coming and going do not grow these records."""
        with self.lock:
            if stream not in self.streams:
                return
            self._retired[stream] = None
            self._retired.move_to_end(stream)
            while len(self._retired) > RETIRED_KEEP:
                old, _ = self._retired.popitem(last=False)
                rec = self.streams.pop(old, None)
                self._retired_dropped += rec.dropped if rec is not None else 0

    def revive(self, stream: str) -> None:
        """`stream` sends frames again (an id used anew): its record is live again."""
        if stream in self._retired:
            with self.lock:
                self._retired.pop(stream, None)

    def batch(self, size: int, depth: int) -> None:
        """A batch of `size` frames left the queues, which held `depth` frames in all just before."""
        with self.lock:
            self.batches += 1
            self.batched += size
            self.depth_sum += depth
            self.max_depth = max(self.max_depth, depth)

    def done(self, stream: str, latency_s: float) -> None:
        with self.lock:
            self._stream(stream).add(latency_s)

    def ran(self, seconds: float) -> None:
        """A batch's run took `seconds` on the host (from the call to the model to its results)."""
        with self.lock:
            self.run_s += seconds

    def failed(self, n: int) -> None:
        with self.lock:
            self.failed_frames += n

    @contextmanager
    def running(self) -> Iterator[None]:
        """Mark one slot of the accelerator busy for the duration of the block."""
        with self.lock:
            now = self.clock()
            if self._t0 is None:
                self._t0 = now
            self._account(now)
            self._active += 1
        try:
            yield
        finally:
            with self.lock:
                self._account(self.clock())
                self._active -= 1

    @contextmanager
    def measured(self, span: Callable[[], tuple[float, float] | None] | None = None) -> Iterator[None]:
        """Bracket one batch's run: record its host time (`ran`) and credit busy time — the device's own span when
        `span` (a reader of it, such as TorchBackend.device_span) gives one, else the host's interval."""
        t0 = self.clock()
        try:
            if span is None:
                with self.running():
                    yield
            else:
                yield
        finally:
            t1 = self.clock()
            if span is not None:
                self.busy_span(*(span() or (t0, t1)))
            self.ran(t1 - t0)

    def busy_span(self, t0: float, t1: float) -> None:
        """Credit the accelerator busy over [t0, t1] (clock seconds), as measured on the device itself (GPU-side
        events): the device is one, so overlapping spans of several instances count once — a span is clipped to
        start after the latest one credited. Use either this or `running()` for one stage, not both."""
        with self.lock:
            if self._t0 is None:
                self._t0 = t0
            t0 = max(t0, self._t0, self._span_end)
            if t1 > t0:
                self._add_busy(t0, t1, 1.0)
                self._span_end = t1

    def _account(self, now: float) -> None:
        """Credit the time since the last change at the level of busy slots it had."""
        if self._active:
            self._add_busy(self._since, now, min(self._active, self.slots) / self.slots)
        self._since = now

    def _add_busy(self, t0: float, t1: float, level: float) -> None:
        """Spread [t0, t1] at `level` over its windows, then close the windows before t1's."""
        w, origin = self.window_s, self._t0
        last = int((t1 - origin) / w)
        for index in range(int((t0 - origin) / w), last + 1):
            busy = min(t1, origin + (index + 1) * w) - max(t0, origin + index * w)
            if busy > 0:
                self._open[index] = self._open.get(index, 0.0) + busy * level
        self._close_until(last)

    def _close_until(self, index: int) -> None:
        """Close windows before `index`. Only windows up to the latest busy moment close, so idle time after
        the last batch (end of stream, shutdown) never counts; the window holding that moment stays open."""
        for i in range(self._closed, index):
            frac = min(1.0, self._open.pop(i, 0.0) / self.window_s)
            self._timeline.append(round(frac, 3))
            self._sum += frac
            self._sumsq += frac * frac
        self._closed = max(self._closed, index)

    def snapshot(self, depths: dict[str, int], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Scalars for the launch summary (p50/p95: the worst stream's), plus `timeline` (busy fraction of the
        last TIMELINE_KEEP windows) and `streams` (per-stream frames, drops, queue, p50/p95) for the stats file."""
        with self.lock:
            if self._active:  # credit the batches in flight so the windows they already cover close
                self._account(self.clock())
            n = self._closed
            mean = self._sum / n if n else None
            cv = (max(0.0, self._sumsq / n - mean * mean) ** 0.5 / mean) if n > 1 and mean else None
            streams = {name: {"frames": r.frames, "dropped": r.dropped, "queue": depths.get(name, 0),
                              **dict(zip(("p50_ms", "p95_ms"), r.percentiles_ms()))}
                       for name, r in sorted(self.streams.items())}
            p50 = [s["p50_ms"] for s in streams.values() if s["p50_ms"] is not None]
            p95 = [s["p95_ms"] for s in streams.values() if s["p95_ms"] is not None]
            mean_batch = self.batched / self.batches if self.batches else None
            return {
                "batches": self.batches,
                "mean_batch": round(mean_batch, 3) if mean_batch is not None else None,
                "mean_batch_fill": round(mean_batch / self.max_batch, 3) if mean_batch is not None else None,
                "mean_run_ms": round(self.run_s / self.batches * 1e3, 3) if self.batches else None,
                "busy_fraction": round(mean, 3) if mean is not None else None,
                "busy_cv": round(cv, 3) if cv is not None else None,
                "queue_depth": sum(depths.values()),
                "mean_queue_depth": round(self.depth_sum / self.batches, 2) if self.batches else None,
                "max_queue_depth": self.max_depth,
                "dropped": sum(r.dropped for r in self.streams.values()) + self._retired_dropped,
                "failed_frames": self.failed_frames,
                "p50_ms": max(p50) if p50 else None,  # the worst stream's
                "p95_ms": max(p95) if p95 else None,
                **(extra or {}),
                "timeline": {"window_s": self.window_s, "busy": list(self._timeline)},
                "streams": streams,
            }


class LatencyController:
    """Adapts the batch cap (and the wait with it) to hold the worst per-stream p95 latency under a target.

    Every `period_s`: over target with no backlog → halve the cap (waiting and batch time make the latency);
    over target with a backlog (most batches left full with frames still queued) → add one, since only more
    throughput lowers queueing; under 80% of target → add one to win throughput.
    """

    def __init__(self, policy: BatchPolicy, period_s: float = 0.25) -> None:
        self.policy = policy
        self.period_s = period_s
        self.cap = policy.max_batch
        self._recent: dict[str, list[float]] = {}
        self._batches = 0
        self._backlogged = 0
        self._next_at: float | None = None

    @property
    def wait_s(self) -> float:
        p = self.policy
        return min(p.max_wait_s, p.target_latency_s / 4) * self.cap / p.max_batch

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
        target = self.policy.target_latency_s
        old = self.cap
        if worst > target and self._backlogged * 2 <= self._batches:
            self.cap = max(1, self.cap // 2)
        elif worst > target or worst < 0.8 * target:
            self.cap = min(self.policy.max_batch, self.cap + 1)
        self._recent.clear()
        self._batches = self._backlogged = 0
        self._next_at = now + self.period_s
        return self.cap != old


class Scheduler:
    """Per-stream bounded FIFO queues feeding batches formed in rounds, longest-waiting first (see `_form`). `put`
    (producers) and `take` (the batch former) may run on different threads.

    drop policies when a stream's queue is full: `block` makes `put` wait (back-pressure, lossless);
    `drop_oldest` drops that stream's oldest queued frame; `latest` does the same and, when a batch is formed,
    takes only each stream's newest frame and drops the older ones, so no frame is processed stale.
    """

    def __init__(self, policy: BatchPolicy, stats: BatchStats | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[Queued], None] | None = None) -> None:
        self.policy = policy
        self.on_drop = on_drop  # told of each queued frame a drop policy dropped (under the scheduler's lock)
        self.stats = stats or BatchStats(policy.max_batch, clock=clock)
        self.clock = clock
        self.queues: dict[str, deque[Queued]] = {}
        self.cond = threading.Condition()
        self.closed = False  # no more input: what is queued goes out without waiting
        self.rushing = 0  # producers at their end of input (see `rush`): what is queued goes out without waiting
        self.aborted = False  # stop now: what is queued is abandoned
        self._round: set[str] = set()  # streams served in the current round (see _form)
        self.controller = LatencyController(policy) if policy.target_latency_s > 0 else None
        self.lead_s = 0.0  # time to assemble a batch (set by the pipeline): a partial batch leaves that much early

    @property
    def cap(self) -> int:
        return self.controller.cap if self.controller else self.policy.max_batch

    @property
    def wait_s(self) -> float:
        return self.controller.wait_s if self.controller else self.policy.max_wait_s

    def put(self, stream: str, item: Any, origin: float | None = None, stop: threading.Event | None = None) -> bool:
        """Queue a frame of `stream`; False when it was not queued because of a stop (block policy) or abort."""
        with self.cond:
            if self.closed:
                raise RuntimeError(f"scheduler closed: frame of stream {stream!r} after end of stream")
            q = self.queues.get(stream)
            if q is None:
                q = self.queues[stream] = deque()
                self.stats.revive(stream)
            while (self.policy.drop == "block" and len(q) >= self.policy.queue and not self.aborted
                   and not (stop and stop.is_set())):
                self.cond.wait(POLL_S)
            if self.aborted or (self.policy.drop == "block" and len(q) >= self.policy.queue):
                self.stats.dropped(stream)  # stopped while waiting for room
                return False
            grew = not q or self.policy.drop != "latest"  # whether this frame adds to what _due counts as ready
            if len(q) >= self.policy.queue:
                self._dropped(q.popleft())
                grew = False
            q.append(Queued(stream, item, self.clock(), time.time() if origin is None else origin))
            if grew:
                # wake the taker only when its decision changes: the first frame starts a deadline, the frame that
                # fills the batch makes it due now (a wake-up per frame costs the GIL-bound threads dearly)
                ready = self._ready()
                if ready == 1 or ready == self.cap:
                    self.cond.notify_all()
            return True

    def _dropped(self, entry: Queued) -> None:
        self.stats.dropped(entry.stream)
        if self.on_drop is not None:
            self.on_drop(entry)

    def _ready(self) -> int:
        """Frames a batch could take now: one per stream under `latest`, else all queued."""
        if self.policy.drop == "latest":
            return sum(1 for q in self.queues.values() if q)
        return sum(len(q) for q in self.queues.values())

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
        """`stream` ended and none of its frames is queued: drop its queue; its stats record is retired."""
        with self.cond:
            if not self.queues.get(stream):
                self.queues.pop(stream, None)
                self._round.discard(stream)
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
        heads = [q[0].arrived for q in self.queues.values() if q]
        if not heads:
            return None
        ready = self._ready()
        if ready >= self.cap or self.closed or self.rushing:
            return 0.0
        # the oldest frame waits at most wait_s until its batch is *ready to run*: assembling it counts too
        delay = min(heads) + self.wait_s - min(self.lead_s, self.wait_s / 2) - self.clock()
        return delay if delay > 0 else 0.0

    def _form(self) -> list[Queued]:
        """Take up to `cap` frames in rounds: each stream with a frame queued gives one per round (so a busy stream
        cannot starve the others), and within a round the stream whose frame has waited longest goes first (so a
        stream that joins, or a frame that comes late, does not overtake frames already waiting). A round goes on
        across batches until every stream with a frame has had its turn, or nothing is left waiting."""
        depth = sum(len(q) for q in self.queues.values())
        latest = self.policy.drop == "latest"
        batch: list[Queued] = []
        given: set[str] = set()  # under `latest` a stream gives at most its newest frame to a batch
        fresh = False  # whether `turn` below is a whole new round
        while len(batch) < self.cap:
            # this round's remaining turns, longest-waiting first: sorted once per round, not per frame
            turn = sorted((q[-1 if latest else 0].arrived, i, name) for i, (name, q) in enumerate(self.queues.items())
                          if q and name not in given and (fresh or name not in self._round))
            if not turn:
                if fresh:
                    break  # nothing left to take
                self._round.clear()  # every stream with a frame had its turn: a new round
                fresh = True
                continue
            for _, _, name in turn[:self.cap - len(batch)]:
                q = self.queues[name]
                if latest and len(q) > 1:
                    for _ in range(len(q) - 1):
                        self._dropped(q.popleft())
                batch.append(q.popleft())
                self._round.add(name)
                if latest:
                    given.add(name)
            fresh = False
        left = sum(len(q) for q in self.queues.values())
        if not left:  # nothing waits: the next frame starts a new round
            self._round.clear()
        self.stats.batch(len(batch), depth)
        if self.controller is not None:
            self.controller.batch(len(batch), left)
        return batch


ErrorHandler = Callable[[list[Queued], BaseException], None]


class WorkerFailures:
    """Failures of a pipeline's worker threads, kept for the engine's own thread to raise: the runtime then counts
    them and applies the engine's on_error, as for a failure in process()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.texts: list[str] = []

    def add(self, text: str) -> None:
        with self.lock:
            self.texts.append(text)

    def raise_any(self) -> None:
        """Raise the first kept failure (counting the others) and forget them; nothing if none."""
        with self.lock:
            texts, self.texts = self.texts, []
        if texts:
            more = f" (and {len(texts) - 1} more failures)" if len(texts) > 1 else ""
            raise RuntimeError(texts[0] + more)


class Ewma:
    """Exponentially weighted mean of a duration, None until the first sample."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


class BatchPipeline:
    """Runs a Scheduler's batches on threads — one assembles (stack, upload), one per model instance runs, one
    finishes (per-frame post-processing and send) — so the accelerator does not wait for the host: batch k+1
    is formed and assembled while batch k runs, timed from measured run and assembly times to be ready as an
    instance comes free (and formed no earlier, so its frames are as fresh as they can be). Batches are
    finished in the order they were formed, so frames leave in per-stream order whatever instance ran them.
    A failing batch or frame goes to `on_error` and the pipeline carries on with the next."""

    def __init__(self, scheduler: Scheduler, assemble: Callable[[list[Queued]], Any],
                 runs: Sequence[Callable[[Any], Sequence[Any]]], finish: Callable[[Queued, Any], None],
                 on_error: ErrorHandler, name: str = "batch",
                 spans: Sequence[Callable[[], tuple[float, float] | None] | None] | None = None) -> None:
        if not runs:
            raise ValueError("batch pipeline: needs at least one model instance to run batches")
        self.scheduler = scheduler
        self.cond = scheduler.cond  # one lock for the queues, the hand-off slot and the run estimates
        self.clock = scheduler.clock
        self.assemble, self.runs, self.finish, self.on_error = assemble, list(runs), finish, on_error
        # per instance, optional: after a run on this thread, the device-side (start, end) of its work; busy time
        # is then what the device did, not how long the host waited (None from it: the host's interval counts)
        self.spans = list(spans) if spans is not None else [None] * len(self.runs)
        if len(self.spans) != len(self.runs):
            raise ValueError(f"batch pipeline: {len(self.spans)} span readers for {len(self.runs)} instances")
        self._slot: tuple[int, list[Queued], Any] | None = None  # assembled, waiting for an instance
        self._formed = 0  # batches formed (their sequence numbers)
        self._assembled_all = False
        self._busy: dict[int, float | None] = {}  # running instance → estimated end of its batch (None: unknown)
        self._run_s: dict[int, Ewma] = {}  # run time by batch size
        self._assemble_s = Ewma()
        self._to_finish: queue.Queue = queue.Queue(maxsize=len(self.runs))  # bounded: back-pressure from sends
        self._abort = threading.Event()
        self.threads = [threading.Thread(target=self._assembling, name=f"{name}:assemble", daemon=True)]
        self.threads += [threading.Thread(target=self._running, args=(i,), name=f"{name}:run{i}", daemon=True)
                         for i in range(len(self.runs))]
        self.threads.append(threading.Thread(target=self._finishing, name=f"{name}:finish", daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def drain(self, stop: threading.Event | None = None) -> bool:
        """Close the input and wait until every queued frame is finished; aborts and returns False on `stop`."""
        self.scheduler.close()
        for t in self.threads:
            while t.is_alive():
                t.join(POLL_S)
                if stop is not None and stop.is_set():
                    self.stop()
                    return False
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Abandon queued work and end the threads."""
        self._abort.set()
        self.scheduler.abort()
        for t in self.threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    def _fail(self, batch: list[Queued], exc: BaseException) -> None:
        self.scheduler.stats.failed(len(batch))
        try:
            self.on_error(batch, exc)
        except Exception:  # the handler must not end the stage
            log.exception("error handler failed")

    def _estimate(self, size: int) -> float | None:
        """Expected run time of a batch of `size`: measured for that size, else scaled from the nearest one."""
        if size in self._run_s:
            return self._run_s[size].value
        if not self._run_s:
            return None
        near = min(self._run_s, key=lambda n: abs(n - size))
        return self._run_s[near].value * size / near

    def _ready_at(self) -> float | None:
        """When the next batch should be formed (called under `cond`): None (wait for a notify) while an
        assembled batch still waits; now if an instance is idle; else just before the first should end."""
        if self._slot is not None:
            return None
        ends = list(self._busy.values())
        if len(ends) < len(self.runs) or None in ends or self._assemble_s.value is None:
            return 0.0
        return min(ends) - 1.5 * self._assemble_s.value - 0.002

    def _assembling(self) -> None:
        while (batch := self.scheduler.take(self._ready_at)) is not None:
            seq, self._formed = self._formed, self._formed + 1
            t0 = self.clock()
            try:
                prepared = self.assemble(batch)
            except Exception as exc:
                self._fail(batch, exc)
                if not self._pass((seq, batch, None)):
                    return
                continue
            with self.cond:
                self._assemble_s.add(self.clock() - t0)
                self.scheduler.lead_s = self._assemble_s.value  # (one float: assigning it is atomic)
                while self._slot is not None and not self._abort.is_set():
                    self.cond.wait(POLL_S)
                if self._abort.is_set():
                    return
                self._slot = (seq, batch, prepared)
                self.cond.notify_all()
        with self.cond:
            self._assembled_all = True
            self.cond.notify_all()

    def _running(self, instance: int) -> None:
        run, span = self.runs[instance], self.spans[instance]
        while True:
            with self.cond:
                while self._slot is None and not self._assembled_all and not self._abort.is_set():
                    self.cond.wait(POLL_S)
                if self._abort.is_set() or self._slot is None:
                    break
                (seq, batch, prepared), self._slot = self._slot, None
                t0 = self.clock()
                estimate = self._estimate(len(batch))
                self._busy[instance] = t0 + estimate if estimate is not None else None
                self.cond.notify_all()
            outputs = None
            try:
                with self.scheduler.stats.measured(span):
                    outputs = run(prepared)
                if len(outputs) != len(batch):
                    raise ValueError(f"backend returned {len(outputs)} outputs for a batch of {len(batch)}")
            except Exception as exc:
                self._fail(batch, exc)
                outputs = None
            with self.cond:
                self._run_s.setdefault(len(batch), Ewma()).add(self.clock() - t0)
                del self._busy[instance]
                self.cond.notify_all()
            if not self._pass((seq, batch, outputs)):
                return
        self._pass(None)

    def _pass(self, job: Any) -> bool:
        """Hand a finished batch (or a runner's end) to the finisher; False when aborted meanwhile."""
        while not self._abort.is_set():
            try:
                self._to_finish.put(job, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _finishing(self) -> None:
        """Finish batches in formation order; a failed batch (outputs None) only moves the order on."""
        waiting: dict[int, tuple[list[Queued], Any]] = {}
        next_seq, ended = 0, 0
        while ended < len(self.runs) and not self._abort.is_set():
            try:
                job = self._to_finish.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if job is None:
                ended += 1
                continue
            waiting[job[0]] = job[1:]
            while next_seq in waiting:
                batch, outputs = waiting.pop(next_seq)
                next_seq += 1
                for entry, output in zip(batch, outputs if outputs is not None else ()):
                    try:
                        self.finish(entry, output)
                    except Exception as exc:
                        self._fail([entry], exc)
                        continue
                    self.scheduler.completed(entry)
