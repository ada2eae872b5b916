"""Event rules on tracks: zone intrusion, line crossing, dwell, crowding and speed, evaluated per stream.

Geometry is given either normalised (every value ≤ 1, scaled by the frame width/height) or in pixels.
A track's position is an anchor point of its box: bottom centre (feet) by default, or the centre.
"""
from __future__ import annotations

import copy
import difflib
import logging
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphflow.detections import Detections
from graphflow.engine import Param
from graphflow.errors import ParamError
from graphflow.graph.fields import Shaped, check_keys, schema

log = logging.getLogger(__name__)

KINDS = ("zone", "line_cross", "dwell", "crowding", "speed")
ANCHORS = ("bottom_center", "center")
DIRECTIONS = ("both", "A->B", "B->A")


@dataclass
class Frame:
    """One stream's tracks at one instant, as arrays: ids (N,), classes (N,), labels, boxes (N,4) in pixels and
    attributes."""

    stream: str
    index: int
    time: float
    width: int | None
    height: int | None
    ids: np.ndarray
    classes: np.ndarray
    labels: list[str]
    boxes: np.ndarray
    attributes: list[Mapping[str, Any]]  # per track: the second stage's results ({} without)


def anchor_points(boxes: np.ndarray, anchor: str) -> np.ndarray:
    """Anchor point of each xyxy box: its bottom centre or its centre."""
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    y = boxes[:, 3] if anchor == "bottom_center" else (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([x, y], axis=1)


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd test of points (N,2) against a polygon (K,2), vectorised over points and edges."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    px, py = points[:, None, 0], points[:, None, 1]
    straddles = (a[None, :, 1] > py) != (b[None, :, 1] > py)
    dy = np.where(b[:, 1] == a[:, 1], 1.0, b[:, 1] - a[:, 1])
    x_at = a[None, :, 0] + (py - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / dy[None, :]
    return np.count_nonzero(straddles & (px < x_at), axis=1) % 2 == 1


def _field(index: int, name: str) -> str:
    return f"rules[{index}].{name}" if name else f"rules[{index}]"


# The tests of a rule's `attributes: {name: {...}}`; a plain value there means equal to it, a list any of them.
# Their errors are re-raised under the test's full field path (rules[0].attributes.score.min).
ATTRIBUTE_TEST: dict[str, Param] = {
    "regex": Param(str, None, doc="the attribute, as text, contains a match of this regular expression (re.search)"),
    "min": Param(float, None, doc="the attribute is a number ≥ min"),
    "max": Param(float, None, doc="the attribute is a number ≤ max"),
}


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


@dataclass(frozen=True)
class AttributeTest:
    """What one attribute of a track must be for a rule to count the track: one of `values`, or (from an object)
    matching `regex` and within `min`..`max`. A track without the attribute does not match."""

    name: str
    values: tuple = ()
    regex: re.Pattern | None = None
    min: float | None = None
    max: float | None = None

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """Whether a track's attributes pass this test."""
        if self.name not in attributes:
            return False
        value = attributes[self.name]
        if self.values:  # bool only equals bool: True must not match an attribute of 1
            return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)
        if self.regex is not None and (not _scalar(value) or not self.regex.search(str(value))):
            return False
        if self.min is not None or self.max is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        return True


def attribute_tests(spec: Any, where: str, rule_id: str = "") -> tuple[AttributeTest, ...]:
    """A rule's `attributes` filter (at `where`), checked; ParamError names the first wrong field
    (`rules[0].attributes.text`). `rule_id` is unused: the signature is that of the checks in AFTER_COERCION."""
    if not isinstance(spec, dict) or not spec:
        raise ParamError(where, COMMON["attributes"].wrong(spec))
    tests = []
    for name, want in spec.items():
        here = f"{where}.{name}"
        if _scalar(want):
            tests.append(AttributeTest(name, values=(want,)))
        elif isinstance(want, list):
            if not want or not all(_scalar(v) for v in want):
                raise ParamError(here, f"a list must hold one or more strings or numbers (got {want!r})")
            tests.append(AttributeTest(name, values=tuple(want)))
        elif isinstance(want, dict):
            tests.append(_attribute_object(name, want, here))
        else:
            raise ParamError(here, f"must be a value, a list of values or an object (got {want!r})")
    return tuple(tests)


def _attribute_object(name: str, want: dict, where: str) -> AttributeTest:
    """An `{"regex", "min", "max"}` test, each key checked by its Param."""
    unknown = sorted(set(want) - set(ATTRIBUTE_TEST))
    if unknown or not want:
        raise ParamError(f"{where}.{unknown[0]}" if unknown else where,
                         f"{'unknown test' if unknown else 'needs a test'} (known: {', '.join(ATTRIBUTE_TEST)})")
    checked = {}
    for key, value in want.items():
        try:
            checked[key] = ATTRIBUTE_TEST[key].coerce(value)
        except ParamError as exc:
            raise ParamError(f"{where}.{key}", exc.message) from None
    if "min" in checked and "max" in checked and checked["min"] > checked["max"]:
        raise ParamError(where, f"min {checked['min']:g} is above max {checked['max']:g}: nothing could match")
    regex = None
    if "regex" in checked:
        try:
            regex = re.compile(checked["regex"])
        except re.error as exc:
            raise ParamError(f"{where}.regex", f"not a valid regular expression: {exc}") from None
    return AttributeTest(name, regex=regex, min=checked.get("min"), max=checked.get("max"))


def _orientation(p: np.ndarray, q: np.ndarray, r: np.ndarray, eps: float) -> int:
    """+1 / -1 as r lies left / right of p→q, 0 when the three are collinear (within eps)."""
    cross = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
    return 0 if abs(cross) <= eps else (1 if cross > 0 else -1)


def _on_segment(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> bool:
    """Whether r, collinear with p→q, lies within its bounding box."""
    return bool(min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1]))


