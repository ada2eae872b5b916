"""Soak: a multi-stream graph (process placement, fan-out, shared-memory frames) runs for M minutes while
the memory of every graphflow process and the shared-memory segments are sampled.

Usage: python bench/soak.py [--minutes 10] [--interval 10] [--streams 2]
The demo video loops on every stream through decode → preprocess (process) → infer (process) → track →
rule → publish, with a second branch from decode to a process-placed sink on a `drop_oldest` connection.
Every `interval` seconds it samples the RSS of the launcher and each child process, the number of
/dev/shm files they have open or mapped and the number of graphflow memfds open in the tree. After the first fifth (warm-up) it
fits a line to total RSS and reports growth in % per hour. Stops the graph with SIGINT and checks it
exits cleanly. Prints a table and a final `RESULT {json}` line."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def soak_graph(streams: int, out: Path) -> dict:
    video = str(ROOT / "graphs" / "data" / "demo.mp4")
    sources = [{"id": f"cam{i}", "uri": video, "loop": True, "fps": 5} for i in range(streams)]
    return {"name": "soak", "engines": {
        "src": {"type": "decode", "params": {"sources": sources}},
        "pre": {"type": "preprocess", "placement": "process"},
        "det": {"type": "infer", "placement": "process", "params": {"conf": 0.3}},
        "trk": {"type": "track"},
        "zone": {"type": "rule", "params": {"rules": [
            {"id": "door", "kind": "line_cross", "line": [[0.5, 0.0], [0.5, 1.0]], "classes": ["person"]}]}},
        "out": {"type": "publish", "params": {"sinks": [{"kind": "jsonl", "path": str(out)}]}},
        "tap": {"type": "sink", "placement": "process", "params": {"path": os.devnull}}},
        "connections": [["src.out", "pre.in"], ["pre.out", "det.in"], ["det.out", "trk.in"], ["trk.out", "zone.in"],
                        ["zone.out", "out.in"],
                        {"from": "src.out", "to": "tap.in", "policy": "drop_oldest", "capacity": 2}]}


def dev_shm_of(pids: list[int]) -> set[str]:
    """/dev/shm files the graph's processes have open or mapped (other programs' segments do not count)."""
    found = set()
    for pid in pids:
        try:
            found.update(p for fd in os.listdir(f"/proc/{pid}/fd")
                         if (p := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("/dev/shm/"))
            found.update(line.split(None, 5)[5].strip() for line in open(f"/proc/{pid}/maps")
                         if "/dev/shm/" in line and len(line.split(None, 5)) == 6)
        except OSError:
            pass
    return found


def memfds(proc: psutil.Process) -> int:
    try:
        return sum("memfd:graphflow" in os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{proc.pid}/fd"))
    except OSError:
        return 0


def sample(launcher: psutil.Process, seen: dict[int, psutil.Process]) -> dict:
    procs = [launcher] + launcher.children(recursive=True)
    seen.update((p.pid, p) for p in procs)
    rss = {}
    for p in procs:
        try:
            rss[p.pid] = p.memory_info().rss
        except psutil.Error:
            pass
    return {"t": time.monotonic(), "rss": rss, "total_rss": sum(rss.values()),
            "dev_shm": len(dev_shm_of(list(rss))), "memfds": sum(memfds(p) for p in procs)}


def alive(proc: psutil.Process) -> bool:
    """Whether the graph's process still runs: the same process (its pid and start time; a pid reused by another
    program does not count), not a zombie waiting to be reaped."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def growth_per_hour(samples: list[dict]) -> float:
    """Least-squares slope of total RSS after warm-up, as % of its warm-up level per hour."""
    warm = samples[max(1, len(samples) // 5):]
    if len(warm) < 2:
        return 0.0
    t = np.array([s["t"] for s in warm]) - warm[0]["t"]
    rss = np.array([s["total_rss"] for s in warm], dtype=float)
    slope = np.polyfit(t, rss, 1)[0]
    return float(slope * 3600 / rss[0] * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--streams", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "events.jsonl"
        path = Path(tmp) / "soak.json"
        path.write_text(json.dumps(soak_graph(args.streams, out)))
        proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", "-q", str(path),
                                 "--stats", str(Path(tmp) / "stats.json")], stderr=subprocess.PIPE, text=True)
        launcher = psutil.Process(proc.pid)
        samples: list[dict] = []
        seen: dict[int, psutil.Process] = {}  # every process of the graph, to look for leftovers after it exits
        end = time.monotonic() + args.minutes * 60
        print(f"{'t s':>6} {'procs':>5} {'RSS MiB':>8} {'/dev/shm':>8} {'memfds':>6}")
        try:
            time.sleep(min(5.0, args.interval))
            while time.monotonic() < end and proc.poll() is None:
                s = sample(launcher, seen)
                samples.append(s)
                print(f"{s['t'] - samples[0]['t']:>6.0f} {len(s['rss']):>5} {s['total_rss'] / 2**20:>8.1f} "
                      f"{s['dev_shm']:>8} {s['memfds']:>6}", flush=True)
                time.sleep(args.interval)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        deadline = time.monotonic() + 5  # children and the resource tracker go with the launcher
        while any(alive(p) for p in seen.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = json.loads((Path(tmp) / "stats.json").read_text()) if (Path(tmp) / "stats.json").exists() else {}
        frames = stats.get("engines", {}).get("out", {}).get("received", 0)
    result = {"minutes": args.minutes, "samples": len(samples), "frames": frames, "exit_code": proc.returncode,
              "rss_start_mib": round(samples[0]["total_rss"] / 2**20, 1) if samples else None,
              "rss_end_mib": round(samples[-1]["total_rss"] / 2**20, 1) if samples else None,
              "rss_growth_pct_per_hour": round(growth_per_hour(samples), 2),
              "dev_shm_segments": max((s["dev_shm"] for s in samples), default=0),
              "memfds": sorted({s["memfds"] for s in samples}),
              "leftover_processes": sum(alive(p) for p in seen.values()),
              "memfds_after_exit": sum(memfds(p) for p in seen.values() if alive(p))}
    print(f"frames through the graph: {frames}; exit code {proc.returncode}")
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
