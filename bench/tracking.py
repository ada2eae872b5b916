"""Tracker accuracy (motmetrics: MOTA, IDF1, ID switches, FP, FN) and tracker-only speed: graphflow's `iou` and
`bytetrack` against the SORT and ByteTrack of Roboflow's `trackers` package (the trackers formerly in
`supervision`), run on the same detections in the same run.

Usage: python bench/tracking.py [--quick] [--seeds 10 | --seeds 100-109] [--write-walkers DIR]

Ground truth: TUD-Campus and TUD-Stadtmitte (MOTChallenge format, shipped inside the motmetrics package).
They carry no detections, so detections are derived from the ground truth with fixed seeds (see `noisy`):
each box is missed with p=0.10, its centre jittered by N(0, 4% of w/h) and its size by a factor exp(N(0, 0.04));
15% of the kept boxes get a low score U(0.15, 0.5) (as occluded people do), the others U(0.5, 1.0); plus
Poisson(0.3) false positives per frame with scores U(0.1, 0.6). Every seed gives one detection file per
sequence, written in MOTChallenge format and read back with graphflow.vision.mot (the `detfile` engine's
parser); all trackers see the same detections and run with their default parameters (the `trackers` ones
with the sequences' frame rate). Results are pooled over seeds and sequences (motmetrics' OVERALL).
Seeds 0-9 are the reported ones; tracker changes are tuned on other seeds (e.g. `--seeds 100-109`) so that the
reported figures are not fitted to their own noise.
OC-SORT of the same package is left out: with its defaults (3 consecutive high-score hits before a track is
shown, scores ≥ 0.6) it reports few tracks on these detections (MOTA ≈ 0.2), which says little.

Speed: tracker `update` calls only, on one core (the process is pinned to one CPU, BLAS single-threaded), for
a synthetic scene of 10 walkers (exactly 10 detections per frame, 15% of them low-score); frames per second
of CPU time (the target's measure; the wall-clock rate is printed too, lower when other work shares the core).

Needs `pip install trackers` (Roboflow; pulls supervision and opencv-python) for the comparison trackers.
Prints a table and ends with `RESULT {json}`.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: BLAS must not spread small products over threads

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from graphflow.vision.mot import MotTable, read_mot, write_mot  # noqa: E402
from graphflow.vision.tracking import ByteTracker, IoUTracker  # noqa: E402

log = logging.getLogger(__name__)

if not hasattr(np, "asfarray"):  # motmetrics 1.4.0 calls np.asfarray, removed in NumPy 2
    np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)

import motmetrics as mm  # noqa: E402

SEQUENCES = ("TUD-Campus", "TUD-Stadtmitte")
FPS = 25.0  # TUD sequences
METRICS = ("mota", "idf1", "num_switches", "num_false_positives", "num_misses")
TARGET_FPS = 5000
# a tracker: a fresh instance's per-frame function (boxes xyxy, scores) -> (ids, boxes xyxy)
Step = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


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


def ours(kind: str) -> Step:
    """One of graphflow's trackers with its default parameters (all detections class 0)."""
    tracker = IoUTracker() if kind == "iou" else ByteTracker()

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = tracker.update(boxes, scores, np.zeros(len(boxes), np.int64))
        return out.ids, out.boxes
    return step