def segments_meet(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, eps: float = 0.0) -> bool:
    """Whether segments a-b and c-d cross or touch."""
    o1, o2 = _orientation(a, b, c, eps), _orientation(a, b, d, eps)
    o3, o4 = _orientation(c, d, a, eps), _orientation(c, d, b, eps)
    if o1 != o2 and o3 != o4 and 0 not in (o1, o2, o3, o4):
        return True
    return ((o1 == 0 and _on_segment(a, b, c)) or (o2 == 0 and _on_segment(a, b, d))
            or (o3 == 0 and _on_segment(c, d, a)) or (o4 == 0 and _on_segment(c, d, b)))


def polygon_problem(points: np.ndarray) -> str | None:
    """Why `points` (K,2, in order around it) is not a simple polygon with an area — repeated points, no area,
    edges that cross — or None when it is one."""
    n = len(points)
    scale = float(np.abs(points).max()) or 1.0
    eps = 1e-12 * scale * scale
    for i in range(n):
        for j in range(i + 1, n):
            if np.allclose(points[i], points[j], rtol=0, atol=1e-9 * scale):
                return f"points {i} and {j} are the same point {points[i].tolist()}"
    if all(_orientation(points[0], points[1], p, eps) == 0 for p in points[2:]):
        return "its points lie on one line: the zone has no area"
    edges = [(i, (i + 1) % n) for i in range(n)]
    for i, (a, b) in enumerate(edges):
        for k in range(i + 1, n):
            c, d = edges[k]
            if d == a or c == b:  # neighbours share a point: they meet wrongly only when one folds back over the other
                first, second = (points[b] - points[a], points[d] - points[c]) if c == b else \
                    (points[d] - points[c], points[b] - points[a])
                folds = _orientation(np.zeros(2), first, second, eps) == 0 and float(np.dot(first, second)) < 0
                if not folds:
                    continue
            elif not segments_meet(points[a], points[b], points[c], points[d], eps):
                continue
            return (f"its edge from point {a} to {b} crosses the edge from point {c} to {d} (a zone's points must go "
                    "once around it, in order)")
    return None


