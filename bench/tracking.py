"""Tracker accuracy (MOTA, IDF1, ID switches by motmetrics; HOTA by TrackEval) and tracker-only speed: graphflow's
`iou` and `bytetrack` against the trackers people pick, all fed the same detections in the same run.

Usage: python bench/tracking.py [--quick] [--seeds 10 | --seeds 100-109] [--no-sweep] [--only NAME,...]
                                [--check-hota] [--write-walkers DIR]

Peers (each left out, with a note, when its package is missing): BoxMOT's ByteTrack, OC-SORT and BoT-SORT
(without ReID and without camera-motion compensation: there are no images, and both cameras stand still);
Roboflow `trackers`' SORT, ByteTrack, OC-SORT, BoT-SORT (no CMC) and C-BIoU; supervision's ByteTrack
(`sv.ByteTrack`, removed in supervision 0.31); norfair (IoU distance, threshold 0.7: it has no defaults for
these two). Every tracker that takes a frame rate is given the sequences' (25 fps).

Ground truth: TUD-Campus and TUD-Stadtmitte (MOTChallenge format, shipped inside the motmetrics package).
They carry no detections, so detections are derived from the ground truth with fixed seeds (see `noisy`):
each box is missed with p=0.10, its centre jittered by N(0, 4% of w/h) and its size by a factor exp(N(0, 0.04));
15% of the kept boxes get a low score U(0.15, 0.5) (as occluded people do), the others U(0.5, 1.0); plus
Poisson(0.3) false positives per frame with scores U(0.1, 0.6). Every seed gives one detection file per
sequence, written in MOTChallenge format and read back with graphflow.vision.mot (the `detfile` engine's
parser). Metrics are per sequence, pooled over seeds (motmetrics' OVERALL; TrackEval's combined HOTA).
HOTA is TrackEval's metric fed in memory; `--check-hota` shows it equal to TrackEval's own MOTChallenge
pipeline (files, loader, preprocessing) on the tracker results motmetrics ships.
Seeds 0-9 are the reported ones; graphflow's own constants are chosen on other seeds (`--seeds 100-109`).

Two comparisons: every tracker with its default parameters; and a sweep of ten settings per tracker (its own
knobs, `SWEEPS`), cross-validated: the setting with the best HOTA on one sequence is reported on the other, so
no figure comes from a setting chosen on the sequence it is reported on.

Speed: tracker `update` calls only, on one core (the process is pinned to one CPU, BLAS single-threaded), for
a synthetic scene of 10 walkers (exactly 10 detections per frame, 15% of them low-score); frames per second
of CPU time (the target's measure; the wall-clock rate is printed too, lower when other work shares the core).

Needs `pip install -e '.[bench]'` (motmetrics, trackeval and the peers). Prints tables and ends with
`RESULT {json}`.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: BLAS must not spread small products over threads

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from graphflow.vision.mot import MotTable, read_mot, write_mot  # noqa: E402
from graphflow.vision.tracking import ByteTracker, IoUTracker, iou_matrix  # noqa: E402

log = logging.getLogger(__name__)

if not hasattr(np, "asfarray"):  # motmetrics 1.4.0 calls np.asfarray, removed in NumPy 2
    np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)

import motmetrics as mm  # noqa: E402

SEQUENCES = ("TUD-Campus", "TUD-Stadtmitte")
FPS = 25  # TUD sequences
MM_METRICS = ("mota", "idf1", "num_switches", "num_false_positives", "num_misses")
SCORES = ("mota", "idf1", "hota")  # the ones the targets compare
TARGET_FPS = 5000
# a tracker: a fresh instance's per-frame function (boxes xyxy, scores) -> (ids, boxes xyxy)
Step = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- detections and scenes

def noisy(gt: MotTable, rng: np.random.Generator, drop: float = 0.10, jitter: float = 0.04, low: float = 0.15,
          fp_rate: float = 0.3) -> MotTable:
    """Detections derived from ground truth: misses, jittered boxes, scores (some low) and false positives."""
    keep = rng.random(len(gt)) >= drop
    frames, boxes = gt.frames[keep], gt.boxes[keep]
    size = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.normal(0, jitter, size.shape) * size
    size = size * np.exp(rng.normal(0, jitter, size.shape))
    scores = np.where(rng.random(len(frames)) < low, rng.uniform(0.15, 0.5, len(frames)), rng.uniform(0.5, 1.0, len(frames)))
    n_fp = rng.poisson(fp_rate, gt.last_frame)
    fp_frames = np.repeat(np.arange(1, gt.last_frame + 1), n_fp)
    fp_size = size[rng.integers(0, len(size), len(fp_frames))] if len(size) else np.zeros((0, 2))
    lo, hi = gt.boxes[:, :2].min(0), gt.boxes[:, 2:].max(0)
    fp_centre = rng.uniform(lo, hi, (len(fp_frames), 2))
    frames = np.concatenate([frames, fp_frames])
    centre, size = np.concatenate([centre, fp_centre]), np.concatenate([size, fp_size])
    scores = np.concatenate([scores, rng.uniform(0.1, 0.6, len(fp_frames))])
    order = np.argsort(frames, kind="stable")
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    return MotTable(frames[order], np.full(len(frames), -1), boxes[order], np.round(scores[order], 3))


def walkers(n: int, frames: int, size: tuple[int, int], rng: np.random.Generator) -> MotTable:
    """Ground truth of `n` people walking at constant speed (with a little wander) and bouncing off the
    borders of a `size` = (w, h) frame; they cross each other, so ids are at stake."""
    w, h = size
    dims = np.stack([rng.uniform(30, 50, n), rng.uniform(80, 120, n)], axis=1)
    pos = rng.uniform([0, 0], [w, h], (n, 2)) * 0.8 + dims
    vel = rng.uniform(1.5, 4, (n, 1)) * np.stack([np.cos(a := rng.uniform(0, 2 * np.pi, n)), np.sin(a)], axis=1)
    rows = []
    for f in range(1, frames + 1):
        vel += rng.normal(0, 0.1, vel.shape)
        pos += vel
        low, high = dims / 2, np.array([w, h]) - dims / 2
        vel = np.where((pos < low) | (pos > high), -vel, vel)
        pos = np.clip(pos, low, high)
        rows.append(np.concatenate([np.full((n, 1), f), np.arange(1, n + 1)[:, None], pos - dims / 2, pos + dims / 2], 1))
    arr = np.concatenate(rows)
    return MotTable(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2:6], np.ones(len(arr)))


# ---------------------------------------------------------------- the trackers

def graphflow_step(cls: type, **params: Any) -> Step:
    """One of graphflow's trackers (all detections class 0)."""
    tracker = cls(**params)

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = tracker.update(boxes, scores, np.zeros(len(boxes), np.int64))
        return out.ids, out.boxes
    return step


