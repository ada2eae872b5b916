"""What one rule costs to check and to run, where hostile input used to stall the engines: a zone's validation for
zones of --points corners (a star, simple), an attribute regex `(a+)+$` on a text of --text a's and a b (Python's
re backtracks exponentially on it, holding the GIL), and one frame of 200 tracks against the largest zone.

Usage: python bench/rules_checks.py [--before DIR] [--rounds 3] [--points 64 256] [--text 20]
Each tree is timed in its own child process (PYTHONPATH=DIR for `--before DIR`, a checkout of another commit,
e.g. `git archive 3cf8b8c | tar -x -C DIR`); the children alternate old, new, old, new … for `--rounds` rounds and
each figure is the median of the rounds. A figure a tree cannot give (a zone above its maximum) shows what it said.
Prints a table with the new/old ratio and a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
W, H = 1000, 500


def star(n: int, cx: float, cy: float, r: float) -> list[list[float]]:
    """A simple n-cornered star, its points alternating between radii r and r/3."""
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.where(np.arange(n) % 2, r / 3, r)
    return np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], 1).round(3).tolist()


def track(tid: int, x: float, y: float, **attributes: Any) -> dict:
    return {"track_id": tid, "box": [x - 20, y - 80, x + 20, y], "score": 0.9, "class_id": 0, "label": "person",
            **({"attributes": attributes} if attributes else {})}


def timed(fn: Any) -> float | str:
    """Seconds `fn` took, or the first line of what it raised."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a tree refusing the input is a result here
        return str(exc).splitlines()[0][:60]
    return time.perf_counter() - t0


def child(points: list[int], text: int) -> dict[str, Any]:
    """This process's graphflow: ms per check or frame."""
    import graphflow
    from graphflow.vision.rules import RuleSet, parse_rules

    out: dict[str, Any] = {"graphflow": str(Path(graphflow.__file__).parent.parent)}
    for n in points:
        t = timed(lambda: parse_rules([{"id": "z", "kind": "zone", "polygon": star(n, 400, 400, 300)}]))
        out[f"validate {n}-point zone"] = t * 1e3 if isinstance(t, float) else t
    rs = RuleSet([{"id": "z", "kind": "zone", "polygon": [[0, 0], [W, 0], [W, H], [0, H]],
                   "attributes": {"text": {"regex": "(a+)+$"}}}])
    t = timed(lambda: rs.evaluate("cam", 0, 0.0, [track(1, 500, 250, text="a" * text + "b")], W, H))
    out[f"regex (a+)+$ on {text + 1} chars"] = t * 1e3 if isinstance(t, float) else t
    biggest = max(points)
    try:
        rs = RuleSet([{"id": "z", "kind": "zone", "polygon": star(biggest, 500, 250, 240)}])
    except Exception as exc:  # noqa: BLE001
        out[f"frame: 200 tracks, {biggest}-point zone"] = str(exc).splitlines()[0][:60]
        return out
    rng = np.random.default_rng(0)
    frames = [[track(t, *xy) for t, xy in enumerate(rng.uniform(0, [W, H], (200, 2)).tolist())] for _ in range(30)]
    t0 = time.perf_counter()
    for f, tracks in enumerate(frames):
        rs.evaluate("cam", f, f / 10, tracks, W, H)
    out[f"frame: 200 tracks, {biggest}-point zone"] = (time.perf_counter() - t0) / len(frames) * 1e3
    return out


def run_child(tree: Path, points: list[int], text: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--text", str(text),
                           "--points", *map(str, points)], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"child for {tree} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="checkout of another commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--text", type=int, default=20, help="a's before the b the regex fails on")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.points, args.text)))
        return
    trees = {"new": ROOT} if args.before is None else {"old": args.before.resolve(), "new": ROOT}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run_child(tree, args.points, args.text))
    result: dict[str, Any] = {}
    for name, rounds in runs.items():
        result[name] = {"graphflow": rounds[0]["graphflow"]}
        for key in rounds[0]:
            if key != "graphflow":
                values = [r[key] for r in rounds]
                numbers = all(isinstance(v, float) for v in values)
                result[name][key] = round(statistics.median(values), 3) if numbers else values[0]
    keys = [k for k in result["new"] if k != "graphflow"]
    print(f"{'ms (median of ' + str(args.rounds) + ')':<36}" + "".join(f"{n:>22}" for n in trees)
          + ("     new/old" if len(trees) == 2 else ""))
    for key in keys:
        cells = [result[n].get(key) for n in trees]
        row = "".join(f"{c:>22.3f}" if isinstance(c, float) else f"{str(c)[:21]:>22}" for c in cells)
        ratio = f"{cells[1] / cells[0]:>12.4f}" if len(cells) == 2 and all(isinstance(c, float) for c in cells) else ""
        print(f"{key:<36}{row}{ratio}")
    for n in trees:
        print(f"{n}: graphflow from {result[n]['graphflow']}")
    print("RESULT " + json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
