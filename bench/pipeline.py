"""Throughput of the demo graph on N copies of the demo video, against the plain Python loop a user would write.

Usage: python bench/pipeline.py [--streams 4] [--quick]
Runs, in one process: the naive loop (streams one after another, same vision functions as the engines), the demo
graph with infer placed in a process, and the demo graph with every engine a thread. Prints tables and a final
`RESULT {json}` line. Video files are decoded as fast as possible, so latencies include queueing behind that backlog.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # noqa: F401  imported before any timing so that no in-process variant pays for it

from graphflow import graph
from graphflow import runtime
from graphflow.media.backends import make_backend
from graphflow.vision.detect import DetectParams, postprocess
from graphflow.vision.letterbox import LetterboxSpec, letterbox
from graphflow.media.models import resolve_model
from graphflow.vision.rules import RuleSet
from graphflow.vision.tracking import follow, make_tracker
from graphflow.media.video import SourceSpec
from graphflow.media.sources import open_source

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "graphs" / "demo.json"
VIDEO = ROOT / "graphs" / "data" / "demo.mp4"
FPS = 10
QUICK_FRAMES = 15
NAIVE_STAGES = ("decode", "preprocess", "infer", "track", "rule")


@dataclass
class Outcome:
    """One variant's result: frames through, wall and CPU seconds, per-stage stats and frame latencies."""

    name: str
    frames: int
    wall_s: float
    cpu_s: float
    span_s: float
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0

    @property
    def span_fps(self) -> float:
        """Frames per second from the first frame's capture to the last frame done: start-up left out."""
        return self.frames / self.span_s if self.span_s else 0.0

    def percentile(self, q: int) -> float | None:
        """The q-th percentile of per-frame latency in ms, None when no latencies were recorded."""
        return float(np.percentile(self.latency_ms, q)) if self.latency_ms else None


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (process-placed engines)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Call `fn`; return its result, the wall seconds and the CPU seconds (children included) it took."""
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall0, cpu_seconds() - cpu0


def source_specs(streams: int, max_frames: int | None) -> list[dict]:
    """`streams` decode sources over the demo video, distinct ids, the demo's frame rate."""
    return [{"id": f"cam{i + 1}", "uri": str(VIDEO), "fps": FPS, "max_frames": max_frames} for i in range(streams)]


def demo_doc(streams: int, max_frames: int | None, infer_placement: str, sink: Path) -> dict:
    """graphs/demo.json with N sources, infer's placement set, and the sink writing to `sink`."""
    doc = json.loads(DEMO.read_text())
    doc["engines"]["src"]["params"]["sources"] = source_specs(streams, max_frames)
    doc["engines"]["det"]["placement"] = infer_placement
    doc["engines"]["out"]["params"]["sinks"] = [{"kind": "jsonl", "path": str(sink)}]  # the naive loop writes no video
    return doc


def run_graph(streams: int, max_frames: int | None, infer_placement: str) -> Outcome:
    """Run the demo graph; per-engine stats from the Summary, latency capture → last stamp from the sink's lines."""
    with tempfile.TemporaryDirectory() as tmp:
        sink = Path(tmp) / "out.jsonl"
        g = graph.build(demo_doc(streams, max_frames, infer_placement, sink), "pipeline")
        summary, _, cpu_s = measured(lambda: runtime.run(g, handle_signals=False))
        if summary.failed:
            raise SystemExit(f"pipeline ({infer_placement}) failed: {'; '.join(summary.errors)}")
        records = [json.loads(line) for line in sink.read_text().splitlines()]
    latency = [(max(r["times"].values()) - r["times"]["capture"]) * 1e3 for r in records]
    span_s = max(max(r["times"].values()) for r in records) - min(r["times"]["capture"] for r in records)
    stages = {name: {"msgs": s["received"], "sent": s["sent"], "busy_s": engine_seconds(s, span_s),
                     "runtime_cpu_s": s.get("runtime_cpu_s", 0.0)} for name, s in summary.stats.items()}
    return Outcome(f"graphflow infer={infer_placement}", len(records), summary.wall_s, cpu_s, span_s, stages,
                   latency)


