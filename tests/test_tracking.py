"""Trackers: ids kept across motion, gaps, crossings and low-score frames; the track engine per stream."""
from __future__ import annotations

import numpy as np
import pytest

from graphflow.engines.track import Track
from graphflow import Message, ParamError
from graphflow.testing import run_engine
from graphflow.vision.tracking import ByteTracker, IoUTracker, TrackedObject, Tracks, greedy_match, iou_matrix, linear_match

TRACKERS = [lambda: IoUTracker(min_hits=1), lambda: ByteTracker(min_hits=1)]


def box(cx: float, cy: float, w: float = 40, h: float = 80) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def step(tracker, boxes: list[list[float]], scores: list[float] | None = None, classes: list[int] | None = None) -> dict[int, int]:
    """Feed one frame; return {det_index: track_id}."""
    n = len(boxes)
    out = tracker.update(np.array(boxes).reshape(-1, 4), np.array(scores or [0.9] * n),
                         np.array(classes or [0] * n))
    return {t.det_index: t.track_id for t in out}


def test_iou_matrix_values():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 101, 101]])
    expected = np.array([[1, 50 / 150, 0], [0, 0, 0]])
    np.testing.assert_allclose(iou_matrix(a, b), expected)
    assert iou_matrix(a, np.empty((0, 4))).shape == (2, 0)


def test_greedy_and_linear_match_differ_where_greedy_is_suboptimal():
    iou = np.array([[0.9, 0.8], [0.85, 0.0]])
    pairs, _, _ = greedy_match(iou, 0.1)
    assert pairs.tolist() == [[0, 0]]
    pairs, rows, cols = linear_match(iou, 0.1)
    assert sorted(pairs.tolist()) == [[0, 1], [1, 0]] and len(rows) == len(cols) == 0


@pytest.mark.parametrize("make", TRACKERS, ids=["iou", "bytetrack"])
def test_two_moving_boxes_keep_ids(make):
    tracker = make()
    first = step(tracker, [box(100, 100), box(300, 100)])
    assert sorted(first.values()) == [1, 2]
    for f in range(1, 20):
        ids = step(tracker, [box(300 + 4 * f, 100), box(100 + 4 * f, 100)])  # order swapped on purpose
        assert ids == {0: first[1], 1: first[0]}


@pytest.mark.parametrize("make", TRACKERS, ids=["iou", "bytetrack"])
def test_box_missing_for_a_few_frames_keeps_id(make):
    tracker = make()
    tid = step(tracker, [box(100, 100)])[0]
    for f in range(1, 5):
        step(tracker, [box(100 + 2 * f, 100)])
    for _ in range(5):
        assert step(tracker, []) == {}
    assert step(tracker, [box(110, 100)]) == {0: tid}


@pytest.mark.parametrize("make", TRACKERS, ids=["iou", "bytetrack"])
def test_track_dropped_after_track_buffer(make):
    tracker = make()
    tracker.track_buffer = 3
    tid = step(tracker, [box(100, 100)])[0]
    for _ in range(4):
        step(tracker, [])
    assert step(tracker, [box(100, 100)])[0] != tid


def test_bytetrack_crossing_boxes_keep_ids():
    """Two people walk through each other; constant-velocity prediction keeps each id on its own path."""
    tracker = ByteTracker(min_hits=1)
    ids = step(tracker, [box(100, 200), box(400, 200)])
    for f in range(1, 31):
        a, b = box(100 + 10 * f, 200), box(400 - 10 * f, 204)
        got = step(tracker, [a, b])
        assert got == ids, f"frame {f}"


def test_bytetrack_low_score_detections_keep_track_alive():
    tracker = ByteTracker(min_hits=1, track_thresh=0.5, track_buffer=0)
    tid = step(tracker, [box(100, 100)])[0]
    for f in range(1, 6):
        assert step(tracker, [box(100 + 3 * f, 100)], [0.3]) == {0: tid}  # occluded: low score
    assert step(tracker, [box(118, 100)], [0.9]) == {0: tid}
    # low-score detections never start tracks
    assert step(ByteTracker(min_hits=1), [box(100, 100)], [0.3]) == {}


def test_bytetrack_low_score_detection_holds_a_lost_track_and_confirms_a_new_one():
    tracker = ByteTracker(min_hits=2)
    step(tracker, [])  # (tracks born in the first frame are confirmed at once)
    assert step(tracker, [box(100, 100)]) == {}
    assert step(tracker, [box(102, 100)], [0.3]) == {0: 1}     # a close low-score box confirms the new track
    assert step(tracker, []) == {}                              # lost for a frame
    assert step(tracker, [box(106, 100)], [0.3]) == {0: 1}     # a close low-score box takes it back
    assert step(tracker, [box(300, 100)], [0.3]) == {}          # a far one does nothing


