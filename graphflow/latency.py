"""Per-stream latency records: a stream's frame and drop counts and its recent latencies with their percentiles,
kept by a batching stage for each stream it serves and by the service's meter for each stream it watches."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LATENCY_KEEP = 1000  # latencies kept per stream for its percentiles


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

