"""Cross-stream batching against one thread per stream, on N live synthetic cameras at a fixed frame rate.

Usage: python bench/batching.py [--device cpu|cuda] [--backend NAME] [--streams 8] [--rounds 2] [--pre-engines 1]
       [--unbatched] [--fused] [--cams-process] [--shards K] [--naive-threads N] [--quick]
(a) graphflow: cameras → preprocess → infer (cross-stream batches, drop "latest") → tally, on graphflow.runtime.
(b) naive: one thread per camera that takes its newest frame, letterboxes it, runs the same backend at batch size 1
    and decodes/NMS — the loop a user writes without a scheduler.
Both see the same frames at the same offered rate; a frame not taken before its camera's next one is skipped, as a
live camera overwrites it (counted as a drop). Frames are 416 px wide, so letterbox pads without resizing and the
comparison is about inference scheduling. First it times the model alone at batch sizes 1…max_batch in the same
backend as (a): the per-image gain of a batch there bounds what batching can add on this device. Prints tables and a
final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # noqa: F401  imported before any timing so neither variant pays for it
from skimage import data as photos

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphflow import Engine, Message, Param
from graphflow import graph
from graphflow import runtime  # noqa: E402
from graphflow.batching import BatchStats  # noqa: E402
from graphflow.media.backends import make_backend  # noqa: E402
from graphflow.vision.detect import DetectParams, postprocess  # noqa: E402
from graphflow.vision.letterbox import letterbox, letterbox_cupy  # noqa: E402
from graphflow.media.models import resolve_model  # noqa: E402

log = logging.getLogger(__name__)

MODEL = "yolox-nano"
FRAME_SIZE = (416, 234)  # width, height: 16:9 at the model's width
FRAMES_PER_CAMERA = 12
PHOTOS = ("astronaut", "chelsea", "coffee")
QUICK_SECONDS = 6.0


@dataclass(frozen=True)
class LiveCamera:
    """Frame k of a camera is due at start + (k + phase) / fps; cameras get different phases, as real ones do."""

    fps: float
    start: float
    phase: float
    end: float

    def due(self, k: int) -> float:
        return self.start + (k + self.phase) / self.fps

    def newest(self, now: float) -> int:
        """Index of the newest frame due by `now` (-1 before the first)."""
        return math.floor((now - self.start) * self.fps - self.phase)

    def take(self, k: int, now: float) -> int:
        """The frame to take at `now` when frame k is the next one not taken and is due: the newest due, never an
        older one than k (`newest` rounds to k - 1 for some k within a float step of k's due time) nor past the
        last."""
        return max(k, min(self.newest(now), self.frames - 1))

    @property
    def frames(self) -> int:
        """Frames this camera shows before `end`."""
        return max(0, math.ceil((self.end - self.start) * self.fps - self.phase))


def cameras(streams: int, fps: float, start: float, seconds: float) -> list[LiveCamera]:
    return [LiveCamera(fps, start, i / streams, start + seconds) for i in range(streams)]


def camera_frames(stream: int, width: int, height: int, count: int = FRAMES_PER_CAMERA) -> list[np.ndarray]:
    """`count` read-only BGR frames of one camera: a photo (person, cat, cup…) sliding across a grey scene."""
    photo = getattr(photos, PHOTOS[stream % len(PHOTOS)])()[:, :, ::-1]
    scale = 0.8 * height / photo.shape[0]
    ph, pw = max(1, int(photo.shape[0] * scale)), max(1, int(photo.shape[1] * scale))
    small = photo[(np.arange(ph) / scale).astype(int)][:, (np.arange(pw) / scale).astype(int)]  # nearest resize
    frames = []
    for k in range(count):
        frame = np.full((height, width, 3), 90 + 10 * (stream % 5), np.uint8)
        x = (stream * 37 + k * 9) % max(1, width - pw)
        y = (height - ph) // 2
        frame[y:y + ph, x:x + pw] = small[:, :min(pw, width - x)]
        frame.setflags(write=False)
        frames.append(frame)
    return frames


class Cameras(Engine):
    """N synthetic live cameras: each frame is sent when due, stamped with its due time as capture; frames that are
    overdue when the loop gets to them are skipped (a live camera overwrites them) and counted."""

    inputs = ()
    outputs = ("out",)
    streams = Param(int, 8, ge=1, doc="cameras")
    first = Param(int, 0, ge=0, doc="index of the first camera (cameras split over several engines)")
    total = Param(int, 0, ge=0, doc="cameras over all engines, which sets their phases (0: streams)")
    fps = Param(float, 10.0, ge=0.1, doc="frames per second per camera")
    seconds = Param(float, 10.0, ge=0.1, doc="how long the cameras run")
    width = Param(int, FRAME_SIZE[0], ge=16)
    height = Param(int, FRAME_SIZE[1], ge=16)

    def setup(self) -> None:
        self.indices = range(self.first, self.first + self.streams)
        self.frames = [camera_frames(i, self.width, self.height) for i in self.indices]
        self.skipped = 0
        self.start = 0.0
        self.cpu_start = self.cpu_end = 0.0

    def generate(self) -> Iterator[Message | None]:
        self.start = time.time() + 0.05
        self.cpu_start = cpu_seconds()
        cams = cameras(self.total or self.streams, self.fps, self.start, self.seconds)[self.first:][:self.streams]
        total = [c.frames for c in cams]
        due = [(cam.due(0), i, 0) for i, cam in enumerate(cams) if total[i]]
        heapq.heapify(due)  # (when the camera's next frame is due, camera, frame): cheap at thousands of frames/s
        while due:
            when, i, k = due[0]
            now = time.time()
            if when > now:
                time.sleep(min(when - now, 0.05))
                yield None
                continue
            cam = cams[i]
            newest = cam.take(k, now)
            self.skipped += newest - k
            k = newest
            if k + 1 < total[i]:
                heapq.heapreplace(due, (cam.due(k + 1), i, k + 1))
            else:
                heapq.heappop(due)
            yield Message(stream=f"cam{self.indices[i]}", seq=k, pts=k / self.fps, data={"width": self.width, "height": self.height},
                          arrays={"image": self.frames[i][k % len(self.frames[i])]}, times={"capture": cam.due(k)})
        self.cpu_end = cpu_seconds()

    def metrics(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "start": self.start, "cpu_start": self.cpu_start, "cpu_end": self.cpu_end}


class Tally(Engine):
    """Counts the frames that came through, and when (wall clock and process CPU time) the last one arrived."""

    outputs = ()

    def setup(self) -> None:
        self.frames = 0
        self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0

    def process(self, msg: Message) -> None:
        if not self.frames:
            self.cpu_first = cpu_seconds()
        self.frames += 1
        self.last = time.time()
        self.cpu_last = cpu_seconds()

    def metrics(self) -> dict[str, Any]:
        return {"frames": self.frames, "last": self.last, "cpu_first": self.cpu_first, "cpu_last": self.cpu_last}


class SmiUtil:
    """nvidia-smi's utilization.gpu (the share of its sample period in which some kernel ran, as the driver counts
    it, whichever process ran it) polled every 100 ms while the block runs, each reading stamped with the time it
    arrived: a measure of the GPU from outside the processes, which also covers graphflow split over several.
    The driver's own sample period is longer than the poll on some GPUs, so the CV of these readings understates
    the variation. Nothing without nvidia-smi."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, int]] = []

    def __enter__(self) -> SmiUtil:
        if self.enabled:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, name="nvidia-smi", daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), int(line)))

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(2)

    def over(self, t0: float, t1: float) -> dict[str, float] | None:
        """Mean and CV of the readings between wall-clock times t0 and t1 (the run, without its start-up)."""
        util = [u for t, u in self.samples if t0 <= t <= t1]
        if len(util) < 2:
            return None
        mean = sum(util) / len(util)
        sd = (sum((u - mean) ** 2 for u in util) / len(util)) ** 0.5
        return {"mean": round(mean, 1), "cv": round(sd / mean, 3) if mean else None, "readings": len(util)}


