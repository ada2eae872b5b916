"""OCR on the made sign video: accuracy against its ground truth, crops inferred with and without per-track reuse,
and the recogniser batched against one crop at a time — all in the same run.

Usage: python bench/ocr.py [--frames 80] [--interval 10] [--grow 1.5] [--crops 16] [--repeat 5]
Runs graphs/ocr.json's engines (decode → textdet → track → secondary with PP-OCRv4 from rapidocr-onnxruntime) on
graphs/data/ocr/signs.mp4 twice: re-reading each track every frame, then only every --interval frames (or when its
box grows by --grow). Accuracy per sign per frame against signs.json: exact string (spaces dropped, "·" and "-"
alike) and character accuracy (1 − edit distance / length). Then the recogniser alone on --crops crops of the video:
in batches of 1 (one at a time), 4 and --crops. Prints a table and a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphflow.engines.decode import Decode  # noqa: E402
from graphflow.engines.secondary import Secondary  # noqa: E402
from graphflow.engines.textdet import TextDet  # noqa: E402
from graphflow.engines.track import Track  # noqa: E402
from graphflow.testing import run_engine, run_source  # noqa: E402
from graphflow.vision.crops import crop_tensor  # noqa: E402
from graphflow.vision.ocr import read_signs, text_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRAPH = json.loads((ROOT / "graphs/ocr.json").read_text())
VIDEO = ROOT / "graphs/data/ocr/signs.mp4"
TRUTH = json.loads((ROOT / "graphs/data/ocr/signs.json").read_text())["frames"]


def params(engine: str) -> dict:
    return dict(GRAPH["engines"][engine].get("params", {}))


def tracked(frames: int) -> list:
    """The video's frames through decode → textdet → track, as the graph runs them."""
    msgs = run_source(Decode, {"sources": [{"id": "signs", "uri": str(VIDEO), "max_frames": frames}]})
    msgs = run_engine(TextDet, params("text"), msgs)["out"]
    return run_engine(Track, params("trk"), msgs)["out"]


def read(frames: list, **overrides) -> tuple[dict, dict, float]:
    """Secondary over the tracked frames: (accuracy, its metrics, seconds)."""
    engine = Secondary("read", {**params("read"), **overrides})
    t0 = time.perf_counter()
    out = run_engine(engine, messages=frames)["out"]
    seconds = time.perf_counter() - t0
    pairs = [p for msg in out for p in read_signs(TRUTH[msg.seq]["signs"], msg.data["tracks"])]
    return text_accuracy(pairs), engine.metrics(), seconds


def batched_vs_single(frames: list, count: int, repeat: int) -> dict:
    """ms per crop of the recogniser on `count` crops run in batches of 1 (one at a time), 4 and `count`, the sizes
    interleaved round by round (median of `repeat` rounds)."""
    engine = Secondary("read", params("read"))
    engine.check()
    engine.setup()
    sizes = sorted({1, min(4, count), count})
    try:
        boxes = [(m.arrays["image"], t["box"]) for m in frames for t in m.data["tracks"]][:count]
        crops = np.stack([crop_tensor(image, box, engine.crop) for image, box in boxes])
        run = lambda batch: engine.session.run(None, {engine.input_name: batch})  # noqa: E731
        run(crops)
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(repeat):
            for n in sizes:
                t0 = time.perf_counter()
                for i in range(0, len(crops), n):
                    run(crops[i:i + n])
                times[n].append(time.perf_counter() - t0)
    finally:
        engine.teardown()
    ms = {n: float(np.median(v)) * 1e3 / len(crops) for n, v in times.items()}
    return {"crops": len(crops), "ms_per_crop_by_batch": {str(n): round(v, 2) for n, v in ms.items()},
            "batch_speedup": {str(n): round(ms[1] / v, 2) for n, v in ms.items() if n > 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--interval", type=int, default=params("read").get("interval", 10))
    ap.add_argument("--grow", type=float, default=params("read").get("grow", 1.5))
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    frames = tracked(args.frames)
    rows = {"every frame": read(frames, interval=0, grow=0.0),
            f"reuse (interval {args.interval}, grow {args.grow})": read(frames, interval=args.interval, grow=args.grow)}
    print(f"{'secondary':32} {'signs':>6} {'exact':>6} {'chars':>6} {'crops':>6} {'crops/frame':>11} {'s':>6}")
    result: dict = {"frames": len(frames)}
    for (name, (acc, metrics, seconds)), key in zip(rows.items(), ("every_frame", "reuse")):
        per_frame = metrics["crops_inferred"] / len(frames)
        print(f"{name:32} {acc['signs']:>6} {acc['exact']:>6.3f} {acc['chars']:>6.3f} {metrics['crops_inferred']:>6} "
              f"{per_frame:>11.2f} {seconds:>6.2f}")
        result[key] = {**acc, "crops": metrics["crops_inferred"], "crops_per_frame": round(per_frame, 3),
                       "seconds": round(seconds, 2)}
    result["reuse_crop_ratio"] = round(result["every_frame"]["crops"] / max(result["reuse"]["crops"], 1), 2)
    result["batching"] = batched_vs_single(frames, args.crops, args.repeat)
    b = result["batching"]
    print(f"recogniser on {b['crops']} crops, ms/crop by batch size: {b['ms_per_crop_by_batch']}; "
          f"speed-up over one at a time: {b['batch_speedup']}")
    print(f"crops inferred, every frame / reuse: {result['reuse_crop_ratio']}x")
    print("RESULT " + json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
