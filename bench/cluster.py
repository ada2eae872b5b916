"""Cluster placement: what one `graphflow.cluster.placement.Coordinator` handles, with simulated replicas (no Ray, no video).

Usage: python bench/cluster.py [--replicas 1000] [--streams-per-replica 64] [--capacity 80] [--seed 0]
Phases, each timed on its own (memory in a separate pass, since tracemalloc slows everything):
- place: `replicas × streams-per-replica` streams added one by one; 1 in 10 asks for a GPU node (1 replica in 4
  has a GPU), the rest for any node; decisions per second.
- baseline: the same decisions made by scanning every replica (no heaps), on a sample: the ratio to it is what the
  heaps buy at this scale.
- reports: every replica reports a new infer busy share (one polling round of the front); rounds per second.
- loss: replicas with 64 streams each lost one after another; time to re-place one replica's streams (median, max).
- churn: remove and re-add streams; operations per second.
- memory: tracemalloc's current and peak for the coordinator holding every stream.
Prints a table and a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graphflow.cluster.placement import Coordinator, ReplicaLoad  # noqa: E402


def build(replicas: int, capacity: int) -> Coordinator:
    c = Coordinator()
    for i in range(replicas):
        c.add_replica(f"r{i:05d}", capacity, {"gpu": i % 4 == 0, "zone": f"z{i % 8}"})
    return c


def wants(n: int, seed: int) -> list[dict[str, bool] | None]:
    rng = random.Random(seed)
    return [{"gpu": True} if rng.random() < 0.1 else None for _ in range(n)]


def scan_place(replicas: list[ReplicaLoad], want: dict[str, bool] | None) -> ReplicaLoad:
    """The baseline: look at every replica for each decision."""
    best = None
    for r in replicas:
        if r.has_room() and all(r.labels.get(k) == v for k, v in (want or {}).items()):
            if best is None or (r.score(), r.id) < (best.score(), best.id):
                best = r
    assert best is not None
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--streams-per-replica", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=80, help="declared capacity of each replica")
    ap.add_argument("--baseline-sample", type=int, default=2000, help="decisions timed for the scanning baseline")
    ap.add_argument("--losses", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.replicas * args.streams_per_replica
    asks = wants(n, args.seed)

    c = build(args.replicas, args.capacity)
    t0 = time.perf_counter()
    for i, want in enumerate(asks):
        c.place(f"s{i}", want)
    place_s = time.perf_counter() - t0
    placed = [len(r.streams) for r in c.replicas.values()]

    base = build(args.replicas, args.capacity)
    sample = asks[:args.baseline_sample]
    rows = list(base.replicas.values())
    t0 = time.perf_counter()
    for i, want in enumerate(sample):
        r = scan_place(rows, want)
        r.streams.add(f"s{i}")
    scan_s = time.perf_counter() - t0

    rng = random.Random(args.seed)
    rounds = 5
    t0 = time.perf_counter()
    for _ in range(rounds):
        for rid in list(c.replicas):
            c.update_load(rid, rng.random() * 0.8)
    report_s = (time.perf_counter() - t0) / rounds

    full = sorted(rid for rid, r in c.replicas.items() if len(r.streams) == args.streams_per_replica)
    loss_ms, waiting = [], 0
    for rid in full:
        if len(loss_ms) == args.losses:
            break
        if len(c.replicas[rid].streams) != args.streams_per_replica:
            continue  # took streams of an earlier loss
        t0 = time.perf_counter()
        moved = c.lose_replica(rid)
        loss_ms.append((time.perf_counter() - t0) * 1e3)
        waiting += sum(r is None for r in moved.values())
    assert len(c.where) + len(c.pending) == n, "every stream is placed or waiting, none twice"

    churn = min(20_000, n)
    ids = sorted(c.where)[:churn]
    t0 = time.perf_counter()
    for sid in ids:
        want = c.wants[sid]
        c.remove(sid)
        c.place(sid, dict(want))
    churn_s = time.perf_counter() - t0

    tracemalloc.start()
    m = build(args.replicas, args.capacity)
    for i, want in enumerate(asks):
        m.place(f"s{i}", want)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = {
        "replicas": args.replicas, "streams": n, "capacity": args.capacity,
        "placements_per_s": round(n / place_s), "scan_baseline_placements_per_s": round(len(sample) / scan_s),
        "placement_speedup_vs_scan": round((n / place_s) / (len(sample) / scan_s), 1),
        "streams_per_replica_min_max": [min(placed), max(placed)],
        "load_report_round_ms": round(report_s * 1e3, 2),
        "replace_64_streams_ms_median": round(statistics.median(loss_ms), 3),
        "replace_64_streams_ms_max": round(max(loss_ms), 3), "losses": len(loss_ms), "left_waiting": waiting,
        "churn_ops_per_s": round(2 * churn / churn_s),
        "memory_mb": round(current / 2**20, 1), "memory_peak_mb": round(peak / 2**20, 1),
        "bytes_per_stream": round(current / n),
    }
    table = [
        ("placement decisions / s", f"{result['placements_per_s']:,}"),
        ("  scanning every replica (baseline)", f"{result['scan_baseline_placements_per_s']:,}"),
        ("  speed-up", f"{result['placement_speedup_vs_scan']}×"),
        ("streams per replica (min, max)", f"{min(placed)}, {max(placed)}"),
        (f"one load report from each of {args.replicas} replicas", f"{result['load_report_round_ms']} ms"),
        (f"re-place {args.streams_per_replica} streams of a lost replica (median, max)",
         f"{result['replace_64_streams_ms_median']} ms, {result['replace_64_streams_ms_max']} ms"),
        ("remove + add / s", f"{result['churn_ops_per_s']:,}"),
        (f"coordinator memory with {n:,} streams (peak)", f"{result['memory_mb']} MB ({result['memory_peak_mb']} MB)"),
    ]
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"{key:<{width}}  {value}")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
