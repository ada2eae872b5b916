"""Multi-object trackers: greedy IoU matching and ByteTrack (Kalman filter + two-stage association).

Both take one frame's detections (xyxy boxes, scores, classes) per `update` and return the tracks seen in
that frame as `TrackedObject`s. One tracker instance follows one stream; track ids start at 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)


class TrackedObject(NamedTuple):
    """One track in one frame; `det_index` is the index of the detection it was matched to."""

    track_id: int
    box: np.ndarray
    score: float
    class_id: int
    det_index: int


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a (N,4) and b (M,4) as an (N, M) float array."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def _class_gate(iou: np.ndarray, track_classes: np.ndarray, det_classes: np.ndarray) -> np.ndarray:
    """IoU with pairs of different classes set to 0, so a track never changes class."""
    return np.where(track_classes[:, None] == det_classes[None, :], iou, 0.0)


def linear_match(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal assignment on 1-IoU keeping pairs with IoU ≥ min_iou: (pairs (K,2), unmatched rows, unmatched cols)."""
    n, m = iou.shape
    if n == 0 or m == 0:
        return np.empty((0, 2), int), np.arange(n), np.arange(m)
    rows, cols = linear_sum_assignment(1.0 - iou)
    keep = iou[rows, cols] >= min_iou
    rows, cols = rows[keep], cols[keep]
    free_r, free_c = np.ones(n, bool), np.ones(m, bool)
    free_r[rows] = free_c[cols] = False
    return np.column_stack([rows, cols]), np.flatnonzero(free_r), np.flatnonzero(free_c)


def greedy_match(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy assignment, highest IoU first, keeping pairs with IoU ≥ min_iou; same return as `linear_match`."""
    n, m = iou.shape
    order = np.argsort(-iou, axis=None, kind="stable")
    order = order[iou.ravel()[order] >= min_iou]
    used_r, used_c, pairs = np.zeros(n, bool), np.zeros(m, bool), []
    for r, c in zip(*np.unravel_index(order, iou.shape)):
        if not used_r[r] and not used_c[c]:
            used_r[r] = used_c[c] = True
            pairs.append((r, c))
    pairs_arr = np.array(pairs, int).reshape(-1, 2)
    return pairs_arr, np.flatnonzero(~used_r), np.flatnonzero(~used_c)


def _as_inputs(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked float64 boxes (N,4), float scores (N,) and int classes (N,)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"tracker update: boxes, scores and classes differ in length "
                         f"({len(boxes)}, {len(scores)}, {len(classes)})")
    return boxes, scores, classes


@dataclass
class _IoUTrack:
    track_id: int
    box: np.ndarray
    class_id: int
    hits: int = 1
    missed: int = 0


class IoUTracker:
    """Greedy IoU tracker: matches each detection to the track whose last box overlaps it most.

    A match needs IoU ≥ 1 - match_thresh (match_thresh is the largest 1-IoU cost accepted, as in ByteTracker).
    """

    def __init__(self, match_thresh: float = 0.7, track_thresh: float = 0.5, track_buffer: int = 30,
                 min_hits: int = 1, class_aware: bool = True) -> None:
        self.match_thresh, self.track_thresh = match_thresh, track_thresh
        self.track_buffer, self.min_hits, self.class_aware = track_buffer, min_hits, class_aware
        self.tracks: list[_IoUTrack] = []
        self._next_id = 1

    def update(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> list[TrackedObject]:
        """Match one frame's detections; return confirmed tracks seen in this frame."""
        boxes, scores, classes = _as_inputs(boxes, scores, classes)
        keep = np.flatnonzero(scores >= self.track_thresh)
        prev = np.array([t.box for t in self.tracks]).reshape(-1, 4)
        iou = iou_matrix(prev, boxes[keep])
        if self.class_aware:
            iou = _class_gate(iou, np.array([t.class_id for t in self.tracks], np.int64), classes[keep])
        pairs, lost, fresh = greedy_match(iou, 1.0 - self.match_thresh)
        out = []
        for r, c in pairs:
            t, d = self.tracks[r], keep[c]
            t.box, t.hits, t.missed = boxes[d], t.hits + 1, 0
            if t.hits >= self.min_hits:
                out.append(TrackedObject(t.track_id, boxes[d].copy(), float(scores[d]), t.class_id, int(d)))
        for r in lost:
            self.tracks[r].missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.track_buffer and (t.missed == 0 or t.hits >= self.min_hits)]
        for c in fresh:
            d = keep[c]
            t = _IoUTrack(self._next_id, boxes[d], int(classes[d]))
            self._next_id += 1
            self.tracks.append(t)
            if self.min_hits <= 1:
                out.append(TrackedObject(t.track_id, boxes[d].copy(), float(scores[d]), t.class_id, int(d)))
        return out