class _RuleId(Param):
    """A rule's id: a string, or an integer taken as its text (3 names the rule "3")."""

    def coerce(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return super().coerce(value)


# The keys every kind of rule takes; each kind declares its own in `params`.
COMMON = schema(
    id=_RuleId(str, None, doc="names the rule in events (a number is taken as its text), unique in the list; "
                                "default: kind and position, e.g. zone0"),
    kind=Param(str, choices=KINDS, doc="what the rule detects"),
    classes=Shaped(list, None, form="a list of class ids or labels",
                   doc="count only tracks of these classes (default: every class)"),
    anchor=Param(str, "bottom_center", choices=ANCHORS,
                 doc="the point of a track's box that is its position: bottom centre (feet) or centre"),
    attributes=Shaped(dict, None, form="an object of attribute name → value, list of values, or "
                                       f"{{{', '.join(ATTRIBUTE_TEST)}}}",
                      doc="count only tracks whose second-stage results (secondary's attributes) match"))
POINTS = "a list of [x, y] points"
UNITS = "in pixels or, when every value is ≤ 1, as fractions of the frame"
POLYGON = Shaped(list, form=POINTS, doc=f"the zone's 3 or more corners, in order around it, {UNITS}")
LINE = Shaped(list, form=POINTS, doc=f"its two ends [[x1, y1], [x2, y2]], {UNITS}; side A is on the left going from "
                                     "the first to the second")
HOMOGRAPHY = Shaped(list, None, form="an invertible 3x3 matrix of numbers",
                    doc="image pixels → ground metres, for speeds in m/s")


def _array(value: list) -> np.ndarray:
    """`value` as float64, or an empty array when it is not rows of numbers."""
    try:
        return np.asarray(value, np.float64)
    except (TypeError, ValueError, OverflowError):
        return np.empty(0)


def _points(param: Shaped, value: list, where: str, count: int | None = None, at_least: int = 1) -> np.ndarray:
    """A points key's value as a (K, 2) array: finite, ≥ 0, `count` points or at least `at_least`."""
    arr = _array(value)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
        raise ParamError(where, param.wrong(value))
    if count is not None and len(arr) != count:
        raise ParamError(where, f"needs exactly {count} points (got {len(arr)})")
    if len(arr) < at_least:
        raise ParamError(where, f"needs at least {at_least} points (got {len(arr)})")
    if (arr < 0).any():
        raise ParamError(where, "coordinates must be ≥ 0")
    return arr


def _polygon(value: list, where: str, rule_id: str) -> np.ndarray:
    """A simple polygon with an area; a closing point equal to the first (as GeoJSON rings repeat it) is dropped."""
    points = _points(POLYGON, value, where, at_least=3)
    if len(points) > 3 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    problem = polygon_problem(points)
    if problem is not None:
        raise ParamError(where, f"rule {rule_id!r}: {problem}")
    return points


def _line(value: list, where: str, rule_id: str) -> np.ndarray:
    """Two points that differ: a segment with a length."""
    line = _points(LINE, value, where, count=2)
    if np.allclose(line[0], line[1]):
        raise ParamError(where, f"rule {rule_id!r}: the two points must differ (a line needs a length)")
    return line


def _homography(value: list, where: str, rule_id: str) -> np.ndarray:
    """An invertible 3x3 matrix."""
    h = _array(value)
    if h.shape != (3, 3) or not np.isfinite(h).all() or abs(np.linalg.det(h)) < 1e-12:
        raise ParamError(where, HOMOGRAPHY.wrong(value))
    return h


def _class_names(value: list, where: str, rule_id: str) -> set[int | str]:
    """The `classes` filter as a set, each item a class id or a label."""
    if not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in value):
        raise ParamError(where, COMMON["classes"].wrong(value))
    return set(value)


# What a Param cannot say about a key — its items, its geometry — checked on the coerced value, which the check
# converts (points to arrays, `attributes` to tests); ParamError names the key.
AFTER_COERCION: dict[str, Callable[[Any, str, str], Any]] = {
    "classes": _class_names, "attributes": attribute_tests, "polygon": _polygon, "line": _line,
    "homography": _homography}


