"""Line crossing: a track's anchor moving across a segment from one side to the other."""
from __future__ import annotations

from typing import Any

import numpy as np

from graphflow.engine import Param
from graphflow.vision.rules.base import Frame, RuleKind
from graphflow.vision.rules.geometry import Segment
from graphflow.vision.rules.hysteresis import MIN_FRAMES, Debounce

DIRECTIONS = ("both", "A->B", "B->A")


class LineCrossRule(RuleKind):
    """Line crossing: `cross` when a track's anchor moves across segment `line` from one side to the other.

    Side A is on the left when walking from line[0] to line[1] as the image is shown (a line drawn left to
    right has A above it); `direction` ("A->B", "B->A" or "both") selects what counts and emits. With
    `min_frames` above 1 a crossing counts once the track has stayed on the far side that many frames.
    """

    kind = "line_cross"
    line = Segment()
    direction = Param(str, "both", choices=DIRECTIONS, doc="the crossings that count, from side A to B or back")
    min_frames = MIN_FRAMES

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.sides = Debounce(self.min_frames)  # track → side of the line (-1: A, +1: B), confirmed
        self.last: dict[int, np.ndarray] = {}  # track → its last point on its confirmed side
        self.counts = {"A->B": 0, "B->A": 0}

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        p1, p2 = self.pixels("line", frame)
        ids = frame.ids[rows].tolist()
        prev = np.array([self.last.get(t, (np.nan, np.nan)) for t in ids], np.float64).reshape(-1, 2)
        cur = points[rows]
        d = p2 - p1
        side_prev = np.sign(d[0] * (prev[:, 1] - p1[1]) - d[1] * (prev[:, 0] - p1[0]))
        side_cur = np.sign(d[0] * (cur[:, 1] - p1[1]) - d[1] * (cur[:, 0] - p1[0]))
        move = cur - prev
        # the motion segment meets the line segment when p1 and p2 lie on opposite sides of it
        s1 = np.sign(move[:, 0] * (p1[1] - prev[:, 1]) - move[:, 1] * (p1[0] - prev[:, 0]))
        s2 = np.sign(move[:, 0] * (p2[1] - prev[:, 1]) - move[:, 1] * (p2[0] - prev[:, 0]))
        crossed = ((side_prev * side_cur < 0) & (s1 * s2 <= 0)).tolist()
        events = []
        for k, t in enumerate(ids):
            side = side_cur[k]
            if side == 0:
                continue  # on the line: neither side yet
            direction = ("A->B" if side_prev[k] < 0 else "B->A") if crossed[k] else None
            change = self.sides.observe(t, side, frame.time, direction)
            if change is None and self.sides.confirmed(t) != side:
                continue  # on the far side, not for long enough yet
            self.last[t] = cur[k]
            if change is not None and change.note is not None and self.direction in ("both", change.note):
                self.counts[change.note] += 1
                events.append(self.event(frame, "cross", int(rows[k]), cur[k], direction=change.note,
                                         counts=dict(self.counts)))
        return events

    def forget(self, track_ids: set[int]) -> None:
        super().forget(track_ids)
        self.sides.forget(track_ids)
        for tid in track_ids:
            self.last.pop(tid, None)

    def overlay(self, frame: Frame) -> dict[str, Any]:
        return {**super().overlay(frame), "counts": dict(self.counts)}