def _xyxy_to_xyah(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    h = boxes[:, 3] - boxes[:, 1]
    out[:, :2] = (boxes[:, :2] + boxes[:, 2:]) / 2
    out[:, 2] = (boxes[:, 2] - boxes[:, 0]) / np.maximum(h, 1e-9)
    out[:, 3] = h
    return out


def _xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    half = np.empty((len(xyah), 2))
    half[:, 0] = xyah[:, 2] * xyah[:, 3] / 2
    half[:, 1] = xyah[:, 3] / 2
    return np.concatenate([xyah[:, :2] - half, xyah[:, :2] + half], axis=1)


class KalmanBoxFilter:
    """Constant-velocity Kalman filter on (centre x, centre y, aspect w/h, height), batched over tracks.

    Noise scales with the box height, as in SORT/ByteTrack (Bewley 2016, Zhang 2022). Each of the four
    coordinates evolves independently, so the 8x8 covariance is four 2x2 blocks: we keep them as `cov`
    (N, 3, 4) = (pos var, pos-vel cov, vel var) per coordinate and update them elementwise (exact, and much
    cheaper than batched 8x8 matrix products).
    """

    POS_W = np.array([1 / 20, 1 / 20, 0.0, 1 / 20])
    POS_FIXED = np.array([0.0, 0.0, 1e-2, 0.0])
    VEL_W = np.array([1 / 160, 1 / 160, 0.0, 1 / 160])
    VEL_FIXED = np.array([0.0, 0.0, 1e-5, 0.0])
    MEAS_FIXED = np.array([0.0, 0.0, 1e-1, 0.0])

    def initiate(self, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means (N,8) and covariances (N,3,4) of new tracks from measurements (N,4)."""
        h = xyah[:, 3:4]
        cov = np.zeros((len(xyah), 3, 4))
        cov[:, 0] = (2 * self.POS_W * h + self.POS_FIXED) ** 2
        cov[:, 2] = (10 * self.VEL_W * h + self.VEL_FIXED) ** 2
        return np.concatenate([xyah, np.zeros_like(xyah)], axis=1), cov

    def predict(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step ahead for every row."""
        h = mean[:, 3:4]
        pp, pv, vv = cov[:, 0], cov[:, 1], cov[:, 2]
        out = np.empty_like(cov)
        out[:, 0] = pp + 2 * pv + vv + (self.POS_W * h + self.POS_FIXED) ** 2
        out[:, 1] = pv + vv
        out[:, 2] = vv + (self.VEL_W * h + self.VEL_FIXED) ** 2
        mean = mean.copy()
        mean[:, :4] += mean[:, 4:]
        return mean, out

    def update(self, mean: np.ndarray, cov: np.ndarray, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correct rows with their measurements (N,4)."""
        pp, pv, vv = cov[:, 0], cov[:, 1], cov[:, 2]
        s = pp + (self.POS_W * mean[:, 3:4] + self.MEAS_FIXED) ** 2
        kp, kv = pp / s, pv / s
        innov = xyah - mean[:, :4]
        mean = np.concatenate([mean[:, :4] + kp * innov, mean[:, 4:] + kv * innov], axis=1)
        out = np.empty_like(cov)
        out[:, 0], out[:, 1], out[:, 2] = pp - kp * pp, pv - kp * pv, vv - kv * pv
        return mean, out


def _objects(ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, dets: np.ndarray) -> list[TrackedObject]:
    """TrackedObjects from parallel arrays (`boxes` rows become the objects' boxes, so pass a copy)."""
    return list(map(TrackedObject, ids.tolist(), boxes, scores.tolist(), classes.tolist(), dets.tolist()))


@dataclass
class _TrackTable:
    """ByteTracker state as parallel arrays, one row per track, so each frame is a few vectorised ops."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mean: np.ndarray = field(default_factory=lambda: np.zeros((0, 8)))
    cov: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 4)))
    box: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    missed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    confirmed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: np.ndarray) -> None:
        """Keep only `rows` (a boolean mask or indices)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[rows])

    def extend(self, other: _TrackTable) -> None:
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(other, f.name)]))