def boxmot_step(kind: str, **params: Any) -> Step:
    """A BoxMOT tracker fed (N, 6) arrays x1, y1, x2, y2, score, class; it answers x1, y1, x2, y2, id, ..."""
    import boxmot
    cls = getattr(boxmot, kind)
    logging.getLogger("boxmot").setLevel(logging.WARNING)  # it logs its settings at INFO on every construction
    extra = {"use_embeddings": False, "use_cmc": False, "reid_weights": None} if kind == "BotSort" else {}
    if "frame_rate" in inspect.signature(cls.__init__).parameters:  # (OC-SORT has none)
        extra["frame_rate"] = FPS
    tracker = cls(**extra, **params)

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dets = np.concatenate([boxes, scores[:, None], np.zeros((len(boxes), 1))], axis=1).astype(np.float32)
        out = tracker.update(dets.reshape(-1, 6), None)
        return out[:, 4], out[:, :4]
    return step


def roboflow_step(kind: str, **params: Any) -> Step:
    """A tracker of Roboflow's `trackers` package fed supervision Detections (unconfirmed tracks come back
    with id -1 and are not shown)."""
    import supervision as sv
    import trackers
    extra = {"enable_cmc": False} if kind == "BoTSORTTracker" else {}
    tracker = getattr(trackers, kind)(frame_rate=FPS, **extra, **params)

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dets = sv.Detections(xyxy=boxes.astype(np.float32).reshape(-1, 4), confidence=scores.astype(np.float32),
                             class_id=np.zeros(len(boxes), int))
        out = tracker.update(dets)
        shown = out.tracker_id >= 0
        return out.tracker_id[shown], out.xyxy[shown]
    return step


