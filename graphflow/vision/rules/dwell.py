"""Loitering: one event per visit once a track has stayed in a zone for a time."""
from __future__ import annotations

import numpy as np

from graphflow.engine import Param
from graphflow.vision.rules.base import Frame
from graphflow.vision.rules.zone import ZoneRule


class DwellRule(ZoneRule):
    """Loitering: one `dwell` event per visit once a track has stayed in `polygon` for `seconds`."""

    kind = "dwell"
    seconds = Param(float, ge=0, doc="seconds a track stays in the zone before the event")

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.fired: set[int] = set()

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        self.transitions(frame, rows, points)
        self.fired &= set(self.inside)
        events = []
        for r in rows.tolist():
            tid = int(frame.ids[r])
            if tid in self.inside and tid not in self.fired and frame.time - self.inside[tid] >= self.seconds:
                self.fired.add(tid)
                events.append(self.event(frame, "dwell", r, points[r], duration=round(frame.time - self.inside[tid], 3)))
        return events

    def forget(self, track_ids: set[int]) -> None:
        super().forget(track_ids)
        self.fired -= track_ids
