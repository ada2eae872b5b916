"""Per-frame cost of the detections hot path: infer's packaging → track → rule → publish's JSON line, plus the hop
a frame's metadata makes between two processes (channel encode + decode), for --objects objects a frame (50).

Usage: python bench/detections.py [--before DIR] [--objects 50] [--rounds 2] [--frames 300] [--quick]
Each tree is timed in its own child process running the real code of that tree: graphflow.vision.detect's
finish_candidates, the track, rule and publish engines through graphflow.testing.run_engine, graphflow.runtime.links's
encode/decode. `--before DIR` is a checkout of another commit (e.g. the list-of-dicts contract) timed the same way
(PYTHONPATH=DIR; the table shows the graphflow each child imported); the children alternate old, new, old, new …
for `--rounds` rounds and each stage keeps its best time (the least disturbed by other load). The scene: people
walking on a 1280x720 frame, all kept by NMS and all tracked. Prints a table with the new/old ratio and a final
`RESULT {json}` line. Without `--before` only this tree is timed, also with lists of dicts sent into track and rule
(what a user's engine may send).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OBJECTS = 50
WIDTH, HEIGHT = 1280, 720
INFO = {"scale": 0.5, "pad": [0, 140], "input": [640, 640]}  # 1280x720 letterboxed into 640x640
RULES = [{"id": "door", "kind": "line_cross", "line": [[0, 0.5], [1, 0.5]]},
         {"id": "yard", "kind": "zone", "polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}]
STAGES = ("infer packaging", "track", "rule", "publish jsonl", "process hop")


def candidates(frame: int, objects: int = OBJECTS) -> np.ndarray:
    """Frame `frame`'s detector candidates [objects, 6] in model-input pixels: people on a grid 10 wide, each
    walking 2 px a frame (diagonally), apart enough that NMS keeps every one."""
    i = np.arange(objects)
    x = 20 + (i % 10) * 120 + 2 * frame % 100
    y = 20 + (i // 10) * 130 + frame % 60
    boxes = np.stack([x, y, x + 40, y + 90], axis=1) * INFO["scale"] + [0, 140, 0, 140]
    scores = 0.6 + 0.3 * ((i * 7 + frame) % 10) / 10
    return np.concatenate([boxes, scores[:, None], np.zeros((objects, 1))], axis=1).astype(np.float32)


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The shortest of `repeats` timed calls of `fn` (seconds) and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def child(frames: int, repeats: int, objects: int) -> dict[str, Any]:
    """Time each stage over `frames` frames in this process's graphflow; µs per frame."""
    import graphflow
    from graphflow import Message
    from graphflow.runtime.links import decode, encode
    from graphflow.testing import run_engine
    from graphflow.vision.detect import DetectParams, finish_candidates

    typed = hasattr(graphflow, "Detections")
    if typed:
        from graphflow.engines.publish import Publish
        from graphflow.engines.rule import Rule
        from graphflow.engines.track import Track
    else:  # a tree from before the engines were installed as graphflow.engines
        from engines.publish import Publish
        from engines.rule import Rule
        from engines.track import Track
    labels = ["person"] + [f"class{i}" for i in range(1, 80)]
    params = DetectParams()
    cands = [candidates(f, objects) for f in range(frames)]
    size = (WIDTH, HEIGHT)
    us: dict[str, float] = {}

    def package() -> list:
        return [finish_candidates(c, INFO, size, labels, params) for c in cands]

    seconds, dets = best(package, repeats)
    us["infer packaging"] = seconds / frames * 1e6
    base = {"width": WIDTH, "height": HEIGHT}
    inputs = {"": [Message("cam", f, f / 10, {**base, "detections": d}) for f, d in enumerate(dets)]}
    if typed:
        inputs[" (dicts in)"] = [Message("cam", f, f / 10, {**base, "detections": d.to_dicts()})
                                 for f, d in enumerate(dets)]
    tracked: list = []
    for suffix, msgs in inputs.items():
        seconds, out = best(lambda: run_engine(Track, {}, msgs)["out"], repeats)
        us["track" + suffix] = seconds / frames * 1e6
        tracked = tracked or out
    objects = sum(len(m.data["tracks"]) for m in tracked) / frames
    rule_inputs = {"": tracked}
    if typed:
        rule_inputs[" (dicts in)"] = [Message(m.stream, m.seq, m.pts, {**m.data, "tracks": m.data["tracks"].to_dicts()})
                                      for m in tracked]
    ruled: list = []
    for suffix, msgs in rule_inputs.items():
        seconds, out = best(lambda: run_engine(Rule, {"rules": RULES}, msgs)["out"], repeats)
        us["rule" + suffix] = seconds / frames * 1e6
        ruled = ruled or out
    with tempfile.TemporaryDirectory() as tmp:
        sink = {"sinks": [{"kind": "jsonl", "path": str(Path(tmp) / "out.jsonl")}]}
        seconds, _ = best(lambda: run_engine(Publish, sink, ruled), repeats)
        us["publish jsonl"] = seconds / frames * 1e6
        line = (Path(tmp) / "out.jsonl").read_text().splitlines()[frames // 2]
    seconds, _ = best(lambda: [decode(encode(m)) for m in ruled], repeats)
    us["process hop"] = seconds / frames * 1e6
    events = sum(len(m.data["events"]) for m in ruled)
    return {"graphflow": graphflow.__file__, "us": us, "tracked_per_frame": objects, "events": events,
            "line_bytes": len(line)}


def run_child(tree: Path, frames: int, repeats: int, objects: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--frames", str(frames),
                           "--repeats", str(repeats), "--objects", str(objects)], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench/detections.py: the child for {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="checkout of another commit to compare with")
    parser.add_argument("--rounds", type=int, default=2, help="children per tree, alternating")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--objects", type=int, default=OBJECTS, help="objects a frame")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the frames in each child")
    parser.add_argument("--quick", action="store_true", help="60 frames, 3 passes, one round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.frames, args.repeats, args.rounds = 60, 3, 1
    if args.child:
        print(json.dumps(child(args.frames, args.repeats, args.objects)))
        return
    trees = {"new": ROOT} if args.before is None else {"old": args.before.resolve(), "new": ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run_child(tree, args.frames, args.repeats, args.objects))
    stages = {name: {stage: min(r["us"][stage] for r in rs) for stage in rs[0]["us"]} for name, rs in runs.items()}
    for name, rs in runs.items():
        first = rs[0]
        print(f"{name}: graphflow from {first['graphflow']}; {first['tracked_per_frame']:.1f} tracks a frame, "
              f"{first['events']} events, a JSON line of {first['line_bytes']} bytes")
    print(f"\n{args.objects} objects a frame, {args.frames} frames, best of {args.repeats} passes x {args.rounds} rounds; "
          "µs per frame")
    print(f"  {'stage':<24}" + "".join(f"{name:>10}" for name in trees) + ("  new/old" if "old" in trees else ""))
    names = list(stages["new"])
    totals = {name: sum(s[stage] for stage in STAGES) for name, s in stages.items()}
    for stage in [*names, "total"]:
        values = {name: totals[name] if stage == "total" else stages[name].get(stage) for name in trees}
        cells = "".join(f"{v:>10.1f}" if v is not None else f"{'':>10}" for v in values.values())
        ratio = (f"  {values['new'] / values['old']:.2f}" if "old" in trees and values.get("old") is not None
                 else "")
        print(f"  {stage:<24}{cells}{ratio}")
    result: dict[str, Any] = {"objects": args.objects, "frames": args.frames, "us_per_frame": stages, "total_us": totals}
    if "old" in trees:
        result["ratio_new_old"] = {stage: round(stages["new"][stage] / stages["old"][stage], 3) for stage in STAGES}
        result["ratio_new_old"]["total"] = round(totals["new"] / totals["old"], 3)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