class ByteTracker:
    """ByteTrack: Kalman-predicted tracks matched to high-score detections, then to low-score ones.

    Low-score detections (between `low_thresh` and `track_thresh`) never start tracks but keep existing ones
    alive through occlusion. A track is reported after `min_hits` matches and kept `track_buffer` frames
    after its last match.
    """

    def __init__(self, track_thresh: float = 0.5, low_thresh: float = 0.1, new_track_thresh: float | None = None,
                 match_thresh: float = 0.8, track_buffer: int = 30, min_hits: int = 2, class_aware: bool = True) -> None:
        self.track_thresh, self.low_thresh = track_thresh, low_thresh
        self.new_track_thresh = track_thresh + 0.1 if new_track_thresh is None else new_track_thresh
        self.match_thresh, self.track_buffer, self.min_hits, self.class_aware = match_thresh, track_buffer, min_hits, class_aware
        self.kf = KalmanBoxFilter()
        self.tracks = _TrackTable()
        self._next_id = 1

    def _match(self, rows: np.ndarray, dets: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
               min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Assign detections `dets` to track `rows`: (matched rows, matched dets, unmatched rows, unmatched dets)."""
        if not len(rows) or not len(dets):
            return rows[:0], dets[:0], rows, dets
        iou = iou_matrix(self.tracks.box[rows], boxes[dets])
        if self.class_aware:
            iou = _class_gate(iou, self.tracks.classes[rows], classes[dets])
        pairs, free_r, free_d = linear_match(iou, min_iou)
        return rows[pairs[:, 0]], dets[pairs[:, 1]], rows[free_r], dets[free_d]

    def update(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> list[TrackedObject]:
        """Advance one frame with its detections; return confirmed tracks matched in this frame."""
        boxes, scores, classes = _as_inputs(boxes, scores, classes)
        t = self.tracks
        if len(t):
            t.mean[t.missed > 0, 7] = 0.0
            t.mean, t.cov = self.kf.predict(t.mean, t.cov)
            t.box = _xyah_to_xyxy(t.mean[:, :4])
        high = np.flatnonzero(scores >= self.track_thresh)
        low = np.flatnonzero((scores >= self.low_thresh) & (scores < self.track_thresh))
        confirmed, tentative = np.flatnonzero(t.confirmed), np.flatnonzero(~t.confirmed)

        r1, d1, rest, left = self._match(confirmed, high, boxes, classes, 1.0 - self.match_thresh)
        r2, d2, _, _ = self._match(rest[t.missed[rest] == 0], low, boxes, classes, 0.5)
        r3, d3, rest_tentative, left = self._match(tentative, left, boxes, classes, 0.3)
        rows, dets = np.concatenate([r1, r2, r3]), np.concatenate([d1, d2, d3])
        if len(rows):
            t.mean[rows], t.cov[rows] = self.kf.update(t.mean[rows], t.cov[rows], _xyxy_to_xyah(boxes[dets]))
            t.box[rows] = _xyah_to_xyxy(t.mean[rows, :4])
            t.score[rows], t.hits[rows], t.missed[rows] = scores[dets], t.hits[rows] + 1, 0
            t.confirmed[rows] |= t.hits[rows] >= self.min_hits
        unmatched = np.ones(len(t), bool)
        unmatched[rows] = False
        t.missed[unmatched & t.confirmed] += 1
        shown = t.confirmed[rows]
        out = _objects(t.ids[rows[shown]], t.box[rows[shown]], t.score[rows[shown]], t.classes[rows[shown]], dets[shown])
        keep = t.missed <= self.track_buffer
        keep[rest_tentative] = False
        if not keep.all():
            t.select(keep)

        born = left[scores[left] >= self.new_track_thresh]
        if len(born):
            mean, cov = self.kf.initiate(_xyxy_to_xyah(boxes[born]))
            n = len(born)
            new = _TrackTable(ids=np.arange(self._next_id, self._next_id + n), classes=classes[born], mean=mean, cov=cov,
                              box=boxes[born].copy(), score=scores[born], hits=np.ones(n, np.int64),
                              missed=np.zeros(n, np.int64), confirmed=np.full(n, self.min_hits <= 1))
            self._next_id += n
            t.extend(new)
            if self.min_hits <= 1:
                out += _objects(new.ids, new.box.copy(), new.score, new.classes, born)
        return out


def make_tracker(algorithm: str, **kwargs) -> IoUTracker | ByteTracker:
    """A tracker by name ("iou" or "bytetrack") with its keyword parameters."""
    kinds = {"iou": IoUTracker, "bytetrack": ByteTracker}
    if algorithm not in kinds:
        raise ValueError(f"tracker algorithm: must be one of {', '.join(kinds)} (got {algorithm!r})")
    return kinds[algorithm](**kwargs)
