"""The records of a batching stage: accelerator busy timeline, batch sizes, queue depth at dispatch, per-stream
latency and drops, and the snapshot of them the engine's metrics report."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from graphflow.latency import StreamRecord

WINDOW_S = 0.1  # utilisation timeline resolution
TIMELINE_KEEP = 600  # windows kept for metrics (one minute); busy_fraction/busy_cv cover the whole run
RETIRED_KEEP = 256  # ended streams whose records stay for the summary


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