def supervision_step(**params: Any) -> Step:
    """supervision's own ByteTrack (`sv.ByteTrack`, supervision < 0.31)."""
    import supervision as sv
    tracker = sv.ByteTrack(frame_rate=FPS, **params)

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dets = sv.Detections(xyxy=boxes.astype(np.float32).reshape(-1, 4), confidence=scores.astype(np.float32),
                             class_id=np.zeros(len(boxes), int))
        out = tracker.update_with_detections(dets)
        return out.tracker_id, out.xyxy
    return step


def norfair_step(**params: Any) -> Step:
    """norfair with boxes as two points (corners), IoU distance; it reports its initialised objects' estimates."""
    import norfair
    params = {"distance_function": "iou", "distance_threshold": 0.7, **params}
    tracker = norfair.Tracker(**params)

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dets = [norfair.Detection(b.reshape(2, 2), scores=np.array([s, s])) for b, s in zip(boxes, scores)]
        objs = tracker.update(dets)
        return (np.array([o.id for o in objs], np.int64),
                np.array([o.estimate.reshape(4) for o in objs], np.float64).reshape(-1, 4))
    return step


@dataclass
class Tracker:
    """A tracker under test: how to make one with given parameters, and the ten settings of its sweep."""

    name: str
    package: str  # the module it needs ("" for graphflow's)
    make: Callable[..., Step]
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def available(self) -> bool:
        if not self.package:
            return True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(self.package)
                if self.name == "supervision-bytetrack":
                    import supervision as sv
                    sv.ByteTrack  # noqa: B018 (removed in supervision 0.31)
        except (ImportError, AttributeError):
            return False
        return True


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values (the default settings are one of the ten where possible)."""
    out: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        out = [{**o, key: v} for o in out for v in values]
    return out


def partial(fn: Callable[..., Step], *args: Any) -> Callable[..., Step]:
    return lambda **params: fn(*args, **params)


# Each sweep: the tracker's own start-threshold and its count of hits before a track is shown (or the closest
# knobs it has), 3 x 3, plus one setting of its match threshold; graphflow's: coast (frames a lost track is
# still reported) with hits or smoothing, and its thresholds one at a time. The defaults are among the ten.
TRACKERS = [
    Tracker("graphflow-iou", "", partial(graphflow_step, IoUTracker),
            grid(min_hits=[1, 2], coast=[0, 1, 2]) + [{"track_thresh": v} for v in (0.3, 0.4, 0.6)]
            + [{"match_thresh": 0.7}]),
    Tracker("graphflow-bytetrack", "", partial(graphflow_step, ByteTracker),
            grid(smooth=[False, True], coast=[0, 1, 2]) + [{"min_hits": 1}, {"min_hits": 1, "smooth": True},
                                                           {"track_thresh": 0.4}, {"new_track_thresh": 0.6}]),
    Tracker("boxmot-bytetrack", "boxmot", partial(boxmot_step, "ByteTrack"),
            grid(track_thresh=[0.35, 0.45, 0.55], match_thresh=[0.7, 0.8, 0.9]) + [{"track_buffer": 50}]),
    Tracker("boxmot-ocsort", "boxmot", partial(boxmot_step, "OcSort"),
            grid(det_thresh=[0.2, 0.3, 0.4], min_hits=[1, 2, 3]) + [{"iou_threshold": 0.2}]),
    Tracker("boxmot-botsort", "boxmot", partial(boxmot_step, "BotSort"),
            grid(new_track_thresh=[0.5, 0.6, 0.7], match_thresh=[0.7, 0.8, 0.9]) + [{"track_high_thresh": 0.4}]),
    Tracker("trackers-sort", "trackers", partial(roboflow_step, "SORTTracker"),
            grid(track_activation_threshold=[0.25, 0.4, 0.55], minimum_consecutive_frames=[1, 2, 3])
            + [{"minimum_iou_threshold": 0.2}]),
    Tracker("trackers-bytetrack", "trackers", partial(roboflow_step, "ByteTrackTracker"),
            grid(track_activation_threshold=[0.5, 0.6, 0.7], minimum_consecutive_frames=[1, 2, 3])
            + [{"minimum_iou_threshold": 0.2}]),
    Tracker("trackers-ocsort", "trackers", partial(roboflow_step, "OCSORTTracker"),
            grid(high_conf_det_threshold=[0.4, 0.5, 0.6], minimum_consecutive_frames=[1, 2, 3])
            + [{"minimum_iou_threshold": 0.2}]),
    Tracker("trackers-botsort", "trackers", partial(roboflow_step, "BoTSORTTracker"),
            grid(track_activation_threshold=[0.5, 0.6, 0.7], minimum_consecutive_frames=[1, 2, 3])
            + [{"minimum_iou_threshold_first_assoc": 0.3}]),
    Tracker("trackers-cbiou", "trackers", partial(roboflow_step, "CBIoUTracker"),
            grid(track_activation_threshold=[0.5, 0.6, 0.7], minimum_consecutive_frames=[1, 2, 3])
            + [{"buffer_ratio_first": 0.5}]),
    Tracker("supervision-bytetrack", "supervision", supervision_step,
            grid(track_activation_threshold=[0.15, 0.25, 0.35], minimum_consecutive_frames=[1, 2, 3])
            + [{"minimum_matching_threshold": 0.7}]),
    Tracker("norfair", "norfair", norfair_step,
            grid(distance_threshold=[0.6, 0.7, 0.8], initialization_delay=[1, 3, 7]) + [{"hit_counter_max": 30}]),
]


# ---------------------------------------------------------------- scoring

def run(step: Step, dets: MotTable) -> MotTable:
    """Track a detection table frame by frame; the result as a MotTable."""
    out = []
    for frame, rows in dets.per_frame():
        ids, boxes = step(dets.boxes[rows], dets.conf[rows])
        out.append((np.full(len(ids), frame), np.asarray(ids), np.asarray(boxes, np.float64).reshape(-1, 4)))
    frames, ids, boxes = (np.concatenate(c) for c in zip(*out))
    return MotTable(frames.astype(np.int64), ids.astype(np.int64), boxes, np.ones(len(frames)))


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def accumulate(gt: MotTable, hyp: MotTable) -> mm.MOTAccumulator:
    """motmetrics events of one sequence, IoU ≥ 0.5 to match (MOTChallenge's rule)."""
    acc = mm.MOTAccumulator(auto_id=True)
    hyp_rows = dict(hyp.per_frame(gt.last_frame))
    for frame, rows in gt.per_frame():
        hr = hyp_rows[frame]
        dist = mm.distances.iou_matrix(_xywh(gt.boxes[rows]), _xywh(hyp.boxes[hr]), max_iou=0.5)
        acc.update(gt.ids[rows].tolist(), hyp.ids[hr].tolist(), dist)
    return acc


def hota_data(gt: MotTable, hyp: MotTable) -> dict[str, Any]:
    """One sequence in the form TrackEval's metrics take (ids 0..n-1 per side, IoU per frame), as its
    MOTChallenge loader builds it for ground truth with no distractor classes (TUD's rows are all pedestrians)."""
    gt_ids, gt_idx = np.unique(gt.ids, return_inverse=True)
    hyp_ids, hyp_idx = np.unique(hyp.ids, return_inverse=True)
    hyp_rows = dict(hyp.per_frame(gt.last_frame))
    data: dict[str, Any] = {"gt_ids": [], "tracker_ids": [], "similarity_scores": [], "num_gt_ids": len(gt_ids),
                            "num_tracker_ids": len(hyp_ids), "num_gt_dets": len(gt), "num_tracker_dets": len(hyp),
                            "num_timesteps": gt.last_frame}
    for _frame, rows in gt.per_frame():
        hr = hyp_rows[_frame]
        data["gt_ids"].append(gt_idx[rows])
        data["tracker_ids"].append(hyp_idx[hr])
        data["similarity_scores"].append(iou_matrix(gt.boxes[rows], hyp.boxes[hr]))
    return data


class Scorer:
    """Runs trackers on the detection files of every (sequence, seed) and scores them per sequence."""

    def __init__(self, seeds: list[int], tmp: Path) -> None:
        import trackeval
        self.hota = trackeval.metrics.HOTA()
        self.mh = mm.metrics.create()
        data = Path(mm.__file__).parent / "data"
        self.cases: dict[str, list[tuple[MotTable, MotTable]]] = {}
        for seq in SEQUENCES:
            gt = read_mot(data / seq / "gt.txt")
            self.cases[seq] = []
            for seed in seeds:
                path = tmp / f"{seq}-{seed}.det.txt"
                write_mot(path, noisy(gt, np.random.default_rng(seed)))
                self.cases[seq].append((gt, read_mot(path)))

    def score(self, make: Callable[[], Step]) -> dict[str, dict[str, float]]:
        """{sequence: metrics pooled over seeds} for fresh trackers from `make`."""
        out = {}
        for seq, cases in self.cases.items():
            accs, hotas = [], {}
            for i, (gt, dets) in enumerate(cases):
                hyp = run(make(), dets)
                accs.append(accumulate(gt, hyp))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hotas[str(i)] = self.hota.eval_sequence(hota_data(gt, hyp))
            table = self.mh.compute_many(accs, metrics=list(MM_METRICS), names=[str(i) for i in range(len(accs))],
                                         generate_overall=True)
            m = {k: float(table.loc["OVERALL", k]) for k in MM_METRICS}
            m["hota"] = float(np.mean(self.hota.combine_sequences(hotas)["HOTA"]))
            out[seq] = m
        return out


def check_hota() -> None:
    """HOTA as this bench computes it (`hota_data`) against TrackEval's whole MOTChallenge pipeline (files in its
    folder layout, its loader and preprocessing), on the tracker results motmetrics ships (test.txt)."""
    import shutil

    import trackeval
    data = Path(mm.__file__).parent / "data"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "seqmaps").mkdir()
        (root / "seqmaps" / "MOT15-train.txt").write_text("name\n" + "\n".join(SEQUENCES) + "\n")
        for seq in SEQUENCES:
            gt_dir = root / "gt" / "MOT15-train" / seq / "gt"
            gt_dir.mkdir(parents=True)
            shutil.copy(data / seq / "gt.txt", gt_dir / "gt.txt")
            length = read_mot(data / seq / "gt.txt").last_frame
            (gt_dir.parent / "seqinfo.ini").write_text(f"[Sequence]\nname={seq}\nseqLength={length}\n")
            res_dir = root / "trackers" / "MOT15-train" / "shipped" / "data"
            res_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(data / seq / "test.txt", res_dir / f"{seq}.txt")
        config = {**trackeval.Evaluator.get_default_eval_config(), "PRINT_RESULTS": False, "PRINT_CONFIG": False,
                  "OUTPUT_SUMMARY": False, "OUTPUT_DETAILED": False, "PLOT_CURVES": False, "TIME_PROGRESS": False}
        dataset = {**trackeval.datasets.MotChallenge2DBox.get_default_dataset_config(), "GT_FOLDER": str(root / "gt"),
                   "TRACKERS_FOLDER": str(root / "trackers"), "BENCHMARK": "MOT15", "SPLIT_TO_EVAL": "train",
                   "SEQMAP_FOLDER": str(root / "seqmaps"), "TRACKERS_TO_EVAL": ["shipped"], "PRINT_CONFIG": False}
        results, _ = trackeval.Evaluator(config).evaluate([trackeval.datasets.MotChallenge2DBox(dataset)],
                                                          [trackeval.metrics.HOTA()])
    theirs = results["MotChallenge2DBox"]["shipped"]
    hota = trackeval.metrics.HOTA()
    for seq in SEQUENCES:
        ours = np.mean(hota.eval_sequence(hota_data(read_mot(data / seq / "gt.txt"), read_mot(data / seq / "test.txt")))["HOTA"])
        ref = np.mean(theirs[seq]["pedestrian"]["HOTA"]["HOTA"])
        print(f"{seq}: HOTA {ours:.6f} here, {ref:.6f} by TrackEval's MOTChallenge pipeline"
              + ("" if abs(ours - ref) < 1e-9 else "  MISMATCH"))


