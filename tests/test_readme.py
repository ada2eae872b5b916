"""The README's Engine example really runs, inside the demo graph as the README says."""
import json
import re
from pathlib import Path

from graphflow import graph, runtime

ROOT = Path(__file__).resolve().parents[1]


def test_readme_engine_example_runs_in_the_demo_graph(tmp_path, user_module):
    source = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    user_module("myengines", source)
    doc = json.loads((ROOT / "graphs/demo.json").read_text())
    doc["engines"]["src"]["params"]["sources"][0].update(uri=str(ROOT / "graphs/data/demo.mp4"), max_frames=12)
    doc["engines"]["out"]["params"]["sinks"] = [{"kind": "jsonl", "path": str(tmp_path / "out.jsonl")}]
    doc["engines"]["count"] = {"type": "myengines:CountPeople"}
    doc["connections"] = [c for c in doc["connections"] if c != ["det.out", "trk.in"]]
    doc["connections"] += [["det.out", "count.in"], ["count.out", "trk.in"]]
    summary = runtime.run(graph.build(doc, "demo.json"))
    assert summary.exit_code == 0, summary.errors
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    frames = [r for r in rows if "people" in r]
    assert len(frames) == 12
    assert all(r["people"] == sum(d["label"] == "person" for d in r["detections"]) for r in frames)
    assert sum(r["people"] for r in frames) > 0