@dataclass
class Outcome:
    """One variant's figures."""

    name: str
    frames: int
    offered: int
    span_s: float
    drops: int
    cpu_s: float
    metrics: dict[str, Any]
    start: float = 0.0  # wall clock: the cameras' start
    smi: dict[str, float] | None = None  # nvidia-smi's utilization.gpu over the run: mean %, CV
    drops_by: dict[str, int] | None = None  # where the frames were dropped

    @property
    def fps(self) -> float:
        return self.frames / self.span_s if self.span_s else 0.0

    def row(self) -> dict[str, Any]:
        m = self.metrics
        return {"frames": self.frames, "offered": self.offered, "fps": round(self.fps, 2), "drops": self.drops,
                "drops_by": self.drops_by,
                "cpu_ms_per_frame": round(self.cpu_s / self.frames * 1e3, 1) if self.frames else None,
                "mean_batch": m["mean_batch"], "mean_batch_fill": m["mean_batch_fill"],
                "busy_fraction": m["busy_fraction"], "busy_cv": m["busy_cv"],
                "p50_ms": m["p50_ms"], "p95_ms": m["p95_ms"], "run_ms": m.get("mean_run_ms"),
                "smi_util_pct": self.smi and self.smi["mean"], "smi_cv": self.smi and self.smi["cv"]}


