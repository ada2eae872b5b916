"""Per-hop latency of a small message through a chain of relay engines, thread vs process placement.

Usage: python bench/hop.py [--hops 4] [--count 400] [--rate 400]
Prints a table and a final `RESULT {json}` line; ratios are against thread placement in the same run."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from graphflow import graph
from graphflow import runtime


def chain(hops: int, placement: str, count: int, rate: float, out: Path, shape: list[int]) -> dict:
    engines = {"src": {"type": "source", "params": {"count": count, "rate": rate, "shape": shape}}}
    conns = []
    prev = "src"
    for i in range(hops):
        engines[f"r{i}"] = {"type": "map", "placement": placement, "params": {"function": "graphflow.examples:identity"}}
        conns.append([prev, f"r{i}"])
        prev = f"r{i}"
    engines["out"] = {"type": "sink", "params": {"path": str(out)}}
    conns.append([prev, "out"])
    return {"name": f"hop-{placement}", "engines": engines, "connections": conns}


def measure(hops: int, placement: str, count: int, rate: float, shape: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        g = graph.build(chain(hops, placement, count, rate, out, shape), f"hop-{placement}")
        runtime.run(g, handle_signals=False)
        rows = [json.loads(line)["times"] for line in out.read_text().splitlines()]
    warm = rows[len(rows) // 10:]
    per_hop = [(t[f"r{hops - 1}"] - t["src"]) / hops * 1e6 for t in warm]
    return {"placement": placement, "n": len(rows), "p50_us": statistics.median(per_hop),
            "p90_us": statistics.quantiles(per_hop, n=10)[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hops", type=int, default=5)
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--rate", type=float, default=100.0)
    args = ap.parse_args()
    results = [measure(args.hops, p, args.count, args.rate, []) for p in ("thread", "process")]
    base = results[0]["p50_us"]
    print(f"{'placement':<10} {'msgs':>6} {'p50 µs/hop':>11} {'p90 µs/hop':>11} {'vs thread':>10}")
    for r in results:
        print(f"{r['placement']:<10} {r['n']:>6} {r['p50_us']:>11.1f} {r['p90_us']:>11.1f} {r['p50_us'] / base:>9.2f}x")
    print("RESULT " + json.dumps({r["placement"]: {k: round(v, 1) if isinstance(v, float) else v
                                                   for k, v in r.items()} for r in results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