# ---------------------------------------------------------------- speed

def throughput(make: Callable[[], Step], frames: int, repeats: int) -> tuple[float, float]:
    """Frames per second of a tracker's update alone on the 10-walker scene, best of `repeats`: per second of
    CPU time of this (single-core) process, and per second of wall time (lower when the machine is shared)."""
    rng = np.random.default_rng(7)
    gt = walkers(10, frames, (1280, 720), rng)
    dets = noisy(gt, rng, drop=0.0, fp_rate=0.0)
    per_frame = [(dets.boxes[rows].copy(), dets.conf[rows].copy()) for _, rows in dets.per_frame()]
    cpu = wall = 0.0
    for _ in range(repeats):
        step = make()
        c0, w0 = time.process_time(), time.perf_counter()
        for boxes, scores in per_frame:
            step(boxes, scores)
        cpu = max(cpu, len(per_frame) / max(time.process_time() - c0, 1e-9))
        wall = max(wall, len(per_frame) / (time.perf_counter() - w0))
    return cpu, wall


def write_walkers(folder: Path) -> None:
    """The small example scene of graphs/mot_eval.json: ground truth and noisy detections, 6 walkers, 240 frames."""
    rng = np.random.default_rng(2024)
    gt = walkers(6, 240, (640, 480), rng)
    write_mot(folder / "walkers_gt.txt", gt)
    write_mot(folder / "walkers_det.txt", noisy(gt, rng))
    print(f"wrote {folder / 'walkers_gt.txt'} and {folder / 'walkers_det.txt'}")