def run_graphflow(args: argparse.Namespace, max_batch: int) -> Outcome:
    """(a): the product — a graph of cameras → preprocess → infer → tally run by graphflow.runtime.run; CPU time
    is counted from the cameras' start to the last frame, so model loading is left out as in (b).
    With `--pre-engines G` the cameras are split over G camera → preprocess chains that all feed one infer.
    With `--shards K` the cameras are split over K whole pipelines (cameras → [preprocess →] infer → tally), each
    in its own process (placement `process:shardK`), each batching across its own cameras, all on one device."""
    shards = max(1, min(args.shards, args.streams))
    groups = shards if shards > 1 else max(1, min(args.pre_engines, args.streams))
    bounds = [args.streams * g // groups for g in range(groups + 1)]
    pre = {"type": "preprocess", "params": {"size": list(resolve_model(MODEL).preprocess.size),
                                            **({"device": "cuda", "keep_on_gpu": True} if args.device == "cuda" else {})}}
    engines: dict[str, Any] = {}
    connections: list[Any] = []
    for g in range(groups):
        suffix = str(g) if groups > 1 else ""
        streams = bounds[g + 1] - bounds[g]
        tag = suffix if shards > 1 else ""  # infer and tally: one per shard, else one for all
        det, tally = f"det{tag}", f"tally{tag}"
        shard = {"placement": f"process:shard{g}"} if shards > 1 else {}
        own = {"placement": "process"} if args.cams_process else {}
        engines[f"cams{suffix}"] = {
            "type": f"{Cameras.__module__}:Cameras", **(shard or own),
            "params": {"streams": streams, "first": bounds[g], "total": args.streams, "fps": args.fps,
                       "seconds": args.seconds}}
        if args.fused:  # infer letterboxes the frames itself, a whole batch at once
            connections.append({"from": f"cams{suffix}.out", "to": f"{det}.in", "policy": "latest",
                                "capacity": streams})
        else:
            engines[f"pre{suffix}"] = {**pre, **shard}
            connections += [{"from": f"cams{suffix}.out", "to": f"pre{suffix}.in", "policy": "latest",
                             "capacity": streams}, [f"pre{suffix}.out", f"{det}.in"]]
        if shards > 1 or g == 0:
            engines[det] = {"type": "infer", **shard, "params": {
                "model": MODEL, "backend": args.backend, "instances": args.instances,
                "threads": args.threads or max(1, cores() // args.instances // shards),
                "max_batch": min(max_batch, streams) if shards > 1 else max_batch, "max_wait_ms": args.max_wait_ms,
                "queue": 2, "drop": "latest", "letterbox": args.fused}}
            engines[tally] = {"type": f"{Tally.__module__}:Tally", **shard}
            connections.append([f"{det}.out", f"{tally}.in"])
    doc = {"name": "batching-bench", "engines": engines, "connections": connections}
    summary = runtime.run(graph.build(doc, "batching-bench"), handle_signals=False)
    if summary.failed or summary.errors:
        raise SystemExit(f"graphflow variant failed: {'; '.join(summary.errors) or summary.stopped_by}")
    metrics = {k: summary.stats[k]["metrics"] for k in engines}
    cams = [metrics[k] for k in engines if k.startswith("cams")]
    dets = [metrics[k] for k in engines if k.startswith("det")]
    tallies = [metrics[k] for k in engines if k.startswith("tally")]
    drops_by = {"camera": sum(c["skipped"] for c in cams), "infer_queues": sum(d["dropped"] for d in dets),
                "channels": sum(summary.stats[k]["dropped"] for k in engines if k.startswith(("pre", "det")))}
    drops = sum(drops_by.values())
    offered = sum(c.frames for c in cameras(args.streams, args.fps, 0.0, args.seconds))
    start = min(c["start"] for c in cams)
    if shards > 1:  # each shard's process, from its cameras' start to its last frame done
        cpu_s = sum(t["cpu_last"] - c["cpu_start"] for c, t in zip(cams, tallies))
    elif args.cams_process:  # CPU of the camera processes, plus this one's from the first frame done to the last
        cpu_s = sum(c["cpu_end"] - c["cpu_start"] for c in cams) + tallies[0]["cpu_last"] - tallies[0]["cpu_first"]
    else:
        cpu_s = tallies[0]["cpu_last"] - min(c["cpu_start"] for c in cams)
    where = (f", {shards} shard processes" if shards > 1 else ", cams in processes" if args.cams_process else "")
    return Outcome(f"(a) graphflow batch≤{min(max_batch, max(np.diff(bounds))) if shards > 1 else max_batch}{where}",
                   sum(t["frames"] for t in tallies), offered, max(t["last"] for t in tallies) - start, drops, cpu_s,
                   dets[0] if shards == 1 else merged(dets), start, drops_by=drops_by)


def merged(dets: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of several infer engines taken together: batch size weighted by batches, the worst stream's
    latency. Busy time is left out: each process times its own runs on the GPU, and runs of different processes
    interleave there, so their spans cannot be added up (nvidia-smi's reading covers them all)."""
    batches = sum(d["batches"] for d in dets)
    mean_batch = sum(d["mean_batch"] * d["batches"] for d in dets if d["batches"]) / batches if batches else None
    return {"mean_batch": round(mean_batch, 3) if mean_batch else None,
            "mean_batch_fill": round(sum(d["mean_batch_fill"] * d["batches"] for d in dets if d["batches"])
                                     / batches, 3) if batches else None,
            "busy_fraction": None, "busy_cv": None,
            "p50_ms": max((d["p50_ms"] for d in dets if d["p50_ms"] is not None), default=None),
            "p95_ms": max((d["p95_ms"] for d in dets if d["p95_ms"] is not None), default=None),
            "mean_run_ms": round(sum(d["mean_run_ms"] * d["batches"] for d in dets if d["batches"]) / batches, 3)
            if batches else None}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def cores() -> int:
    return len(os.sched_getaffinity(0))


def naive_threads(streams: int) -> int:
    """onnxruntime threads of each naive session: the cores shared out between the streams, at least one each."""
    return max(1, cores() // streams)


def model_cost(args: argparse.Namespace, rounds: int = 3) -> dict[int, float]:
    """Milliseconds per image of the model alone at batch sizes 1, 2, 4… up to max_batch, in graphflow's backend
    setup (threads per instance as in (a)), on letterboxed camera frames: the input is already where the backend
    runs it (on a GPU: uploaded beforehand, and the output decoded there, as infer does); sizes run interleaved,
    median of `rounds`."""
    spec = resolve_model(MODEL)
    try:
        runner = make_backend(args.backend, args.threads or max(1, cores() // args.instances), args.max_batch)
        runner.load(spec.path)
    except ValueError as exc:
        raise SystemExit(f"model cost: {exc}") from None
    sizes = sorted({1 << i for i in range(args.max_batch.bit_length()) if 1 << i <= args.max_batch} | {args.max_batch})
    frames = [camera_frames(i % args.streams, *FRAME_SIZE)[0] for i in range(max(sizes))]
    batch = np.stack([letterbox(f, spec.preprocess)[0] for f in frames])
    if hasattr(runner, "candidates"):  # a GPU backend, run as infer runs it
        params = DetectParams()
        inputs = {b: runner.prepare(batch[:b]) for b in sizes}

        def run(x: Any) -> Any:
            return runner.candidates(x, spec.output_format, params)
    else:
        inputs = {b: batch[:b] for b in sizes}
        run = runner.infer
    images = max(sizes) * (2 if args.device == "cpu" else 8)  # per size and round: a few hundred ms
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for b in sizes:
        run(inputs[b])  # warm-up (first-run allocations, a GPU backend's per-shape setup)
    for _ in range(rounds):
        for b in sizes:
            t0 = time.perf_counter()
            for _ in range(images // b):
                run(inputs[b])
            times[b].append((time.perf_counter() - t0) / (images // b * b) * 1e3)
    return {b: sorted(t)[len(t) // 2] for b, t in times.items()}


def print_cost(cost: dict[int, float]) -> None:
    print(f"{'model alone: batch':<20} " + " ".join(f"{b:>7}" for b in cost))
    print(f"{'ms per image':<20} " + " ".join(f"{t:>7.2f}" for t in cost.values()))
    print(f"{'vs batch 1':<20} " + " ".join(f"{cost[1] / t:>6.2f}x" for t in cost.values()))


def run_naive(args: argparse.Namespace) -> Outcome:
    """(b): one thread per camera, batch size 1; on the CPU each thread has its own session (cores shared out), on a
    GPU they share one model."""
    spec = resolve_model(MODEL)
    detect = DetectParams()
    threads = args.naive_threads if args.naive_threads is not None else args.threads or naive_threads(args.streams)
    shared = args.device == "cuda"
    runners = []
    for _ in range(1 if shared else args.streams):
        try:
            runner = make_backend(args.backend, threads)
            runner.load(spec.path)
        except ValueError as exc:  # backend not installed or not usable here: one line, no traceback
            raise SystemExit(f"naive variant: {exc}") from None
        runners.append(runner)
    frames = [camera_frames(i, *FRAME_SIZE) for i in range(args.streams)]
    boxer = letterbox_cupy if args.device == "cuda" else letterbox  # same preprocessing as (a) on each device
    stats = BatchStats(max_batch=1, slots=1 if shared else cores())
    start = time.time() + 0.05
    cams = cameras(args.streams, args.fps, start, args.seconds)
    skipped = [0] * args.streams
    done = [0] * args.streams
    last = [0.0] * args.streams

    def loop(i: int) -> None:
        runner, cam, k = runners[0 if shared else i], cams[i], 0
        while k < cam.frames:
            now = time.time()
            if cam.due(k) > now:
                time.sleep(cam.due(k) - now)
                continue
            newest = cam.take(k, now)
            skipped[i] += newest - k
            k = newest
            tensor, info = boxer(frames[i][k % len(frames[i])], spec.preprocess)
            stats.batch(1, 0)
            # a GPU backend's busy time is the GPU-side span of the run, as graphflow's infer counts it
            with stats.measured(getattr(runner, "device_span", None)):
                output = runner.infer(tensor[None])[0]
            postprocess(output, spec.output_format, info, FRAME_SIZE, spec.labels, detect)
            last[i] = time.time()
            stats.done(f"cam{i}", last[i] - cam.due(k))
            done[i] += 1
            k += 1

    workers = [threading.Thread(target=loop, args=(i,), name=f"naive:cam{i}") for i in range(args.streams)]
    cpu0 = cpu_seconds()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu_s = cpu_seconds() - cpu0
    offered = sum(c.frames for c in cams)
    return Outcome(f"(b) naive {args.streams} threads", sum(done), offered, max(last) - start, sum(skipped), cpu_s,
                   stats.snapshot({}), start, drops_by={"camera": sum(skipped)})


def latency_bound(args: argparse.Namespace, cost: dict[int, float], outcome: Outcome) -> dict[str, Any]:
    """The issue's latency target for an offered load under capacity (no drops): p95 within max_wait_ms + 2 batch
    times, with a batch time taken two ways — the model alone at the mean batch size's power of two (strict), and
    the run stage's mean time per batch in (a) itself (host wall time, launch and copy back included)."""
    r = outcome.row()
    size = min((b for b in cost if b >= (r["mean_batch"] or 1)), default=max(cost))
    model_ms = cost[size] * size
    bounds = {"strict": args.max_wait_ms + 2 * model_ms}
    if r["run_ms"] is not None:
        bounds["in_graph"] = args.max_wait_ms + 2 * r["run_ms"]
    return {"under_capacity": r["drops"] == 0, "p95_ms": r["p95_ms"], "model_batch_ms": round(model_ms, 3),
            "run_ms": r["run_ms"], **{f"{k}_ms": round(v, 2) for k, v in bounds.items()},
            **{f"within_{k}": r["p95_ms"] is not None and r["p95_ms"] <= v for k, v in bounds.items()}}


def smi_run(args: argparse.Namespace, variant: Any, *more: Any) -> Outcome:
    """Run a variant; on a GPU, with nvidia-smi reading its utilisation from 0.5 s after the cameras start (the
    pipeline filled) to the last frame done."""
    with SmiUtil(args.device == "cuda") as smi:
        outcome = variant(args, *more)
    outcome.smi = smi.over(outcome.start + 0.5, outcome.start + outcome.span_s)
    return outcome


def print_table(rounds: list[dict[str, Outcome]]) -> None:
    width = max(len(o.name) for v in rounds for o in v.values()) + (3 if len(rounds) > 1 else 0)
    smi = any(o.smi is not None for v in rounds for o in v.values())
    print(f"{'variant':<{width}} {'frames':>6} {'offered':>7} {'fps':>7} {'vs (b)':>7} {'cpu ms/f':>8} {'batch':>6} "
          f"{'fill':>5} {'busy':>5} {'busy CV':>7} {'p50 ms':>7} {'p95 ms':>7} {'drops':>6}"
          + (f" {'smi %':>5} {'smi CV':>6}" if smi else ""))

    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)
    for n, variants in enumerate(rounds, 1):
        for o in variants.values():
            r = o.row()
            print(f"{o.name + (f' #{n}' if len(rounds) > 1 else ''):<{width}} {r['frames']:>6} {r['offered']:>7} "
                  f"{r['fps']:>7.2f} {o.fps / variants['naive'].fps:>6.2f}x {r['cpu_ms_per_frame']:>8.1f} "
                  f"{r['mean_batch']:>6.2f} {r['mean_batch_fill']:>5.2f} {num(r['busy_fraction'], '.2f'):>5} "
                  f"{num(r['busy_cv'], '.3f'):>7} {r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['drops']:>6}"
                  + (f" {num(r['smi_util_pct'], '.1f'):>5} {num(r['smi_cv'], '.3f'):>6}" if smi else ""))
    print("  fps: frames done / (last done − cameras' start); cpu ms/f: CPU time per frame done (this process, and\n"
          "  the camera or shard processes with --cams-process or --shards);\n"
          "  batch/fill: mean batch size, and over max_batch; busy: share of the accelerator in use per 100 ms window\n"
          "  (CPU: of its cores, one per model instance or session; GPU: time between each run's first and last\n"
          "  kernel, from CUDA events; '-' with shards: their runs interleave on the GPU), mean over the run;\n"
          "  busy CV: std/mean of the windows; p50/p95: capture → detections decoded, the worst camera's;\n"
          "  drops: frames skipped or dropped; smi % / smi CV: mean and std/mean of nvidia-smi's utilization.gpu\n"
          "  read every 100 ms from 0.5 s after the cameras start to the last frame (share of time some kernel ran,\n"
          "  any process)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: onnxruntime; cuda: a GPU backend")
    ap.add_argument("--backend", help="infer backend (default: onnxruntime on cpu, torch on cuda)")
    ap.add_argument("--streams", type=int, default=8, help="cameras")
    ap.add_argument("--fps", type=float, default=10.0, help="frames per second per camera")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long the cameras run, per round")
    ap.add_argument("--rounds", type=int, default=2, help="(b) then (a), this many times; the median round is reported")
    ap.add_argument("--max-batch", type=int, help="graphflow's max_batch (default: 4 on cpu, --streams on cuda)")
    ap.add_argument("--max-wait-ms", type=float, default=50.0, help="graphflow's max_wait_ms")
    ap.add_argument("--instances", type=int, help="graphflow's model instances (default: the cores on cpu, 1 on cuda)")
    ap.add_argument("--pre-engines", type=int, default=1,
                    help="graphflow: split the cameras over this many camera → preprocess chains")
    ap.add_argument("--threads", type=int, default=0,
                    help="onnxruntime threads per session (0: graphflow cores / instances, naive cores / streams)")
    ap.add_argument("--naive-threads", type=int, default=None,
                    help="onnxruntime threads of each naive session, overriding --threads (0: the backend's default)")
    ap.add_argument("--cams-process", action="store_true",
                    help="graphflow: run each camera engine in its own process (as decode engines would be), so the "
                         "frames cross to infer through shared memory and infer's process has the GIL to itself")
    ap.add_argument("--shards", type=int, default=1,
                    help="graphflow: split the cameras over this many whole pipelines (cameras → infer), one process "
                         "each (placement process:NAME), all on the same device")
    ap.add_argument("--unbatched", action="store_true", help="also run graphflow with max_batch 1")
    ap.add_argument("--fused", action="store_true",
                    help="no preprocess engine: infer letterboxes each batch itself (one upload per batch on a GPU)")
    ap.add_argument("--quick", action="store_true", help=f"one round, cameras run {QUICK_SECONDS:g} s")
    args = ap.parse_args()
    if min(args.streams, args.fps, args.seconds, args.rounds, args.pre_engines, args.shards) <= 0:
        raise SystemExit("--streams, --fps, --seconds, --rounds, --pre-engines and --shards must be positive")
    if args.shards > 1 and (args.pre_engines > 1 or args.cams_process):
        raise SystemExit("--shards puts each shard's cameras in its process: not with --pre-engines or --cams-process")
    args.backend = args.backend or ("torch" if args.device == "cuda" else "onnxruntime")
    args.max_batch = args.max_batch or (args.streams if args.device == "cuda" else min(4, args.streams))
    args.instances = args.instances or (1 if args.device == "cuda" else max(1, cores() // args.shards))
    if args.quick:
        args.seconds, args.rounds = QUICK_SECONDS, 1
    if args.naive_threads is not None and args.naive_threads < 0:
        raise SystemExit("--naive-threads must be 0 or more")
    logging.basicConfig(level=logging.WARNING)
    cost = model_cost(args, rounds=1 if args.quick else 3)
    rounds = []
    for _ in range(args.rounds):
        variants = {"naive": smi_run(args, run_naive), "graphflow": smi_run(args, run_graphflow, args.max_batch)}
        if args.unbatched:
            variants["graphflow_unbatched"] = smi_run(args, run_graphflow, 1)
        rounds.append(variants)
    print(f"\n{args.streams} cameras × {args.fps:g} fps for {args.seconds:g} s, {MODEL} on {args.device} "
          f"({args.backend}), {cores()} cores, graphflow: {args.instances} instance(s) × max_batch {args.max_batch}\n")
    print_cost(cost)
    print()
    print_table(rounds)
    speedups = [r["graphflow"].fps / r["naive"].fps if r["naive"].fps else 0.0 for r in rounds]
    median = sorted(range(len(rounds)), key=lambda i: speedups[i])[(len(rounds) - 1) // 2]
    bound = latency_bound(args, cost, rounds[median]["graphflow"])
    print(f"latency (a): p95 {bound['p95_ms']} ms; max_wait_ms + 2 batch times = {bound['strict_ms']} ms with the "
          f"model alone's batch time, {bound.get('in_graph_ms')} ms with the run stage's"
          + ("" if bound["under_capacity"] else " (offered load over capacity: the bound does not apply)"))
    result = {"device": args.device, "backend": args.backend, "streams": args.streams, "fps": args.fps,
              "seconds": args.seconds, "cores": cores(), "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "instances": args.instances, "pre_engines": args.pre_engines, "fused": args.fused,
              "cams_process": args.cams_process, "shards": args.shards,
              "threads": {"graphflow": args.threads or max(1, cores() // args.instances // args.shards),
                          "naive_per_session": args.naive_threads if args.naive_threads is not None
                          else args.threads or naive_threads(args.streams)},
              "model_ms_per_image": {str(b): round(t, 3) for b, t in cost.items()},
              "batch_gain_ceiling": round(cost[1] / min(cost.values()), 3),
              "speedup": round(speedups[median], 3), "speedups": [round(x, 3) for x in speedups],
              "latency_bound": bound,
              "variants": {name: o.row() for name, o in rounds[median].items()}}
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