def theirs(kind: str) -> Step:
    """A tracker of the `trackers` package (defaults, frame rate set), fed supervision Detections."""
    import supervision as sv
    import trackers
    cls = {"sort": trackers.SORTTracker, "bytetrack": trackers.ByteTrackTracker}[kind]
    tracker = cls(frame_rate=FPS)

    def step(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dets = sv.Detections(xyxy=boxes.astype(np.float32).reshape(-1, 4), confidence=scores.astype(np.float32),
                             class_id=np.zeros(len(boxes), int))
        out = tracker.update(dets)
        shown = out.tracker_id >= 0
        return out.tracker_id[shown], out.xyxy[shown]
    return step


def trackers_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import trackers  # noqa: F401
    except ImportError:
        return False
    return True


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


def accuracy(names: list[str], makers: dict[str, Callable[[], Step]], seeds: list[int], tmp: Path) -> dict[str, dict]:
    """Metrics per tracker, pooled over sequences and seeds, plus per-sequence rows."""
    data = Path(mm.__file__).parent / "data"
    accs: dict[str, list] = {name: [] for name in names}
    per_seq: dict[str, dict[str, list]] = {name: {s: [] for s in SEQUENCES} for name in names}
    for seq in SEQUENCES:
        gt = read_mot(data / seq / "gt.txt")
        for seed in seeds:
            path = tmp / f"{seq}-{seed}.det.txt"
            write_mot(path, noisy(gt, np.random.default_rng(seed)))
            dets = read_mot(path)
            for name in names:
                acc = accumulate(gt, run(makers[name](), dets))
                accs[name].append(acc)
                per_seq[name][seq].append(acc)
    mh = mm.metrics.create()

    def pooled(group: list) -> dict[str, float]:
        """Metrics of several accumulators taken together (motmetrics' OVERALL row)."""
        table = mh.compute_many(group, metrics=list(METRICS), names=[str(i) for i in range(len(group))],
                                generate_overall=True)
        return {m: float(table.loc["OVERALL", m]) for m in METRICS}

    return {name: {"overall": pooled(accs[name]), **{seq: pooled(per_seq[name][seq]) for seq in SEQUENCES}}
            for name in names}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, shorter speed runs (< 30 s)")
    ap.add_argument("--seeds", type=parse_seeds, default=list(range(10)),
                    help="detection noise seeds: a count N (0..N-1, default 10) or a range A-B (for tuning)")
    ap.add_argument("--write-walkers", metavar="DIR", help="write the example scene's gt/det files to DIR and exit")
    args = ap.parse_args()
    if args.write_walkers:
        write_walkers(Path(args.write_walkers))
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    seeds = list(range(3)) if args.quick else args.seeds
    makers: dict[str, Callable[[], Step]] = {"graphflow-iou": lambda: ours("iou"),
                                             "graphflow-bytetrack": lambda: ours("bytetrack")}
    theirs_names = []
    if trackers_available():
        warnings.filterwarnings("ignore", module="supervision")
        for kind in ("sort", "bytetrack"):
            makers[f"trackers-{kind}"] = lambda kind=kind: theirs(kind)
            theirs_names.append(f"trackers-{kind}")
    else:
        print("trackers package not installed (pip install trackers): no comparison trackers", file=sys.stderr)
    names = list(makers)
    with tempfile.TemporaryDirectory() as tmp:
        acc = accuracy(names, makers, seeds, Path(tmp))
    frames, repeats = (300, 6) if args.quick else (500, 15)  # best of many short runs: the machine may be shared
    speed = {name: throughput(makers[name], frames, repeats) for name in names}
    fps = {name: cpu for name, (cpu, _) in speed.items()}

    print(f"{'tracker':<22} {'sequence':<15} {'MOTA':>6} {'IDF1':>6} {'IDsw':>5} {'FP':>6} {'FN':>6} "
          f"{'fps(cpu)':>9} {'fps(wall)':>9}")
    for name in names:
        for seq, m in acc[name].items():
            row_speed = f"{speed[name][0]:>9.0f} {speed[name][1]:>9.0f}" if seq == "overall" else ""
            print(f"{name:<22} {seq:<15} {m['mota']:>6.3f} {m['idf1']:>6.3f} {m['num_switches']:>5.0f} "
                  f"{m['num_false_positives']:>6.0f} {m['num_misses']:>6.0f} {row_speed}")
    overall = {name: {"mota": round(acc[name]["overall"]["mota"], 4), "idf1": round(acc[name]["overall"]["idf1"], 4),
                      "id_switches": int(acc[name]["overall"]["num_switches"]),
                      "fp": int(acc[name]["overall"]["num_false_positives"]),
                      "fn": int(acc[name]["overall"]["num_misses"]), "fps_10_objects": round(fps[name]),
                      "fps_10_objects_wall": round(speed[name][1])}
               for name in names}
    best = {k: max((overall[n][k] for n in theirs_names), default=None) for k in ("mota", "idf1")}
    ours_bt = overall["graphflow-bytetrack"]
    targets = {"idf1_ge_best_comparison": best["idf1"] is not None and ours_bt["idf1"] >= best["idf1"],
               "mota_ge_best_comparison": best["mota"] is not None and ours_bt["mota"] >= best["mota"],
               f"fps_ge_{TARGET_FPS}": ours_bt["fps_10_objects"] >= TARGET_FPS}
    print("RESULT " + json.dumps({"sequences": list(SEQUENCES), "seeds": seeds, "trackers": overall,
                                  "best_comparison": best, "targets": targets}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