def test_update_returns_arrays_with_the_detection_boxes():
    tracker = ByteTracker(min_hits=1)
    tracker.update(np.array([box(100, 100), box(300, 100)]), np.array([0.9, 0.8]), np.array([0, 2]))
    dets = np.array([box(305, 101), box(104, 99)])
    out = tracker.update(dets, np.array([0.7, 0.95]), np.array([2, 0]))
    assert isinstance(out, Tracks) and len(out) == 2
    order = np.argsort(out.det_index)
    np.testing.assert_array_equal(out.boxes[order], dets)
    assert out.ids[order].tolist() == [2, 1] and out.classes[order].tolist() == [2, 0]
    assert out.scores[order].tolist() == [0.7, 0.95]
    first = next(iter(out))
    assert isinstance(first, TrackedObject) and first.track_id in (1, 2)


def test_bytetrack_min_hits_and_classes():
    tracker = ByteTracker(min_hits=2)
    step(tracker, [])  # (tracks born in the first frame are confirmed at once)
    assert step(tracker, [box(100, 100)]) == {}
    assert step(tracker, [box(102, 100)]) == {0: 1}
    # a detection of another class does not take over the track
    got = step(tracker, [box(104, 100)], classes=[3])
    assert 1 not in got.values()


def test_track_engine_per_stream_ids():
    def msg(stream: str, seq: int, cx: float) -> Message:
        det = {"box": box(cx, 100), "score": 0.9, "class_id": 0, "label": "person"}
        return Message(stream=stream, seq=seq, data={"detections": [det]})

    msgs = [msg(s, i, 100 + 3 * i) for i in range(5) for s in ("a", "b")]
    out = run_engine(Track, {"algorithm": "bytetrack", "min_hits": 1}, msgs)["out"]
    assert len(out) == 10
    for m in out:
        (t,) = m.data["tracks"]
        assert t["track_id"] == 1 and t["label"] == "person" and len(t["box"]) == 4
    # a first frame without objects per stream, so that the tracks are born later (not confirmed at birth)
    empty = [Message(stream=s, seq=-1, data={"detections": []}) for s in ("a", "b")]
    out = run_engine(Track, {"algorithm": "iou", "min_hits": 3}, empty + msgs)["out"]
    assert [len(m.data["tracks"]) for m in out] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_track_engine_errors():
    with pytest.raises(ParamError, match="algorithm"):
        Track("t", {"algorithm": "sort"})
    frame = Message(arrays={"image": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match=r"frame 0#0 has no data\['detections'\] \(put infer before track\)"):
        run_engine(Track, {}, [frame])


def test_tracker_throughput():
    """10 objects per frame; a loose floor so a loaded CI machine passes (the bench measures properly)."""
    import time
    rng = np.random.default_rng(0)
    base, vel = rng.uniform(0, 1000, (10, 2)), rng.uniform(-5, 5, (10, 2))
    frames = [np.concatenate([base + vel * f, base + vel * f + 50], 1) for f in range(300)]
    for tracker in (IoUTracker(), ByteTracker()):
        t0 = time.perf_counter()
        for b in frames:
            out = tracker.update(b, np.full(10, 0.9), np.zeros(10))
        rate = len(frames) / (time.perf_counter() - t0)
        assert len(out) == 10 and rate > 300, (type(tracker).__name__, rate)


def test_bytetrack_low_score_box_that_fits_beats_high_score_box_that_overlaps():
    """A person half hidden behind a smaller one in front: the track keeps its own (low-score) box, not the
    neighbour's high-score box that overlaps its prediction by IoU 0.375 (ByteTrack's first pass would take it)."""
    tracker = ByteTracker(min_hits=1)
    tid = step(tracker, [box(100, 100)])[0]
    for _ in range(5):
        step(tracker, [box(100, 100)])
    got = step(tracker, [box(100, 100), box(100, 75, 40, 30)], [0.3, 0.9])
    assert got.get(0) == tid and got.get(1) != tid


@pytest.mark.parametrize("decay, keeps", [(ByteTracker.LOST_DECAY, True), (1.0, False)])
def test_bytetrack_lost_track_does_not_steal_a_followed_persons_box(decay, keeps):
    """B stands still then vanishes; A walks onto B's last place and its box lands 4 px ahead of A's
    prediction, squarely on B's: the recently seen A keeps it (by plain IoU, the long-lost B would take it)."""
    tracker = ByteTracker(min_hits=1)
    tracker.LOST_DECAY = decay
    ids = step(tracker, [box(100, 100), box(200, 100)])
    for f in range(1, 5):
        step(tracker, [box(100 + 4 * f, 100), box(200, 100)])
    for f in range(5, 24):
        assert step(tracker, [box(100 + 4 * f, 100)]) == {0: ids[0]}, f"frame {f}"
    got = step(tracker, [box(200, 100)])
    assert (got == {0: ids[0]}) is keeps


@pytest.mark.parametrize("cls", [IoUTracker, ByteTracker])
def test_first_frame_tracks_are_confirmed_at_once_later_ones_after_min_hits(cls):
    """As the original ByteTrack: the objects in view when a stream starts are reported in its first frame;
    one that appears later waits for min_hits (default 2) matches."""
    tracker = cls()
    assert tracker.min_hits == 2
    first = step(tracker, [box(100, 100), box(300, 100)])
    assert sorted(first.values()) == [1, 2]
    assert step(tracker, [box(103, 100), box(303, 100), box(500, 100)]) == {0: first[0], 1: first[1]}
    assert step(tracker, [box(106, 100), box(306, 100), box(503, 100)]) == {0: first[0], 1: first[1], 2: 3}
    # with an empty first frame, nothing born later is shown at birth
    late = cls()
    step(late, [])
    assert step(late, [box(100, 100)]) == {}
    assert step(late, [box(103, 100)]) == {0: 1}


def test_iou_tracker_bridges_a_gap_by_the_track_velocity():
    """A person walking 8 px a frame is not detected for 6 frames: found again 56 px on, where a box of width
    40 no longer overlaps its last box at all, the track keeps its id (its box is moved on by its velocity)."""
    tracker = IoUTracker()
    tid = step(tracker, [box(100, 100)])[0]
    for f in range(1, 6):
        assert step(tracker, [box(100 + 8 * f, 100)]) == {0: tid}
    last = box(140, 100)
    for _ in range(6):
        assert step(tracker, []) == {}
    back = box(140 + 8 * 7, 100)
    assert iou_matrix([last], [back])[0, 0] == 0  # without motion, no match is possible
    assert step(tracker, [back]) == {0: tid}
    assert step(tracker, [box(140 + 8 * 8, 100)]) == {0: tid}


@pytest.mark.parametrize("cls", [IoUTracker, ByteTracker])
def test_coast_reports_a_lost_track_at_its_predicted_box_for_coast_frames(cls):
    tracker = cls(min_hits=1, coast=2)
    for f in range(6):
        tid = step(tracker, [box(100 + 5 * f, 100)])[0]
    for k in (1, 2):
        (obj,) = tracker.update(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
        assert obj.track_id == tid and obj.det_index == -1 and np.isnan(obj.score)
        # moved on from the last box (x1 105), towards where 5 px a frame takes it (the Kalman velocity lags)
        assert 105 + 2 * k < obj.box[0] <= 105 + 5 * k + 0.5 and obj.box[1] == pytest.approx(60, abs=0.5)
    assert len(tracker.update(np.zeros((0, 4)), np.zeros(0), np.zeros(0))) == 0  # a third frame: not any more
    assert step(tracker, [box(140, 100)]) == {0: tid}


def test_track_engine_coast_keeps_label_and_class_with_no_score():
    def msg(seq: int, dets: list) -> Message:
        return Message(stream="a", seq=seq, data={"detections": dets})

    person = [{"box": box(100 + 3 * i, 100), "score": 0.9, "class_id": 0, "label": "person"} for i in range(3)]
    msgs = [msg(i, [d]) for i, d in enumerate(person)] + [msg(3, []), msg(4, [])]
    out = run_engine(Track, {"coast": 1}, msgs)["out"]
    assert [len(m.data["tracks"]) for m in out] == [1, 1, 1, 1, 0]
    (coasting,) = out[3].data["tracks"]
    assert coasting["track_id"] == 1 and coasting["label"] == "person" and coasting["class_id"] == 0
    assert "score" not in coasting and 86 < coasting["box"][0] <= 89.5  # moved on from x1 86, at most 3 px
    assert run_engine(Track, {}, msgs)["out"][3].data["tracks"] == []  # default: no coasting


def test_track_engine_defaults_are_the_tracker_classes_defaults():
    """One default per setting: the engine's Params agree with IoUTracker's and ByteTracker's own."""
    import inspect
    engine = Track("t", {})
    for cls in (IoUTracker, ByteTracker):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or not hasattr(engine, name):
                continue
            value = getattr(engine, name)
            if name == "new_track_thresh":  # the engine's -1 stands for the class's None (track_thresh)
                value = None if value < 0 else value
            assert value == p.default, (cls.__name__, name, value, p.default)


def test_bytetrack_smooth_reports_the_detection_size_at_the_filtered_centre():
    """A box standing still with its detections jittered ±6 px: smoothed boxes keep the detections' sizes and
    stay nearer the true place than the detections do."""
    rng = np.random.default_rng(3)
    plain, smooth = ByteTracker(min_hits=1), ByteTracker(min_hits=1, smooth=True)
    err_det = err_smooth = 0.0
    for f in range(40):
        det = np.array([box(200 + rng.uniform(-6, 6), 150 + rng.uniform(-6, 6), 40 + f % 3, 80)])
        a = plain.update(det, np.array([0.9]), np.zeros(1))
        b = smooth.update(det, np.array([0.9]), np.zeros(1))
        np.testing.assert_array_equal(a.boxes, det)
        np.testing.assert_allclose(b.boxes[:, 2:] - b.boxes[:, :2], det[:, 2:] - det[:, :2])
        if f >= 10:
            err_det += abs((det[0, 0] + det[0, 2]) / 2 - 200)
            err_smooth += abs((b.boxes[0, 0] + b.boxes[0, 2]) / 2 - 200)
    assert err_smooth < 0.85 * err_det  # 0.62-0.80 of it over seeds 0-7