def engine_seconds(stats: dict[str, Any], span_s: float) -> float:
    """Time an engine spent working: its busy_s, or for infer (whose model runs on worker threads while
    process() only queues) the model's busy fraction over the run."""
    busy_fraction = stats.get("metrics", {}).get("busy_fraction")
    return busy_fraction * span_s if busy_fraction is not None else stats["busy_s"]


def naive_loop(streams: int, max_frames: int | None) -> Outcome:
    """The loop a user would write: each stream in turn, decode → letterbox → onnxruntime → decode/NMS → track → rules."""
    doc = json.loads(DEMO.read_text())["engines"]
    det_params = doc["det"]["params"]
    busy = dict.fromkeys(NAIVE_STAGES, 0.0)
    frames = 0
    latency: list[float] = []
    ends: list[float] = []
    starts: list[float] = []

    def work() -> None:
        nonlocal frames
        model = resolve_model(det_params["model"])
        runner = make_backend("auto")
        runner.load(model.path)
        box = LetterboxSpec(size=tuple(doc["pre"]["params"]["size"]))
        detect = DetectParams(conf=det_params["conf"])
        rules = RuleSet(doc["zone"]["params"]["rules"])
        for src in source_specs(streams, max_frames):
            stream = src.pop("id")
            tracker = make_tracker(doc["trk"]["params"]["algorithm"])
            source = open_source(SourceSpec(**src))
            try:
                t = time.perf_counter()
                for frame in source:
                    t = stamp(busy, "decode", t)
                    height, width = frame.image.shape[:2]
                    tensor, info = letterbox(frame.image, box)
                    t = stamp(busy, "preprocess", t)
                    detections = postprocess(runner.infer(tensor[None])[0], model.output_format, info, (width, height),
                                             model.labels, detect)
                    t = stamp(busy, "infer", t)
                    tracks = follow(tracker, detections)
                    t = stamp(busy, "track", t)
                    rules.evaluate(stream, frame.index, frame.pts, tracks, width, height)
                    t = stamp(busy, "rule", t)
                    ends.append(time.time())
                    starts.append(frame.capture)
                    latency.append((ends[-1] - frame.capture) * 1e3)
                    frames += 1
            finally:
                source.close()

    _, wall_s, cpu_s = measured(work)
    stages = {name: {"msgs": frames, "sent": frames, "busy_s": busy[name]} for name in NAIVE_STAGES}
    span_s = max(ends) - min(starts) if ends else 0.0
    return Outcome("naive loop", frames, wall_s, cpu_s, span_s, stages, latency)


def stamp(busy: dict[str, float], stage: str, since: float) -> float:
    """Add the time since `since` to `busy[stage]`; return now, the start of the next stage."""
    now = time.perf_counter()
    busy[stage] += now - since
    return now


def print_stages(outcome: Outcome) -> None:
    """Per-engine (or per-stage) message counts, rate over the run's wall time, and busy time per message."""
    print(f"\n{outcome.name}: {outcome.frames} frames in {outcome.wall_s:.2f} s wall")
    print(f"  {'engine':<12} {'msgs':>6} {'msgs/s':>8} {'busy s':>8} {'busy ms/msg':>12} {'runtime ms/msg':>15}")
    for name, s in outcome.stages.items():
        per = s["busy_s"] / s["msgs"] * 1e3 if s["msgs"] else 0.0
        rt = s.get("runtime_cpu_s", 0.0) / s["msgs"] * 1e3 if s["msgs"] and "runtime_cpu_s" in s else None
        print(f"  {name:<12} {s['msgs']:>6} {s['msgs'] / outcome.wall_s:>8.1f} {s['busy_s']:>8.2f} {per:>12.2f} "
              f"{'' if rt is None else f'{rt:.3f}':>15}")


