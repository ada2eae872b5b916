"""Zone intrusion: `enter` when a track's anchor gets inside a polygon, `exit` when it leaves."""
from __future__ import annotations

from typing import Any

import numpy as np

from graphflow.vision.rules.base import Frame, RuleKind
from graphflow.vision.rules.geometry import Polygon, points_in_polygon
from graphflow.vision.rules.hysteresis import MIN_FRAMES, Debounce


class ZoneRule(RuleKind):
    """Zone intrusion: `enter` when a track's anchor gets inside `polygon`, `exit` when it leaves (each once the
    track has been on the new side for `min_frames` frames in a row; times and durations from the first of them)."""

    kind = "zone"
    polygon = Polygon()
    min_frames = MIN_FRAMES

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.sides = Debounce(self.min_frames, initial=False)  # track → inside, confirmed
        self.inside: dict[int, float] = {}  # track → when it entered

    def transitions(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        """Enter/exit events of this frame."""
        now = points_in_polygon(points[rows], self.pixels("polygon", frame)) if len(rows) else np.zeros(0, bool)
        events = []
        for r, is_in in zip(rows.tolist(), now.tolist()):
            tid = int(frame.ids[r])
            change = self.sides.observe(tid, is_in, frame.time)
            if change is None:
                continue
            if is_in:
                self.inside[tid] = change.since
                events.append(self.event(frame, "enter", r, points[r]))
            else:
                entered = self.inside.pop(tid)
                events.append(self.event(frame, "exit", r, points[r], duration=round(change.since - entered, 3)))
        return events

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        return self.transitions(frame, rows, points)

    def forget(self, track_ids: set[int]) -> None:
        super().forget(track_ids)
        self.sides.forget(track_ids)
        for tid in track_ids:
            self.inside.pop(tid, None)

    def overlay(self, frame: Frame) -> dict[str, Any]:
        return {**super().overlay(frame), "inside": len(self.inside)}
