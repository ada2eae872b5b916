"""Rule geometry: zones (simple polygons, checked in O(n log n) by a sweep), lines, and the keys that declare them.

Geometry is given either normalised (every value ≤ 1, scaled by the frame width/height) or in pixels.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphflow.errors import ParamError
from graphflow.vision.rules.keys import Converted

# A zone's corners: validation is a sweep (O(n log n)) and each frame tests every track in the zone's bounding box
# against every edge; at this bound the check takes about 10 ms and a frame of 200 tracks 1 to 3 ms.
MAX_POINTS = 256
UNITS = "in pixels or, when every value is ≤ 1, as fractions of the frame"


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd test of points (N,2) against a polygon (K,2), vectorised over the points inside its bounding box
    and the edges."""
    inside = np.zeros(len(points), bool)
    lo, hi = polygon.min(axis=0), polygon.max(axis=0)
    near = np.flatnonzero(((points >= lo) & (points <= hi)).all(axis=1))
    if not len(near):
        return inside
    a, b = polygon, np.roll(polygon, -1, axis=0)
    px, py = points[near, None, 0], points[near, None, 1]
    straddles = (a[None, :, 1] > py) != (b[None, :, 1] > py)
    dy = np.where(b[:, 1] == a[:, 1], 1.0, b[:, 1] - a[:, 1])
    x_at = a[None, :, 0] + (py - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / dy[None, :]
    inside[near] = np.count_nonzero(straddles & (px < x_at), axis=1) % 2 == 1
    return inside


def _orientation(p: Any, q: Any, r: Any, eps: float) -> int:
    """+1 / -1 as r lies left / right of p→q, 0 when the three are collinear (within eps)."""
    cross = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
    return 0 if abs(cross) <= eps else (1 if cross > 0 else -1)


def _on_segment(p: Any, q: Any, r: Any) -> bool:
    """Whether r, collinear with p→q, lies within its bounding box."""
    return bool(min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1]))


def segments_meet(a: Any, b: Any, c: Any, d: Any, eps: float = 0.0) -> bool:
    """Whether segments a-b and c-d (points as pairs or arrays) cross or touch."""
    o1, o2 = _orientation(a, b, c, eps), _orientation(a, b, d, eps)
    o3, o4 = _orientation(c, d, a, eps), _orientation(c, d, b, eps)
    if o1 != o2 and o3 != o4 and 0 not in (o1, o2, o3, o4):
        return True
    return ((o1 == 0 and _on_segment(a, b, c)) or (o2 == 0 and _on_segment(a, b, d))
            or (o3 == 0 and _on_segment(c, d, a)) or (o4 == 0 and _on_segment(c, d, b)))


