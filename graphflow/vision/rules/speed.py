"""Speed: a track moving faster than a bound, in pixels or (through a homography) metres per second."""
from __future__ import annotations

from collections import deque

import numpy as np

from graphflow.engine import Param
from graphflow.errors import ParamError
from graphflow.vision.rules.base import Frame, RuleKind
from graphflow.vision.rules.keys import Converted


class Homography(Converted):
    """An invertible 3x3 matrix, image pixels → ground metres."""

    def __init__(self) -> None:
        super().__init__(list, None, form="an invertible 3x3 matrix of numbers",
                         doc="image pixels → ground metres, for speeds in m/s")

    def convert(self, value: list, where: str, rule: str) -> np.ndarray:
        try:
            h = np.asarray(value, np.float64)
        except (TypeError, ValueError, OverflowError):
            h = np.empty(0)
        if h.shape != (3, 3) or not np.isfinite(h).all() or abs(np.linalg.det(h)) < 1e-12:
            raise ParamError(where, self.wrong(value))
        return h


class SpeedRule(RuleKind):
    """Speed: `speeding` once per episode when a track moves faster than `max_speed` over `window` seconds.

    Pixels per second, or metres per second when `homography` (3x3, image pixels -> ground metres) is given.
    """

    kind = "speed"
    max_speed = Param(float, ge=0, doc="the speed above which a track is speeding: px/s, or m/s with a homography")
    window = Param(float, 1.0, ge=0, doc="seconds of track history a speed is measured over")
    homography = Homography()

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.unit = "m/s" if self.homography is not None else "px/s"
        self.history: dict[int, deque] = {}
        self.fast: set[int] = set()

    def ground(self, points: np.ndarray) -> np.ndarray:
        """Points mapped through the homography (or unchanged without one)."""
        if self.homography is None:
            return points
        hom = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ self.homography.T
        return hom[:, :2] / hom[:, 2:3]

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        world = self.ground(points[rows])
        events = []
        for k, r in enumerate(rows.tolist()):
            tid = int(frame.ids[r])
            hist = self.history.setdefault(tid, deque())
            hist.append((frame.time, world[k]))
            while len(hist) > 2 and frame.time - hist[1][0] >= self.window:
                hist.popleft()
            t0, w0 = hist[0]
            if frame.time - t0 <= 0:
                continue
            speed = float(np.hypot(*(world[k] - w0)) / (frame.time - t0))
            if speed > self.max_speed and tid not in self.fast:
                self.fast.add(tid)
                events.append(self.event(frame, "speeding", r, points[r], speed=round(speed, 3), unit=self.unit))
            elif speed <= self.max_speed:
                self.fast.discard(tid)
        return events

    def forget(self, track_ids: set[int]) -> None:
        super().forget(track_ids)
        for tid in track_ids:
            self.history.pop(tid, None)
        self.fast -= track_ids
