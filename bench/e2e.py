"""End to end on live-paced cameras: how many streams one machine runs through decode → infer → track → rule →
publish with (almost) no frame dropped and a bounded capture → rule latency.

Usage: python bench/e2e.py [--streams 16,32,64] [--seconds 20] [--decode nvdec|cuda|software]
                           [--shards K | --per-shard M] [--queue Q] [--quick] [--keep]
Makes its own H.264 clip (bench/clip.py: 1080p30 on a GPU machine, 720p at 10 fps on a CPU one), plays it on N
streams as cameras would (`realtime: true`, `loop: true`: frame k released at its pts) through the real graph, split
over K process shards (`placement: process:shardK`, M streams each; each shard a whole pipeline, so decode and infer
share a process and GPU frames never cross one), with the torch backend on a GPU (fp16, CUDA graphs, letterbox
inside infer, straight from NVDEC's NV12 with `--decode nvdec`) or onnxruntime on the CPU, ByteTrack, a
line-crossing rule and a JSON-lines publisher per shard. infer drops a stream's oldest frame when it holds `--queue`.

After the first frames reach every shard's output, it waits `--warmup` s, measures for `--seconds` s, then stops the
graph with SIGINT. Over the frames captured in that window: dropped share against the frames *due* in it per stream
(a camera's frame k is due at its capture stamp; missing at the window's head, inside, or tail — the head and tail
ones are what sequence gaps alone miss), beside the share of gaps (sequence numbers missing between a stream's first
and last frame in the window), capture → rule latency p50/p95/p99, frames per second; over the same wall time: GPU
and NVDEC busy (nvidia-smi's utilization.gpu and utilization.decoder, all processes) and host CPU busy (all cores,
/proc/stat). Prints a table and `RESULT {json}` with the largest N that meets the targets (dropped of the frames due
≤ 0.1 %, p95 ≤ 200 ms).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip import make_clip

MAX_DROPPED = 0.001  # share of frames
MAX_P95_MS = 200.0


def gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SmiSampler:
    """nvidia-smi's utilization.gpu and utilization.decoder every 0.5 s, with the wall time of each sample."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float, float]] = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SmiSampler:
        if self.enabled:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,utilization.decoder",
                                          "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                gpu, dec = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), gpu, dec))

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def over(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """Mean GPU busy % and NVDEC busy % of the samples in [t0, t1]."""
        inside = [(g, d) for t, g, d in self.samples if t0 <= t <= t1]
        if not inside:
            return None, None
        return round(float(np.mean([g for g, _ in inside])), 1), round(float(np.mean([d for _, d in inside])), 1)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Row:
    """One run's figures."""

    streams: int
    shards: int
    frames: int = 0
    dropped_pct: float = 0.0  # sequence gaps between each stream's first and last frame in the window
    due: int = 0  # frames due in the window, all streams
    dropped_due_pct: float = 0.0  # of those, the share missing at the output
    missing: dict[str, int] = field(default_factory=lambda: {"head": 0, "inside": 0, "tail": 0})
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    fps: float = 0.0
    gpu_pct: float | None = None
    nvdec_pct: float | None = None
    cpu_pct: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.errors and self.frames > 0 and self.dropped_due_pct <= MAX_DROPPED * 100
                and self.p95_ms <= MAX_P95_MS)