class _Edges:
    """The edges of a closed ring of points, each with its left and right end (smaller and larger by x, then y),
    and the one test of whether two of them meet where a simple polygon's edges must not."""

    def __init__(self, points: np.ndarray, eps: float) -> None:
        self.points, self.eps, self.n = points, eps, len(points)
        self.at = [tuple(p) for p in points.tolist()]  # Python floats: the sweep tests a few pairs per edge
        ends = [(self.at[i], self.at[(i + 1) % self.n]) for i in range(self.n)]
        self.left = [min(e) for e in ends]
        self.right = [max(e) for e in ends]

    def ends(self, i: int) -> tuple[int, int]:
        return i, (i + 1) % self.n

    def neighbours(self, i: int, k: int) -> bool:
        return (i + 1) % self.n == k or (k + 1) % self.n == i

    def conflict(self, i: int, k: int) -> bool:
        """Whether edges i and k meet wrongly: neighbours (sharing a point) only when one folds back over the
        other; any other two when they cross or touch."""
        (a, b), (c, d) = self.ends(i), self.ends(k)
        p, eps = self.at, self.eps
        if not self.neighbours(i, k):
            return segments_meet(p[a], p[b], p[c], p[d], eps)
        if c == b:  # k follows i
            first, second = (p[b][0] - p[a][0], p[b][1] - p[a][1]), (p[d][0] - p[c][0], p[d][1] - p[c][1])
        else:
            first, second = (p[d][0] - p[c][0], p[d][1] - p[c][1]), (p[b][0] - p[a][0], p[b][1] - p[a][1])
        folds_back = first[0] * second[0] + first[1] * second[1] < 0
        return _orientation((0.0, 0.0), first, second, eps) == 0 and folds_back

    def below(self, t: int, s: int) -> bool:
        """Whether active edge t lies below edge s where s starts (the sweep's order): by the side of t that s's
        left end, then its right end, lies on."""
        for point in (self.left[s], self.right[s]):
            side = _orientation(self.left[t], self.right[t], point, self.eps)
            if side:
                return side > 0
        return True  # collinear and overlapping: either order, the neighbour test finds them

    def any_conflict(self) -> bool:
        """Whether any two edges meet wrongly, by a sweep over their ends in x order (Shamos and Hoey): an edge is
        tested against the edges just above and below it when it enters the sweep and the two that become
        neighbours when it leaves; n log n comparisons (the active list's inserts are memory moves)."""
        events = sorted([(*self.left[i], 1, i) for i in range(self.n)]
                        + [(*self.right[i], 0, i) for i in range(self.n)])
        active: list[int] = []  # edges crossing the sweep line, bottom to top
        for _, _, enters, i in events:  # at one point, edges leave before others enter
            if enters:
                lo, hi = 0, len(active)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if self.below(active[mid], i):
                        lo = mid + 1
                    else:
                        hi = mid
                active.insert(lo, i)
                pairs = [(active[j], i) for j in (lo - 1, lo + 1) if 0 <= j < len(active)]
            else:
                at = active.index(i)
                active.pop(at)
                pairs = [(active[at - 1], active[at])] if 0 < at < len(active) else []
            if any(self.conflict(a, b) for a, b in pairs):
                return True
        return False

    def first_conflict(self) -> tuple[int, int] | None:
        """The first pair of edges (in index order) that meet wrongly, or None: vectorised over the later edges,
        row by row (n²/2 tests, run only once the sweep has found that a pair exists)."""
        p, n, eps = self.points, self.n, self.eps
        a, b = p, np.roll(p, -1, axis=0)

        def side(p0: np.ndarray, p1: np.ndarray, r: np.ndarray) -> np.ndarray:
            cross = ((p1[..., 0] - p0[..., 0]) * (r[..., 1] - p0[..., 1])
                     - (p1[..., 1] - p0[..., 1]) * (r[..., 0] - p0[..., 0]))
            return np.where(np.abs(cross) <= eps, 0, np.sign(cross))

        def within(p0: np.ndarray, p1: np.ndarray, r: np.ndarray) -> np.ndarray:
            return ((np.minimum(p0, p1) <= r) & (r <= np.maximum(p0, p1))).all(axis=-1)

        for i in range(n - 1):
            ks = np.arange(i + 1, n)
            c, d = a[ks], b[ks]
            o1, o2, o3, o4 = side(a[i], b[i], c), side(a[i], b[i], d), side(c, d, a[i]), side(c, d, b[i])
            meet = (o1 != o2) & (o3 != o4) & (o1 != 0) & (o2 != 0) & (o3 != 0) & (o4 != 0)
            meet |= ((o1 == 0) & within(a[i], b[i], c)) | ((o2 == 0) & within(a[i], b[i], d))
            meet |= ((o3 == 0) & within(c, d, a[i])) | ((o4 == 0) & within(c, d, b[i]))
            neighbour = (ks == i + 1) | ((ks + 1) % n == i)
            for k in ks[meet | neighbour].tolist():
                if not neighbour[k - i - 1] or self.conflict(i, k):
                    return i, k
        return None