def summary_row(outcome: Outcome, base: Outcome, cores: int) -> dict[str, Any]:
    """The comparison figures of one variant against the naive loop `base`."""
    busy = sum(s["busy_s"] for s in outcome.stages.values())
    runtime_cpu = sum(s.get("runtime_cpu_s", 0.0) for s in outcome.stages.values())
    overhead = {"runtime_cpu_s": round(runtime_cpu, 3), "overhead_pct": round(100 * runtime_cpu / busy, 2)} \
        if runtime_cpu else {}
    return {**overhead, "frames": outcome.frames, "wall_s": round(outcome.wall_s, 3), "fps": round(outcome.fps, 2),
            "vs_naive": round(outcome.fps / base.fps, 3) if base.fps else None,
            "span_fps": round(outcome.span_fps, 2),
            "span_vs_naive": round(outcome.span_fps / base.span_fps, 3) if base.span_fps else None,
            "busy_s": round(busy, 3), "cpu_s": round(outcome.cpu_s, 3),
            "cpu_ms_per_frame": round(outcome.cpu_s / outcome.frames * 1e3, 2) if outcome.frames else None,
            "core_util": round(outcome.cpu_s / (outcome.wall_s * cores), 3),
            "lat_p50_ms": round(outcome.percentile(50), 1) if outcome.latency_ms else None,
            "lat_p95_ms": round(outcome.percentile(95), 1) if outcome.latency_ms else None}


def print_summary(rows: dict[str, dict[str, Any]], cores: int) -> None:
    print(f"\nsummary ({cores} cores)")
    print(f"  {'variant':<26} {'frames':>6} {'wall s':>7} {'fps':>7} {'vs naive':>8} {'run fps':>7} {'vs naive':>8} {'busy s':>7} {'cpu s':>7} "
          f"{'cpu ms/f':>8} {'core use':>8} {'p50 ms':>7} {'p95 ms':>7}")
    for name, r in rows.items():
        print(f"  {name:<26} {r['frames']:>6} {r['wall_s']:>7.2f} {r['fps']:>7.2f} {r['vs_naive']:>7.2f}x "
              f"{r['span_fps']:>7.2f} {r['span_vs_naive']:>7.2f}x {r['busy_s']:>7.2f} {r['cpu_s']:>7.2f} {r['cpu_ms_per_frame']:>8.1f} {r['core_util']:>7.0%} "
              f"{r['lat_p50_ms']:>7.1f} {r['lat_p95_ms']:>7.1f}")
    print("  wall s: whole run incl. start-up and model load (graphflow: Summary.wall_s); fps = frames / wall s")
    print("  run fps: frames / (last frame done − first frame captured), i.e. start-up and model load left out")
    print("  busy s: sum of engine busy_s (src busy = time in generate(), mostly waiting on its decoder threads)")
    print("  cpu s: user+system CPU of this process and reaped engine processes during the run (getrusage);")
    print("         framework overhead per frame ≈ graphflow cpu ms/f − naive cpu ms/f (onnxruntime's")
    print("         idle spin-waits count as CPU too, so a negative difference means the loop spun more)")
    print("  core use = cpu s / (wall s × cores)")
    for name, r in rows.items():
        if "overhead_pct" in r:
            print(f"  runtime overhead, {name}: {r['runtime_cpu_s']:.3f} s CPU in the runtime (queues, channels, sends,"
                  f" shared memory) = {r['overhead_pct']:.2f}% of {r['busy_s']:.2f} s engine time")
    print("  latency: graphflow capture → last engine stamp (rule); naive capture → after rules; files are read as")
    print("           fast as possible, so it includes waiting in the bounded queues, not camera latency")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=4, help="copies of the demo video decoded at once")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_FRAMES} frames per stream (start-up then weighs heavily on wall fps)")
    ap.add_argument("--no-thread", action="store_true", help="skip the all-threads variant")
    args = ap.parse_args()
    if args.streams < 1:
        raise SystemExit(f"--streams: must be ≥ 1 (got {args.streams})")
    logging.basicConfig(level=logging.WARNING)
    max_frames = QUICK_FRAMES if args.quick else None
    cores = len(os.sched_getaffinity(0))
    naive = naive_loop(args.streams, max_frames)
    outcomes = [naive, run_graph(args.streams, max_frames, "process")]
    if not args.no_thread:
        outcomes.append(run_graph(args.streams, max_frames, "thread"))
    for outcome in outcomes:
        print_stages(outcome)
    rows = {o.name: summary_row(o, naive, cores) for o in outcomes}
    print_summary(rows, cores)
    print("RESULT " + json.dumps({"streams": args.streams, "quick": args.quick, "cores": cores, "variants": rows}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