class Rule:
    """Base of all rules: id, class and attribute filters, anchor and geometry scaling; subclasses implement
    `step` and declare their own keys in `params`."""

    kind = ""
    params: dict[str, Param] = {}

    @classmethod
    def keys(cls) -> dict[str, Param]:
        """Every key a rule of this kind takes: the common ones, then the kind's own."""
        return {**COMMON, **cls.params}

    def __init__(self, spec: dict, index: int) -> None:
        self.spec = dict(spec)  # as given: what `GET /streams/{id}/rules` shows
        self.where = _field(index, "")
        keys = self.keys()
        given = {k: v for k, v in spec.items() if v is not None or k not in keys}  # a null key takes its default
        self.checked = check_keys(self.where, given, keys, f"key for a {self.kind} rule")  # with defaults
        self.id = f"{self.kind}{index}" if self.checked["id"] is None else self.checked["id"]
        for key, check in AFTER_COERCION.items():
            if self.checked.get(key) is not None:
                self.checked[key] = check(self.checked[key], self.field(key), self.id)
        self.anchor = self.checked["anchor"]
        self.classes = self.checked["classes"]
        self.attributes = self.checked["attributes"] or ()
        self.geometry: dict[str, np.ndarray] = {}
        self._scaled: dict[str, np.ndarray] = {}
        self._scaled_for: tuple[int | None, int | None] | None = None

    def field(self, key: str) -> str:
        """The path of one of this rule's keys, for errors: `rules[0].polygon`."""
        return f"{self.where}.{key}"

    def add_geometry(self, name: str, points: np.ndarray) -> None:
        self.geometry[name] = points

    def pixels(self, name: str, frame: Frame) -> np.ndarray:
        """Geometry `name` in pixels: normalised geometry (all values ≤ 1) is scaled by the frame size."""
        if self._scaled_for != (frame.width, frame.height):
            self._scaled = {}
            self._scaled_for = (frame.width, frame.height)
        if name not in self._scaled:
            pts = self.geometry[name]
            if (pts <= 1).all():
                if not frame.width or not frame.height:
                    raise ValueError(f"rule {self.id!r}: normalised {name} needs data['width'] and data['height'] "
                                     f"(missing in stream {frame.stream!r})")
                pts = pts * np.array([frame.width, frame.height], np.float64)
            self._scaled[name] = pts
        return self._scaled[name]

    def selected(self, frame: Frame) -> np.ndarray:
        """Boolean mask of the frame's tracks that pass the class and attribute filters."""
        mask = np.ones(len(frame.ids), bool)
        if self.classes is not None:
            mask &= np.array([c in self.classes or lab in self.classes
                              for c, lab in zip(frame.classes.tolist(), frame.labels)], bool)
        if self.attributes:
            mask &= np.array([all(t.matches(a) for t in self.attributes) for a in frame.attributes], bool)
        return mask

    def event(self, frame: Frame, name: str, row: int | None, point: np.ndarray | None, **extra: Any) -> dict:
        """An event dict per the data contract; `row` indexes the frame's tracks (None for area events)."""
        ev = {"rule": self.id, "kind": self.kind, "event": name, "stream": frame.stream,
              "track_id": None if row is None else int(frame.ids[row]),
              "class_id": None if row is None else int(frame.classes[row]),
              "label": None if row is None else frame.labels[row],
              "frame": frame.index, "time": frame.time,
              "position": None if point is None else [round(float(point[0]), 2), round(float(point[1]), 2)]}
        if row is not None and frame.attributes[row]:
            ev["attributes"] = dict(frame.attributes[row])
        ev.update(extra)
        return ev

    def evaluate(self, frame: Frame) -> list[dict]:
        mask = self.selected(frame)
        points = anchor_points(frame.boxes, self.anchor)
        return self.step(frame, np.flatnonzero(mask), points)

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        raise NotImplementedError

    def forget(self, track_ids: set[int]) -> None:
        """Drop state of tracks not seen for a while."""

    def overlay(self, frame: Frame) -> dict[str, Any]:
        """What an on-screen display draws for this rule: id, kind, geometry in pixels and live figures."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        for name in self.geometry:
            out[name] = np.round(self.pixels(name, frame), 1).tolist()
        return out


class ZoneRule(Rule):
    """Zone intrusion: `enter` when a track's anchor gets inside `polygon`, `exit` when it leaves."""

    kind = "zone"
    params = schema(polygon=POLYGON)

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.add_geometry("polygon", self.checked["polygon"])
        self.inside: dict[int, float] = {}

    def transitions(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> tuple[list[dict], np.ndarray]:
        """Enter/exit events of this frame and the mask (over `rows`) of tracks now inside."""
        now = points_in_polygon(points[rows], self.pixels("polygon", frame)) if len(rows) else np.zeros(0, bool)
        events = []
        for r, is_in in zip(rows.tolist(), now.tolist()):
            tid = int(frame.ids[r])
            if is_in and tid not in self.inside:
                self.inside[tid] = frame.time
                events.append(self.event(frame, "enter", r, points[r]))
            elif not is_in and tid in self.inside:
                entered = self.inside.pop(tid)
                events.append(self.event(frame, "exit", r, points[r], duration=round(frame.time - entered, 3)))
        return events, now

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        return self.transitions(frame, rows, points)[0]

    def forget(self, track_ids: set[int]) -> None:
        for tid in track_ids:
            self.inside.pop(tid, None)

    def overlay(self, frame: Frame) -> dict[str, Any]:
        return {**super().overlay(frame), "inside": len(self.inside)}


class DwellRule(ZoneRule):
    """Loitering: one `dwell` event per visit once a track has stayed in `polygon` for `seconds`."""

    kind = "dwell"
    params = schema(polygon=POLYGON,
                    seconds=Param(float, ge=0, doc="seconds a track stays in the zone before the event"))

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.seconds = self.checked["seconds"]
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


class LineCrossRule(Rule):
    """Line crossing: `cross` when a track's anchor moves across segment `line` from one side to the other.

    Side A is on the left when walking from line[0] to line[1] as the image is shown (a line drawn left to
    right has A above it); `direction` ("A->B", "B->A" or "both") selects what counts and emits.
    """

    kind = "line_cross"
    params = schema(
        line=LINE,
        direction=Param(str, "both", choices=DIRECTIONS, doc="the crossings that count, from side A to B or back"))

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.add_geometry("line", self.checked["line"])
        self.direction = self.checked["direction"]
        self.last: dict[int, np.ndarray] = {}
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
        crossed = (side_prev * side_cur < 0) & (s1 * s2 <= 0)
        events = []
        for k in np.flatnonzero(crossed).tolist():
            direction = "A->B" if side_prev[k] < 0 else "B->A"
            if self.direction in ("both", direction):
                self.counts[direction] += 1
                events.append(self.event(frame, "cross", int(rows[k]), cur[k], direction=direction, counts=dict(self.counts)))
        for k, t in enumerate(ids):
            if side_cur[k] != 0:
                self.last[t] = cur[k]
        return events

    def forget(self, track_ids: set[int]) -> None:
        for tid in track_ids:
            self.last.pop(tid, None)

    def overlay(self, frame: Frame) -> dict[str, Any]:
        return {**super().overlay(frame), "counts": dict(self.counts)}


class CrowdingRule(Rule):
    """Crowding: `crowd_start` once at least `min_count` tracks stay in `polygon` for `seconds`; `crowd_end` when fewer."""

    kind = "crowding"
    params = schema(polygon=POLYGON, min_count=Param(int, ge=1, doc="tracks in the zone that make a crowd"),
                    seconds=Param(float, 0.0, ge=0, doc="seconds the crowd lasts before crowd_start"))

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.add_geometry("polygon", self.checked["polygon"])
        self.min_count = self.checked["min_count"]
        self.seconds = self.checked["seconds"]
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


class SpeedRule(Rule):
    """Speed: `speeding` once per episode when a track moves faster than `max_speed` over `window` seconds.

    Pixels per second, or metres per second when `homography` (3x3, image pixels -> ground metres) is given.
    """

    kind = "speed"
    params = schema(
        max_speed=Param(float, ge=0, doc="the speed above which a track is speeding: px/s, or m/s with a homography"),
        window=Param(float, 1.0, ge=0, doc="seconds of track history a speed is measured over"),
        homography=HOMOGRAPHY)

    def __init__(self, spec: dict, index: int) -> None:
        super().__init__(spec, index)
        self.max_speed = self.checked["max_speed"]
        self.window = self.checked["window"]
        self.homography = self.checked["homography"]
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
        for tid in track_ids:
            self.history.pop(tid, None)
        self.fast -= track_ids


RULE_CLASSES: dict[str, type[Rule]] = {c.kind: c for c in (ZoneRule, LineCrossRule, DwellRule, CrowdingRule, SpeedRule)}


def parse_rules(specs: list) -> list[Rule]:
    """Rule objects from their JSON specs; raises ParamError("rules[i].field", ...) on the first mistake."""
    rules, seen = [], set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ParamError(_field(i, ""), f"must be an object (got {spec!r})")
        kind = spec.get("kind")
        if not isinstance(kind, str) or kind not in RULE_CLASSES:
            raise ParamError(_field(i, "kind"), f"must be one of {', '.join(KINDS)} (got {kind!r})")
        rule = RULE_CLASSES[kind](spec, i)
        if rule.id in seen:
            raise ParamError(_field(i, "id"), f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    return rules


def check_classes(specs: list, known: Mapping[int, str]) -> None:
    """Raise ParamError at the first class a rule names that the detectors upstream never give (`known`: their
    class ids to labels), suggesting the closest label: a misspelt class would otherwise match nothing, silently."""
    labels = list(dict.fromkeys(known[i] for i in sorted(known)))  # in class id order, once each
    for i, rule in enumerate(parse_rules(specs)):
        for k, name in enumerate(specs[i].get("classes") or ()):
            if name in labels or (isinstance(name, int) and name in known):
                continue
            if isinstance(name, int):
                ids = sorted(known)
                shown = ", ".join(map(str, ids)) if len(ids) <= 8 else f"{ids[0]}-{ids[-1]}"
                why = f"class id {name} is not one the detectors upstream give (ids: {shown})"
            else:
                close = difflib.get_close_matches(name, labels, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else \
                    "known: " + ", ".join(labels[:8]) + (", …" if len(labels) > 8 else "")
                why = f"class {name!r} is not one the detectors upstream give ({hint})"
            raise ParamError(f"{_field(i, 'classes')}[{k}]", f"rule {rule.id!r}: {why}")


@dataclass
class _StreamState:
    rules: list[Rule]
    last_seen: dict[int, float] = field(default_factory=dict)
    frame: Frame | None = None


class RuleSet:
    """Evaluates a list of rules on each stream's tracks, with state kept per stream.

    A track unseen for `forget_after` seconds is dropped from every rule's state (no event).
    """

    def __init__(self, specs: list, forget_after: float = 5.0) -> None:
        self.prototype = parse_rules(specs)
        self.forget_after = forget_after
        self.streams: dict[str, _StreamState] = {}
        self.own: dict[str, list[Rule]] = {}  # streams with rules of their own instead of the prototype

    def set_rules(self, stream: str, specs: list) -> None:
        """Give `stream` its own rules (checked like the engine's; ParamError naming the field), applied from its
        next frame: its rule state starts afresh. `None` goes back to the engine's rules."""
        rules = None if specs is None else parse_rules(specs)
        if rules is None:
            self.own.pop(stream, None)
        else:
            self.own[stream] = rules
        self.streams.pop(stream, None)

    def rules_of(self, stream: str) -> list[Rule]:
        return self.own.get(stream, self.prototype)

    def forget(self, stream: str) -> None:
        """`stream` ended: drop its state and its own rules."""
        self.streams.pop(stream, None)
        self.own.pop(stream, None)

    def evaluate(self, stream: str, index: int, time: float, tracks: Detections | list[dict],
                 width: int | None = None, height: int | None = None) -> list[dict]:
        """Events produced by one frame of `stream`; `tracks` (Detections, or dicts with box, track_id, class_id,
        label and, after a second stage, attributes) are read as arrays."""
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = _StreamState(copy.deepcopy(self.rules_of(stream)))
        tracks = Detections.of(tracks, "data['tracks']")
        labels = tracks.labels.tolist()
        frame = Frame(stream, index, float(time), width, height, ids=tracks.track_ids,
                      classes=tracks.class_ids.astype(np.int64),
                      labels=[label or "" for label in labels] if None in labels else labels,
                      boxes=tracks.rounded_boxes(),
                      attributes=[a or {} for a in tracks.attributes.tolist()])
        for tid in frame.ids.tolist():
            state.last_seen[tid] = frame.time
        stale = {t for t, seen in state.last_seen.items() if frame.time - seen > self.forget_after}
        events = []
        for rule in state.rules:
            if stale:
                rule.forget(stale)
            events += rule.evaluate(frame)
        for tid in stale:
            del state.last_seen[tid]
        state.frame = frame
        return events

    def overlay(self, stream: str) -> list[dict[str, Any]]:
        """Each rule's geometry (pixels) and live figures (line counts, tracks inside) after the stream's last
        `evaluate`, for an on-screen display; [] before the first."""
        state = self.streams.get(stream)
        if state is None or state.frame is None:
            return []
        return [rule.overlay(state.frame) for rule in state.rules]