def polygon_problem(points: np.ndarray) -> str | None:
    """Why `points` (K,2, in order around it) is not a simple polygon with an area — repeated points, no area,
    edges that cross — or None when it is one; O(K log K) for a simple polygon."""
    scale = float(np.abs(points).max()) or 1.0
    eps = 1e-12 * scale * scale
    order = np.lexsort((points[:, 1], points[:, 0]))  # same points end up side by side, in index order
    ranked = points[order]
    same = np.flatnonzero(np.isclose(ranked[1:], ranked[:-1], rtol=0, atol=1e-9 * scale).all(axis=1))
    if len(same):
        i, j = min((int(order[k]), int(order[k + 1])) for k in same.tolist())
        i, j = min(i, j), max(i, j)
        return f"points {i} and {j} are the same point {points[i].tolist()}"
    cross = ((points[1, 0] - points[0, 0]) * (points[2:, 1] - points[0, 1])
             - (points[1, 1] - points[0, 1]) * (points[2:, 0] - points[0, 0]))
    if (np.abs(cross) <= eps).all():
        return "its points lie on one line: the zone has no area"
    edges = _Edges(points, eps)
    if not edges.any_conflict():
        return None
    first = edges.first_conflict()
    (a, b), (c, d) = (edges.ends(first[0]), edges.ends(first[1])) if first else ((0, 1), (0, 1))
    return (f"its edge from point {a} to {b} crosses the edge from point {c} to {d} (a zone's points must go once "
            "around it, in order)")


def _array(value: list) -> np.ndarray:
    """`value` as float64, or an empty array when it is not rows of numbers."""
    try:
        return np.asarray(value, np.float64)
    except (TypeError, ValueError, OverflowError):
        return np.empty(0)


class Points(Converted):
    """A key holding [x, y] points, finite and ≥ 0, converted to a (K, 2) array; a rule's geometry (scaled to
    pixels per frame when normalised)."""

    count: int | None = None  # exactly this many points
    at_least = 1

    def __init__(self, doc: str) -> None:
        super().__init__(list, form="a list of [x, y] points", doc=doc)

    def convert(self, value: list, where: str, rule: str) -> np.ndarray:
        arr = _array(value)
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
            raise ParamError(where, self.wrong(value))
        if self.count is not None and len(arr) != self.count:
            raise ParamError(where, f"needs exactly {self.count} points (got {len(arr)})")
        if len(arr) < self.at_least:
            raise ParamError(where, f"needs at least {self.at_least} points (got {len(arr)})")
        if (arr < 0).any():
            raise ParamError(where, "coordinates must be ≥ 0")
        return arr


class Polygon(Points):
    """A zone: a simple polygon with an area, of 3 to MAX_POINTS corners; a closing point equal to the first (as
    GeoJSON rings repeat it) is dropped."""

    at_least = 3

    def __init__(self) -> None:
        super().__init__(f"the zone's 3 to {MAX_POINTS} corners, in order around it, {UNITS}")

    def convert(self, value: list, where: str, rule: str) -> np.ndarray:
        closed = len(value) > 3 and value[0] == value[-1]
        if len(value) - closed > MAX_POINTS:  # before any work on them
            raise ParamError(where, f"rule {rule!r}: at most {MAX_POINTS} points (got {len(value)})")
        points = super().convert(value, where, rule)
        if closed:
            points = points[:-1]
        problem = polygon_problem(points)
        if problem is not None:
            raise ParamError(where, f"rule {rule!r}: {problem}")
        return points


class Segment(Points):
    """A line: two points that differ."""

    count = 2

    def __init__(self) -> None:
        super().__init__(f"its two ends [[x1, y1], [x2, y2]], {UNITS}; side A is on the left going from the first "
                         "to the second")

    def convert(self, value: list, where: str, rule: str) -> np.ndarray:
        line = super().convert(value, where, rule)
        if np.allclose(line[0], line[1]):
            raise ParamError(where, f"rule {rule!r}: the two points must differ (a line needs a length)")
        return line