# ---------------------------------------------------------------- the comparison

def parse_seeds(text: str) -> list[int]:
    """`--seeds`: a count N (seeds 0..N-1) or an inclusive range A-B."""
    try:
        lo, _, hi = text.partition("-")
        seeds = list(range(int(lo), int(hi) + 1)) if hi else list(range(int(lo)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected a count like 10 or a range like 100-109 (got {text!r})") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds: no seeds in {text!r}")
    return seeds


def cross_validated(results: list[dict[str, dict[str, float]]]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """For each sequence, the metrics there of the setting with the best HOTA on the other sequence, and
    which setting (index into the sweep) that was."""
    out, chosen = {}, {}
    for seq in SEQUENCES:
        (other,) = [s for s in SEQUENCES if s != seq]
        best = max(range(len(results)), key=lambda i: results[i][other]["hota"])
        out[seq], chosen[seq] = results[best][seq], best
    return out, chosen


def leads(scores: dict[str, dict[str, dict[str, float]]], ours: list[str], peers: list[str]) -> dict[str, Any]:
    """Whether one of our trackers is at or above every peer on MOTA, IDF1 and HOTA on every sequence."""
    best_peer = {seq: {k: max((scores[p][seq][k] for p in peers), default=float("nan")) for k in SCORES}
                 for seq in SEQUENCES}
    meets = {name: all(scores[name][seq][k] >= best_peer[seq][k] - 1e-12 for seq in SEQUENCES for k in SCORES)
             for name in ours}
    return {"best_peer": {s: {k: round(v, 4) for k, v in m.items()} for s, m in best_peer.items()},
            "ours_at_or_above": meets, "met": bool(peers) and any(meets.values())}


def print_table(title: str, scores: dict[str, dict[str, dict[str, float]]],
                speed: dict[str, tuple[float, float]] | None = None) -> None:
    print(f"\n{title}")
    print(f"{'tracker':<22} {'sequence':<15} {'MOTA':>6} {'IDF1':>6} {'HOTA':>6} {'IDsw':>5} {'FP':>6} {'FN':>6}"
          + (f" {'fps(cpu)':>9} {'fps(wall)':>9}" if speed else ""))
    for name, per_seq in scores.items():
        for i, (seq, m) in enumerate(per_seq.items()):
            row = (f"{name:<22} {seq:<15} {m['mota']:>6.3f} {m['idf1']:>6.3f} {m['hota']:>6.3f} "
                   f"{m['num_switches']:>5.0f} {m['num_false_positives']:>6.0f} {m['num_misses']:>6.0f}")
            if speed and i == 0:
                row += f" {speed[name][0]:>9.0f} {speed[name][1]:>9.0f}"
            print(row)


def rounded(scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    keys = {"mota": "mota", "idf1": "idf1", "hota": "hota", "num_switches": "id_switches",
            "num_false_positives": "fp", "num_misses": "fn"}
    return {name: {seq: {short: (round(m[k], 4) if k in SCORES else int(m[k])) for k, short in keys.items()}
                   for seq, m in per_seq.items()} for name, per_seq in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, no sweep, shorter speed runs")
    ap.add_argument("--seeds", type=parse_seeds, default=list(range(10)),
                    help="detection noise seeds: a count N (0..N-1, default 10) or a range A-B (for tuning)")
    ap.add_argument("--no-sweep", action="store_true", help="defaults only")
    ap.add_argument("--only", help="comma-separated tracker names (default: all that are installed)")
    ap.add_argument("--write-walkers", metavar="DIR", help="write the example scene's gt/det files to DIR and exit")
    ap.add_argument("--check-hota", action="store_true",
                    help="compare this bench's HOTA with TrackEval's MOTChallenge pipeline on motmetrics' test.txt and exit")
    args = ap.parse_args()
    if args.write_walkers:
        write_walkers(Path(args.write_walkers))
        return
    if args.check_hota:
        check_hota()
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    warnings.filterwarnings("ignore")  # the peers' deprecation notices
    seeds = list(range(3)) if args.quick else args.seeds
    wanted = set(args.only.split(",")) if args.only else None
    chosen = [t for t in TRACKERS if wanted is None or t.name in wanted]
    missing = [t.name for t in chosen if not t.available()]
    for name in missing:
        print(f"{name}: package not installed (pip install -e '.[bench]'): left out", file=sys.stderr)
    trackers = [t for t in chosen if t.name not in missing]
    names = [t.name for t in trackers]
    ours = [n for n in names if n.startswith("graphflow-")]
    peers = [n for n in names if n not in ours]

    with tempfile.TemporaryDirectory() as tmp:
        scorer = Scorer(seeds, Path(tmp))
        defaults = {t.name: scorer.score(t.make) for t in trackers}
        swept, settings = {}, {}
        if not (args.quick or args.no_sweep):
            for t in trackers:
                results = [scorer.score(lambda p=p, t=t: t.make(**p)) for p in t.sweep]
                swept[t.name], which = cross_validated(results)
                settings[t.name] = {seq: t.sweep[i] for seq, i in which.items()}
    frames, repeats = (300, 3) if args.quick else (500, 7)  # best of several short runs: the machine may be shared
    speed = {t.name: throughput(t.make, frames, repeats) for t in trackers}

    print_table(f"Default parameters (seeds {seeds[0]}-{seeds[-1]}, metrics pooled over seeds)", defaults, speed)
    result: dict[str, Any] = {
        "sequences": list(SEQUENCES), "seeds": seeds, "left_out": missing,
        "defaults": rounded(defaults), "defaults_targets": leads(defaults, ours, peers),
        "fps_10_objects": {n: round(cpu) for n, (cpu, _) in speed.items()},
        "fps_10_objects_wall": {n: round(wall) for n, (_, wall) in speed.items()},
        f"fps_ge_{TARGET_FPS}": {n: speed[n][0] >= TARGET_FPS for n in ours}}
    if swept:
        print_table("Sweep, cross-validated: each sequence scored with the setting best (HOTA) on the other", swept)
        for name, per_seq in settings.items():
            print(f"  {name:<22} " + "; ".join(f"{seq}: {p or 'defaults'}" for seq, p in per_seq.items()))
        result.update(swept=rounded(swept), swept_settings=settings, swept_targets=leads(swept, ours, peers))
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