def graph_doc(args: argparse.Namespace, clip: Path, streams: int, shards: int, out: Path, gpu: bool) -> dict:
    """K whole pipelines, each in its own process (or threads of the launcher with one shard)."""
    engines: dict[str, Any] = {}
    connections: list[list[str]] = []
    bounds = np.linspace(0, streams, shards + 1).round().astype(int)
    for g in range(shards):
        cams = range(bounds[g], bounds[g + 1])
        source = {"uri": str(clip), "loop": True, "realtime": True}
        if args.decode != "software":
            source["hwaccel"] = args.decode
        place = {"placement": f"process:shard{g}"} if shards > 1 or gpu else {}
        batch = max(1, len(cams))
        engines |= {
            f"src{g}": {"type": "decode", **place,
                        "params": {"sources": [{"id": f"cam{i}", **source} for i in cams], "queue_size": 4}},
            f"det{g}": {"type": "infer", **place,
                        "params": {"backend": "torch" if gpu else "onnxruntime", "letterbox": True, "conf": 0.3,
                                   "max_batch": batch, "max_wait_ms": args.max_wait_ms, "queue": args.queue,
                                   "drop": "drop_oldest", "threads": 0 if gpu else 1}},
            f"trk{g}": {"type": "track", **place, "params": {"algorithm": "bytetrack"}},
            f"rule{g}": {"type": "rule", **place,
                         "params": {"rules": [{"id": "door", "kind": "line_cross", "line": [[0.5, 0.0], [0.5, 1.0]],
                                               "classes": ["person"]}], "overlay": False}},
            f"pub{g}": {"type": "publish", **place,
                        "params": {"sinks": [{"kind": "jsonl", "path": str(out / f"shard{g}.jsonl")}]}},
        }
        connections += [[f"src{g}.out", f"det{g}.in"], [f"det{g}.out", f"trk{g}.in"],
                        [f"trk{g}.out", f"rule{g}.in"], [f"rule{g}.out", f"pub{g}.in"]]
    return {"name": f"e2e-{streams}", "engines": engines, "connections": connections,
            "settings": {"shutdown_timeout": 60}}


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run_one(args: argparse.Namespace, clip: Path, fps: float, streams: int, gpu: bool, smi: SmiSampler) -> Row:
    shards = args.shards or (max(1, math.ceil(streams / args.per_shard)) if gpu else 1)
    row = Row(streams, shards)
    work = Path(tempfile.mkdtemp(prefix=f"e2e{streams}_"))
    doc = graph_doc(args, clip, streams, shards, work, gpu)
    (work / "graph.json").write_text(json.dumps(doc))
    log = open(work / "launch.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", str(work / "graph.json"), "-q",
                             "--stats", str(work / "stats.json")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=work, start_new_session=True)
    outputs = [work / f"shard{g}.jsonl" for g in range(shards)]
    deadline = time.time() + args.startup_s
    while time.time() < deadline and proc.poll() is None and not all(lines(p) > 0 for p in outputs):
        time.sleep(0.5)
    if proc.poll() is not None or not all(lines(p) > 0 for p in outputs):
        row.errors.append(f"no output from every shard within {args.startup_s:g} s (exit {proc.poll()})")
    else:
        time.sleep(args.warmup)
        t0, (busy0, total0) = time.time(), cpu_ticks()
        time.sleep(args.seconds)
        t1, (busy1, total1) = time.time(), cpu_ticks()
        row.cpu_pct = round(100 * (busy1 - busy0) / max(total1 - total0, 1), 1)
        row.gpu_pct, row.nvdec_pct = smi.over(t0, t1)
        _measure(row, outputs, t0, t1, fps)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    log.close()
    if code not in (0, 3) or row.errors:
        tail = (work / "launch.log").read_text(errors="replace").strip().splitlines()[-8:]
        row.errors.append(f"exit {code}: " + " | ".join(tail))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def _measure(row: Row, outputs: list[Path], t0: float, t1: float, fps: float) -> None:
    """Drops, latency and fps over frames captured in [t0, t1 - 1 s] (the last second may still be in flight)."""
    end = t1 - 1.0
    captures: dict[str, dict[int, float]] = defaultdict(dict)  # per stream, every frame delivered: seq → capture
    latency = []
    for path in outputs:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written when the file was read
                times = rec.get("times", {})
                capture = times.get("capture")
                done = max((v for k, v in times.items() if k.startswith("rule")), default=None)
                if capture is None or done is None:
                    continue
                captures[rec["stream"]][rec["seq"]] = capture
                if t0 <= capture <= end:
                    latency.append((done - capture) * 1e3)
    seqs = {s: sorted(q for q, c in got.items() if t0 <= c <= end) for s, got in captures.items()}
    seqs = {s: q for s, q in seqs.items() if q}
    seen = sum(len(s) for s in seqs.values())
    expected = sum(s[-1] - s[0] + 1 for s in seqs.values())
    missing_streams = row.streams - len(seqs)
    row.frames = seen
    row.dropped_pct = round(100 * (expected - seen) / max(expected, 1), 3) if not missing_streams else 100.0
    row.due = seen
    for got in captures.values():
        for part, n in missed_due(got, t0, end, fps).items():
            row.missing[part] += n
            row.due += n
    never = row.streams - len(captures)  # streams with no frame delivered at all
    row.missing["head"] += never * due_in(t0, end, fps)
    row.due += never * due_in(t0, end, fps)
    row.dropped_due_pct = round(100 * sum(row.missing.values()) / max(row.due, 1), 3)
    if missing_streams:
        row.errors.append(f"{missing_streams} streams delivered nothing in the window")
    if latency:
        row.p50_ms, row.p95_ms, row.p99_ms = (round(float(np.percentile(latency, q)), 1) for q in (50, 95, 99))
    row.fps = round(seen / (end - t0), 1)


def due_in(t0: float, end: float, fps: float) -> int:
    """Frames a camera at `fps` makes due in [t0, end], whatever its phase (rounded down)."""
    return int((end - t0) * fps)


