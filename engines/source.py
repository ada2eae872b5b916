"""`source`: synthetic messages (a counter, optionally with random frames) at a given rate."""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from graphflow import Engine, Message, Param, ParamError, StreamEnd


class Source(Engine):
    """Synthetic counter / random-frame source, for trying graphs before real video is wired in."""

    inputs = ()
    outputs = ("out",)
    count = Param(int, 100, ge=0, doc="messages per stream (0 = until stopped)")
    streams = Param(int, 1, ge=1, doc="number of streams, ids s0, s1, …")
    rate = Param(float, 0.0, ge=0, doc="messages per second per stream (0 = as fast as possible)")
    shape = Param(list, [], doc="frame shape, e.g. [360, 640, 3]; [] sends no frame")
    seed = Param(int, 0, doc="random seed for frame content")

    def check(self) -> None:
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape):
            raise ParamError("shape", f"must be a list of positive integers (got {self.shape!r})")

    def generate(self) -> Iterator[Message | StreamEnd | None]:
        """Message `seq` of every stream in turn; after a restart, each stream goes on after its `resume` seq."""
        rng = np.random.default_rng(self.seed)
        start = time.monotonic()
        names = [f"s{s}" for s in range(self.streams)]
        first = seq = min(self.resume.get(name, -1) for name in names) + 1
        while self.count == 0 or seq < self.count:
            if self.rate:
                delay = start + (seq - first) / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, 0.1))
                    yield None
                    continue
            for name in names:
                if seq <= self.resume.get(name, -1):
                    continue
                msg = Message(stream=name, seq=seq, pts=seq / self.rate if self.rate else None, data={"value": seq})
                if self.shape:
                    frame = self.alloc(tuple(self.shape), np.uint8)
                    frame[...] = rng.integers(0, 256, size=frame.shape[-1:], dtype=np.uint8)
                    msg.arrays["image"] = frame
                yield msg
            seq += 1
        for name in names:  # the count reached: each stream's end goes downstream
            yield StreamEnd(name)
