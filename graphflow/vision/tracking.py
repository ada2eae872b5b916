"""Multi-object trackers: greedy IoU matching and ByteTrack (Kalman filter + two-stage association).

Both take one frame's detections (xyxy boxes, scores, classes) per `update` and return the tracks they report
for that frame as `Tracks` (parallel arrays; iterating gives `TrackedObject`s). One tracker instance follows one
stream; track ids start at 1. State is kept as arrays with one row per track, so a frame costs a fixed number
of small NumPy operations whatever the number of tracks (bench/tracking.py measures the rate).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

from graphflow.detections import Detections
from graphflow.vision.detect import pairwise_iou as _iou

log = logging.getLogger(__name__)


class TrackedObject(NamedTuple):
    """One track in one frame; `det_index` is the index of the detection it was matched to."""

    track_id: int
    box: np.ndarray
    score: float
    class_id: int
    det_index: int


@dataclass
class Tracks:
    """The tracks a tracker reports for one frame, as parallel arrays (no per-track objects on the hot path);
    iterating gives `TrackedObject`s."""

    ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    det_index: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[TrackedObject]:
        return map(TrackedObject, self.ids.tolist(), self.boxes, self.scores.tolist(), self.classes.tolist(),
                   self.det_index.tolist())

    def __add__(self, other: Tracks) -> Tracks:
        return Tracks(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a (N,4) and b (M,4) as an (N, M) float array."""
    return _iou(np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4))