def missed_due(captures: dict[int, float], t0: float, end: float, fps: float) -> dict[str, int]:
    """Frames of one stream due in [t0, end] but not delivered (`captures`: seq → capture stamp, the time a frame
    was due, of every frame delivered): at the head (before its first frame in the window, counted back from it at
    1/fps a frame, not past a frame delivered before the window), inside (sequence gaps) and at the tail (after its
    last, up to `end` or the next frame delivered). A stream with nothing delivered in the window counts all of its
    frames due as head."""
    inside = sorted(q for q, c in captures.items() if t0 <= c <= end)
    if not inside:
        return {"head": due_in(t0, end, fps), "inside": 0, "tail": 0}
    first, last = inside[0], inside[-1]
    before = max((q for q in captures if q < first), default=None)
    after = min((q for q in captures if q > last), default=None)
    head = int((captures[first] - t0) * fps + 1e-6)
    tail = int((end - captures[last]) * fps + 1e-6)
    if before is not None:
        head = min(head, first - before - 1)
    if after is not None:
        tail = min(tail, after - last - 1)
    return {"head": head, "inside": last - first + 1 - len(inside), "tail": tail}


def print_table(rows: list[Row]) -> None:
    print(f"{'streams':>7} {'shards':>6} {'frames':>7} {'due':>7} {'dropped %':>9} {'head/in/tail':>14} {'gaps %':>7} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'fps':>7} {'GPU %':>6} {'NVDEC %':>7} {'CPU %':>6}  ok")
    for r in rows:
        def num(x: Any) -> str:
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x}"
        parts = "/".join(str(r.missing[k]) for k in ("head", "inside", "tail"))
        print(f"{r.streams:>7} {r.shards:>6} {r.frames:>7} {r.due:>7} {r.dropped_due_pct:>9} {parts:>14} "
              f"{r.dropped_pct:>7} {num(r.p50_ms):>7} {num(r.p95_ms):>7} "
              f"{num(r.p99_ms):>7} {r.fps:>7} {num(r.gpu_pct):>6} {num(r.nvdec_pct):>7} {r.cpu_pct:>6}  "
              f"{'yes' if r.ok else 'no'}{'  ' + r.errors[0][:300] if r.errors else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="", help="comma-separated stream counts (GPU: 16,32,64,96,128; CPU: 1,2)")
    ap.add_argument("--seconds", type=float, default=0, help="measured seconds per run (GPU 20, CPU 8)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds after the first output before measuring")
    ap.add_argument("--startup-s", type=float, default=120.0, help="longest wait for every shard's first output")
    ap.add_argument("--decode", default="", choices=("", "nvdec", "cuda", "software"),
                    help="nvdec: frames stay on the GPU (default with a GPU); cuda: h264_cuvid to host BGR")
    ap.add_argument("--shards", type=int, default=0, help="process shards (0: one per --per-shard streams on a GPU, "
                                                          "1 on a CPU)")
    ap.add_argument("--per-shard", type=int, default=8, help="streams per shard process when --shards is 0")
    ap.add_argument("--max-wait-ms", type=float, default=20.0, help="infer's longest wait for a batch to fill")
    ap.add_argument("--queue", type=int, default=8, help="infer's frames held per stream before the oldest is dropped")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--clips", default=os.path.join(tempfile.gettempdir(), "graphflow_clips"))
    ap.add_argument("--keep", action="store_true", help="keep each run's folder (graph, outputs, log)")
    ap.add_argument("--quick", action="store_true", help="short runs: 5 s measured, 1 s warm-up")
    args = ap.parse_args()
    gpu = gpu_present() if args.device == "auto" else args.device == "cuda"
    args.decode = args.decode or ("nvdec" if gpu else "software")
    args.seconds = args.seconds or (5.0 if args.quick else 20.0 if gpu else 8.0)
    if args.quick:
        args.warmup = min(args.warmup, 1.0)
    counts = [int(x) for x in (args.streams or ("16,32,64,96,128" if gpu else "1,2")).split(",")]
    width, height, fps = (1920, 1080, 30) if gpu else (1280, 720, 10)
    clip = make_clip(Path(args.clips), width, height, fps, 10.0)
    print(f"clip {clip.name}; {'GPU' if gpu else 'CPU'}; decode {args.decode}; {args.seconds:g} s measured per run",
          flush=True)
    rows = []
    with SmiSampler(gpu) as smi:
        for n in counts:
            row = run_one(args, clip, fps, n, gpu, smi)
            rows.append(row)
            print_table([row])
            sys.stdout.flush()
    print()
    print_table(rows)
    best = max((r.streams for r in rows if r.ok), default=0)
    print("RESULT", json.dumps({"device": "cuda" if gpu else "cpu", "decode": args.decode, "clip": clip.name,
                                "seconds": args.seconds, "targets": {"dropped_due_pct": MAX_DROPPED * 100,
                                                                     "p95_ms": MAX_P95_MS},
                                "max_streams_meeting_targets": best,
                                "rows": [{**r.__dict__, "ok": r.ok} for r in rows]}, default=str))


if __name__ == "__main__":
    main()
