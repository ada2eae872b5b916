"""GPU check: decode (NVDEC) → infer (process placement, torch, letterbox: true) → sink, over 4 copies of the
demo video. Run on a GPU machine from the repository root; prints one RESULT line."""
import argparse
import json
import tempfile
from pathlib import Path

from graphflow import graph
from graphflow import runtime

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    doc = {"engines": {
        "src": {"type": "decode", "params": {"sources": [{"id": f"cam{i}", "uri": "graphs/data/demo.mp4", "hwaccel": "cuda"} for i in range(4)]}},
        "det": {"type": "infer", "placement": "process", "params": {"backend": "torch", "letterbox": True, "max_batch": 8, "max_wait_ms": 20}},
        "out": {"type": "sink", "params": {"path": str(out)}}},
        "connections": [["src.out", "det.in"], ["det.out", "out.in"]]}
    s = runtime.run(graph.build(doc, "gpu-fused"), handle_signals=False)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    labels = {}
    for r in rows:
        for d in r["detections"]:
            labels[d["label"]] = labels.get(d["label"], 0) + 1
    print("RESULT", json.dumps({"failed": s.failed, "errors": s.errors, "frames": len(rows), "wall_s": round(s.wall_s, 2),
                                "labels": labels, "det": {k: s.stats["det"]["metrics"].get(k) for k in ("mean_batch", "busy_fraction", "p95_ms")}}))
