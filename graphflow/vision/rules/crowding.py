"""Crowding: enough tracks in a zone for long enough."""
from __future__ import annotations

from typing import Any

import numpy as np

from graphflow.engine import Param
from graphflow.vision.rules.base import Frame, RuleKind
from graphflow.vision.rules.geometry import Polygon, points_in_polygon


class CrowdingRule(RuleKind):
    """Crowding: `crowd_start` once at least `min_count` tracks stay in `polygon` for `seconds`; `crowd_end` when fewer."""

    kind = "crowding"
    polygon = Polygon()
    min_count = Param(int, ge=1, doc="tracks in the zone that make a crowd")
    seconds = Param(float, 0.0, ge=0, doc="seconds the crowd lasts before crowd_start")

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.since: float | None = None
        self.active = False
        self.count = 0

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        inside = rows[points_in_polygon(points[rows], self.pixels("polygon", frame))] if len(rows) else rows
        count = self.count = len(inside)
        centroid = points[inside].mean(axis=0) if count else None
        if count < self.min_count:
            self.since = None
            if self.active:
                self.active = False
                return [self.event(frame, "crowd_end", None, centroid, count=count)]
            return []
        if self.since is None:
            self.since = frame.time
        if not self.active and frame.time - self.since >= self.seconds:
            self.active = True
            return [self.event(frame, "crowd_start", None, centroid, count=count,
                               track_ids=[int(t) for t in frame.ids[inside]])]
        return []

    def overlay(self, frame: Frame) -> dict[str, Any]:
        return {**super().overlay(frame), "inside": self.count, "active": self.active}