def linear_sum_assignment(weights: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's optimal assignment, imported on first use: scipy.optimize takes ~0.6 s to import, which every
    engine process would pay when it loads the graph otherwise."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(weights, maximize=maximize)


def _free(n: int, used: np.ndarray) -> np.ndarray:
    """Indices in range(n) not in `used`."""
    taken = np.zeros(n, bool)
    taken[used] = True
    return (~taken).nonzero()[0]


def _assign(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-IoU assignment among pairs with IoU ≥ min_iou (lower pairs may not be matched): (rows, cols)."""
    gated = iou * (iou >= min_iou)
    rows, cols = linear_sum_assignment(gated, maximize=True)
    keep = gated[rows, cols] > 0
    return rows[keep], cols[keep]


def linear_match(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal assignment on IoU keeping pairs with IoU ≥ min_iou: (pairs (K,2), unmatched rows, unmatched cols)."""
    n, m = iou.shape
    if n == 0 or m == 0:
        return np.empty((0, 2), np.intp), np.arange(n), np.arange(m)
    rows, cols = _assign(iou, min_iou)
    return np.stack([rows, cols], axis=1), _free(n, rows), _free(m, cols)


def greedy_match(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy assignment, highest IoU first, keeping pairs with IoU ≥ min_iou; same return as `linear_match`.

    A pair that is each other's best (row and column) is taken by greedy whatever the order, so those pairs
    are found in a few array operations and only the rows and columns left, usually none, go through the loop
    (pairs of equal IoU aside, the same assignment).
    """
    n, m = iou.shape
    if not (n and m):
        return np.empty((0, 2), np.intp), np.arange(n), np.arange(m)
    gated = np.where(iou >= min_iou, iou, -1.0)
    best_col = gated.argmax(axis=1)
    mutual = (gated.argmax(axis=0)[best_col] == np.arange(n)) & (gated[np.arange(n), best_col] >= 0)
    rows = mutual.nonzero()[0]
    cols = best_col[rows]
    rest_r, rest_c = _free(n, rows), _free(m, cols)
    if len(rest_r) and len(rest_c):
        rest = gated[rest_r[:, None], rest_c]
        cand = (rest >= 0).nonzero()
        if len(cand[0]):
            order = np.argsort(-rest[cand], kind="stable")
            used_r, used_c, more = set(), set(), []
            for r, c in zip(cand[0][order].tolist(), cand[1][order].tolist()):
                if r not in used_r and c not in used_c:
                    used_r.add(r)
                    used_c.add(c)
                    more.append((r, c))
            more_arr = np.array(more, np.intp).reshape(-1, 2)
            rows = np.concatenate([rows, rest_r[more_arr[:, 0]]])
            cols = np.concatenate([cols, rest_c[more_arr[:, 1]]])
            rest_r, rest_c = _free(n, rows), _free(m, cols)
    return np.stack([rows, cols], axis=1), rest_r, rest_c


def _as_inputs(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked float64 boxes (N,4), float scores (N,) and int classes (N,)."""
    if not (type(boxes) is np.ndarray and boxes.dtype == np.float64 and boxes.ndim == 2 and boxes.shape[1] == 4):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not (type(scores) is np.ndarray and scores.dtype == np.float64 and scores.ndim == 1):
        scores = np.asarray(scores, np.float64).reshape(-1)
    if not (type(classes) is np.ndarray and classes.dtype == np.int64 and classes.ndim == 1):
        classes = np.asarray(classes, np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"tracker update: boxes, scores and classes differ in length "
                         f"({len(boxes)}, {len(scores)}, {len(classes)})")
    return boxes, scores, classes


class _Table:
    """Tracker state as parallel arrays, one row per track (subclasses are dataclasses naming the columns),
    so a frame is a few vectorised operations rather than a loop over track objects."""

    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: np.ndarray) -> None:
        """Keep only `rows` (a boolean mask or indices)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[rows])

    def extend(self, other: _Table) -> None:
        """Append the rows of a table of the same kind."""
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(other, f.name)]))


def _column(*shape: int, dtype: type = np.float64) -> Any:
    return field(default_factory=lambda: np.zeros((0, *shape), dtype))


@dataclass
class _IoUTable(_Table):
    ids: np.ndarray = _column(dtype=np.int64)
    classes: np.ndarray = _column(dtype=np.int64)
    box: np.ndarray = _column(4)
    velocity: np.ndarray = _column(4)  # of the box centre, per frame, as a shift of (x1, y1, x2, y2)
    hits: np.ndarray = _column(dtype=np.int64)
    missed: np.ndarray = _column(dtype=np.int64)
    confirmed: np.ndarray = _column(dtype=bool)


class IoUTracker:
    """Greedy IoU tracker: matches each detection to the track whose predicted box overlaps it most.

    A track's box is predicted by moving its last matched box by its centre's velocity (the mean of its last
    velocity and its latest step, so recent steps weigh most) times the frames since that match: a person who
    walks on while undetected for a few frames is found again where they went rather than given a new id.
    A match needs IoU ≥ 1 - match_thresh (match_thresh is the largest 1-IoU cost accepted, as in ByteTracker).
    A track is reported after `min_hits` matches, except those born in the tracker's first frame: the objects
    already in view when a stream starts are reported at once (as ByteTrack does). With `coast` = k > 0, a
    confirmed track that went unmatched up to k frames ago is still reported, at its predicted box, with no
    detection (det_index -1, score NaN).
    """

    def __init__(self, match_thresh: float = 0.8, track_thresh: float = 0.5, track_buffer: int = 30,
                 min_hits: int = 2, class_aware: bool = True, coast: int = 0) -> None:
        self.match_thresh, self.track_thresh = match_thresh, track_thresh
        self.track_buffer, self.min_hits, self.class_aware, self.coast = track_buffer, min_hits, class_aware, coast
        self.tracks = _IoUTable()
        self.labels: dict[int, str] = {}  # a label per class, kept by `follow` for the tracks reported coasting
        self._next_id = 1
        self._first = True

    def _predicted(self, rows: slice | np.ndarray = slice(None), ahead: int = 1) -> np.ndarray:
        """Tracks' boxes (all, or `rows`) moved on by their velocity for the frames since they were last matched
        and `ahead` more."""
        t = self.tracks
        return t.box[rows] + t.velocity[rows] * (t.missed[rows] + ahead)[:, None]

    def update(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Tracks:
        """Match one frame's detections; return confirmed tracks seen in this frame."""
        boxes, scores, classes = _as_inputs(boxes, scores, classes)
        first, self._first = self._first, False
        t = self.tracks
        keep = (scores >= self.track_thresh).nonzero()[0]
        iou = _iou(self._predicted(), boxes[keep])
        if self.class_aware:
            iou *= t.classes[:, None] == classes[keep]
        pairs, lost, fresh = greedy_match(iou, 1.0 - self.match_thresh)
        rows, dets = pairs[:, 0], keep[pairs[:, 1]]
        matched = boxes[dets]
        step = (matched - t.box[rows]) @ _CENTRE_SHIFT  # the centre's move per frame since the last match
        gap = t.missed[rows]
        if np.count_nonzero(gap):
            step /= (gap + 1)[:, None]
        velocity = t.velocity[rows]  # the mean of the last velocity and this step (a new track's starts at rest)
        velocity += step
        velocity *= 0.5
        t.velocity[rows] = velocity
        t.box[rows] = matched
        t.hits[rows] += 1
        t.missed[rows] = 0
        t.missed[lost] += 1
        shown = t.confirmed[rows]
        if not shown.all():
            shown |= t.hits[rows] >= self.min_hits
            t.confirmed[rows] = shown
        rows, dets = rows[shown], dets[shown]
        out = Tracks(t.ids[rows], boxes[dets], scores[dets], t.classes[rows], dets)
        alive = (t.missed <= self.track_buffer) & (t.confirmed | (t.missed == 0))  # unconfirmed: no miss allowed
        if np.count_nonzero(alive) < len(alive):
            t.select(alive)
        if self.coast:
            out += _coasting(t, self.coast, lambda rows: self._predicted(rows, 0))
        born = keep[fresh]
        if len(born):
            n = len(born)
            confirmed = first or self.min_hits <= 1
            new = _IoUTable(np.arange(self._next_id, self._next_id + n), classes[born], boxes[born],
                            np.zeros((n, 4)), np.ones(n, np.int64), np.zeros(n, np.int64), np.full(n, confirmed))
            self._next_id += n
            t.extend(new)
            if confirmed:
                out += Tracks(new.ids, boxes[born], scores[born], new.classes, born)
        return out


# a change of (x1, y1, x2, y2) @ _CENTRE_SHIFT = the change of the centre, as a shift of all four (cx, cy, cx, cy)
_CENTRE_SHIFT = np.array([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]])


# [cx, cy, w, h] @ _CWH_TO_XYXY = [x1, y1, x2, y2], and back with its inverse
_CWH_TO_XYXY = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]])
_XYXY_TO_CWH = np.linalg.inv(_CWH_TO_XYXY)


def _xyxy_to_xyah(boxes: np.ndarray) -> np.ndarray:
    """Boxes x1,y1,x2,y2 as centre x, centre y, aspect w/h, height."""
    out = boxes @ _XYXY_TO_CWH
    out[:, 2] /= np.maximum(out[:, 3], 1e-9)
    return out


def _xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    """Centre x, centre y, aspect, height as boxes x1,y1,x2,y2."""
    cwh = xyah.copy()
    cwh[:, 2] *= xyah[:, 3]  # not cwh[:, 3]: an operand overlapping the output makes NumPy copy (slow)
    return cwh @ _CWH_TO_XYXY


class KalmanBoxFilter:
    """Constant-velocity Kalman filter on (centre x, centre y, aspect w/h, height), batched over tracks.

    Noise scales with the box height, as in SORT/ByteTrack (Bewley 2016, Zhang 2022). Each of the four
    coordinates evolves independently, so the 8x8 covariance is four 2x2 blocks. A track's whole state is
    one (5, 4) block, rows = position, velocity, pos var, pos-vel cov, vel var (one column per coordinate):
    a prediction is one small matrix product and an update a few elementwise operations, for all tracks.
    """

    POS_W = np.array([1 / 20, 1 / 20, 0.0, 1 / 20])
    POS_FIXED = np.array([0.0, 0.0, 1e-2, 0.0])
    VEL_W = np.array([1 / 160, 1 / 160, 0.0, 1 / 160])
    VEL_FIXED = np.array([0.0, 0.0, 1e-5, 0.0])
    MEAS_FIXED = np.array([0.0, 0.0, 1e-1, 0.0])
    # process noise std of (position, velocity) = Q_W * height + Q_FIXED, added to (pos var, vel var)
    Q_W = np.stack([POS_W, VEL_W])
    Q_FIXED = np.stack([POS_FIXED, VEL_FIXED])
    # x' = x + v, and its effect on the covariance blocks: pp + 2 pv + vv, pv + vv, vv
    STEP = np.array([[1.0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 2, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])

    def initiate(self, xyah: np.ndarray) -> np.ndarray:
        """States (N,5,4) of new tracks from measurements (N,4), at rest."""
        h = xyah[:, 3:4]
        state = np.zeros((len(xyah), 5, 4))
        state[:, 0] = xyah
        state[:, 2] = (2 * self.POS_W * h + self.POS_FIXED) ** 2
        state[:, 4] = (10 * self.VEL_W * h + self.VEL_FIXED) ** 2
        return state

    def predict(self, state: np.ndarray) -> np.ndarray:
        """Every state one step ahead (a new array)."""
        q = self.Q_W * state[:, 0, 3, None, None]
        q += self.Q_FIXED
        q *= q
        state = self.STEP @ state
        state[:, 2::2] += q
        return state

    def update(self, state: np.ndarray, xyah: np.ndarray) -> None:
        """Correct states (N,5,4) with their measurements (N,4), in place."""
        r = self.POS_W * state[:, 0, 3, None]
        r += self.MEAS_FIXED
        r *= r
        s = state[:, 2] + r
        gain = state[:, 2:4] / s[:, None]
        state[:, :2] += gain * (xyah - state[:, 0])[:, None]
        state[:, 4] -= gain[:, 1] * state[:, 3]
        r /= s
        state[:, 2:4] *= r[:, None]


@dataclass
class _ByteTable(_Table):
    ids: np.ndarray = _column(dtype=np.int64)
    classes: np.ndarray = _column(dtype=np.int64)
    state: np.ndarray = _column(5, 4)
    hits: np.ndarray = _column(dtype=np.int64)
    missed: np.ndarray = _column(dtype=np.int64)
    confirmed: np.ndarray = _column(dtype=bool)


_NONE = np.zeros(0, np.intp)


class ByteTracker:
    """ByteTrack: Kalman-predicted tracks matched to high-score detections and to closely overlapping low-score ones.

    Low-score detections (between `low_thresh` and `track_thresh`) never start tracks but keep existing ones
    alive through occlusion: a track may take one whose IoU with its prediction is ≥ LOW_IOU. Unlike the
    original's second pass for them, high- and low-score detections go through one assignment: in the original
    a high-score box that merely overlaps a track (a neighbour half hidden behind it) is taken before the
    low-score box that fits the track, which switches ids; here the better-fitting box wins (IDF1 0.897 -> 0.923
    on bench/tracking.py's tuning seeds). In that assignment a track lost for k frames weighs its IoU by
    LOST_DECAY**k, a soft form of DeepSORT's matching cascade: a lost track's drifting prediction may sit on a
    person another track follows, and it takes that box only if it fits much better (ID switches 17 -> 8).
    Low-score boxes may also hold a lost track and confirm a new one. Any high-score box starts a track
    (`new_track_thresh` = track_thresh; the original asks 0.1 more): a false one seldom gets the second match
    that min_hits asks, and a person who walks in is followed a frame or two sooner (on bench/tracking.py's
    tuning seeds 100-109, MOTA 0.876 -> 0.887 and 0.891 -> 0.894 on its two sequences). A track is reported
    after `min_hits` matches (those born in the tracker's first frame at once, as in the original: the objects
    already in view when a stream starts are not held back a frame) and kept `track_buffer` frames after its
    last match. Its reported box is the matched detection's; with `smooth`, the detection's size centred on the
    Kalman-filtered centre, which takes out much of a detector's jitter (the filtered size lags behind people's
    changes of shape, so it is not used; HOTA 0.763 -> 0.782 and 0.776 -> 0.803 on the tuning seeds). With
    `coast` = k > 0, a confirmed track that went unmatched up to k frames ago is still reported, at its Kalman
    prediction, with no detection (det_index -1, score NaN): it fills a detector's dropped frames.
    """

    LOST_DECAY = 0.95  # IoU weight per frame lost (chosen on tuning seeds 100-119, not the reported 0-9; 0.9-0.985 tie on 100-109)
    LOW_IOU = 0.5  # least IoU for a low-score detection to keep a track (ByteTrack's second-pass gate)

    def __init__(self, track_thresh: float = 0.5, low_thresh: float = 0.1, new_track_thresh: float | None = None,
                 match_thresh: float = 0.8, track_buffer: int = 30, min_hits: int = 2, class_aware: bool = True,
                 coast: int = 0, smooth: bool = False) -> None:
        self.track_thresh, self.low_thresh = track_thresh, low_thresh
        self.new_track_thresh = track_thresh if new_track_thresh is None else new_track_thresh
        self.match_thresh, self.track_buffer, self.min_hits, self.class_aware = match_thresh, track_buffer, min_hits, class_aware
        self.coast, self.smooth = coast, smooth
        self.kf = KalmanBoxFilter()
        self.tracks = _ByteTable()
        self.labels: dict[int, str] = {}  # a label per class, kept by `follow` for the tracks reported coasting
        self._next_id = 1
        self._first = True

    @staticmethod
    def _match(iou: np.ndarray, allowed: np.ndarray, min_iou: float, weight: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Assignment among the `allowed` (track, detection) pairs with IoU ≥ min_iou, maximising the sum of
        `weight` (default: the IoU): (rows, dets)."""
        allowed = allowed & (iou >= min_iou)
        if not np.count_nonzero(allowed):  # (count_nonzero: no Python-level wrapper, unlike .any())
            return _NONE, _NONE
        gated = (iou if weight is None else weight) * allowed
        rows, dets = linear_sum_assignment(gated, maximize=True)
        keep = gated[rows, dets] > 0
        return rows[keep], dets[keep]

    def update(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Tracks:
        """Advance one frame with its detections; return confirmed tracks matched in this frame."""
        boxes, scores, classes = _as_inputs(boxes, scores, classes)
        first, self._first = self._first, False
        t = self.tracks
        if len(t):
            t.state[:, 1, 3] *= t.missed == 0  # a lost track keeps its size
            t.state = self.kf.predict(t.state)
        iou = _iou(_xyah_to_xyxy(t.state[:, 0]), boxes)
        if self.class_aware:
            iou *= t.classes[:, None] == classes
        high = scores >= self.track_thresh
        # a detection a track may take: a high-score one, or a low-score one overlapping its prediction closely
        usable = high | ((scores >= self.low_thresh) & (iou >= self.LOW_IOU))
        # 1: confirmed tracks (seen or lost) with high- and low-score detections in one assignment
        weight = iou * (self.LOST_DECAY ** t.missed)[:, None] if self.LOST_DECAY != 1.0 else None
        rows, dets = self._match(iou, t.confirmed[:, None] & usable, 1.0 - self.match_thresh, weight)
        # 2: new tracks with the detections left
        tentative = ~t.confirmed
        if np.count_nonzero(tentative):
            usable[:, dets] = False
            r2, d2 = self._match(iou, tentative[:, None] & usable, 0.3)
            rows, dets = np.concatenate([rows, r2]), np.concatenate([dets, d2])
        if len(rows):
            state = t.state[rows]
            self.kf.update(state, _xyxy_to_xyah(boxes[dets]))
            t.state[rows] = state
            t.hits[rows] += 1
            t.confirmed[rows] |= t.hits[rows] >= self.min_hits
        t.missed += 1
        t.missed[rows] = 0
        shown = t.confirmed[rows]
        rows, dets = rows[shown], dets[shown]
        reported = boxes[dets]
        if self.smooth and len(rows):  # the detection's size, centred on the filtered centre
            shift = t.state[rows, 0, :2] - (reported[:, :2] + reported[:, 2:]) * 0.5
            reported = reported + np.concatenate([shift, shift], axis=1)
        out = Tracks(t.ids[rows], reported, scores[dets], t.classes[rows], dets)
        keep = (t.missed <= self.track_buffer) & (t.confirmed | (t.missed == 0))  # unconfirmed: no miss allowed
        if np.count_nonzero(keep) < len(keep):
            t.select(keep)
        if self.coast:
            out += _coasting(t, self.coast, lambda rows: _xyah_to_xyxy(t.state[rows, 0]))
        fresh = high & (scores >= self.new_track_thresh)
        fresh[dets] = False
        born = fresh.nonzero()[0]
        if len(born):
            n = len(born)
            confirmed = first or self.min_hits <= 1  # the objects in view when the stream starts: at once
            new = _ByteTable(ids=np.arange(self._next_id, self._next_id + n), classes=classes[born],
                             state=self.kf.initiate(_xyxy_to_xyah(boxes[born])), hits=np.ones(n, np.int64),
                             missed=np.zeros(n, np.int64), confirmed=np.full(n, confirmed))
            self._next_id += n
            t.extend(new)
            if confirmed:
                out += Tracks(new.ids, boxes[born], scores[born], new.classes, born)
        return out


def _coasting(t: _IoUTable | _ByteTable, coast: int, predict: Any) -> Tracks:
    """The confirmed tracks of table `t` unmatched for 1..coast frames, at the boxes `predict(rows)` gives."""
    rows = (t.confirmed & (t.missed >= 1) & (t.missed <= coast)).nonzero()[0]
    n = len(rows)
    return Tracks(t.ids[rows], predict(rows), np.full(n, np.nan), t.classes[rows], np.full(n, -1, np.intp))


def follow(tracker: IoUTracker | ByteTracker, detections: Detections) -> Detections:
    """One frame's detections through `tracker`: the objects it reports, with their track ids and its boxes and
    scores (the columns go in and come out as arrays; each object keeps its other fields). A track reported
    without a detection (`coast`) comes last, with its class, the label last seen for that class, no score."""
    found = tracker.update(detections.rounded_boxes(), detections.rounded_scores(), detections.class_ids)
    if not tracker.coast:
        return detections.take(found.det_index).replace(boxes=found.boxes, scores=found.scores, track_ids=found.ids)
    tracker.labels.update(zip(detections.class_ids.tolist(), detections.labels.tolist()))
    seen = found.det_index >= 0
    matched = detections.take(found.det_index[seen]).replace(boxes=found.boxes[seen], scores=found.scores[seen],
                                                             track_ids=found.ids[seen])
    classes = found.classes[~seen]
    coasting = Detections(found.boxes[~seen], None, classes, [tracker.labels.get(c) for c in classes.tolist()],
                          found.ids[~seen])
    return Detections.concat([matched, coasting])


def make_tracker(algorithm: str, **kwargs) -> IoUTracker | ByteTracker:
    """A tracker by name ("iou" or "bytetrack") with its keyword parameters."""
    kinds = {"iou": IoUTracker, "bytetrack": ByteTracker}
    if algorithm not in kinds:
        raise ValueError(f"tracker algorithm: must be one of {', '.join(kinds)} (got {algorithm!r})")
    return kinds[algorithm](**kwargs)
