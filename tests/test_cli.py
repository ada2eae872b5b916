"""CLI: inspect renders text/DOT/PNG, engines lists built-ins with params, launch runs an example graph."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphflow", *args], capture_output=True, text=True, cwd=cwd)


def test_inspect_text_dot_png(tmp_path):
    demo = str(ROOT / "graphs/demo.json")
    text = gf("inspect", demo)
    assert text.returncode == 0, text.stderr
    assert "det [infer, process]" in text.stdout and "out ──block/8──> trk.in" in text.stdout
    dot = gf("inspect", demo, "--format", "dot")
    assert dot.stdout.startswith('digraph "demo"') and '"src" -> "pre"' in dot.stdout
    shards = gf("inspect", str(ROOT / "graphs/shards.json"), "--format", "dot").stdout
    assert 'subgraph cluster_0 { label="process:a";' in shards and '"src_a" -> "det_a" [label="out→in' in shards
    assert shards.index('label="process:b"') < shards.index('"det_b" [label=') < shards.index('"src_a" -> "det_a"')
    png = tmp_path / "g.png"
    assert gf("inspect", demo, "--format", "png", "-o", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = gf("inspect", demo, "--format", "png")
    assert missing.returncode == 2 and "PNG needs -o FILE" in missing.stderr


def test_engines_lists_builtins_with_params():
    out = gf("engines")
    assert out.returncode == 0
    for name in ("source", "map", "sink", "decode", "preprocess", "infer", "track", "rule"):
        assert f"\n{name}  — " in "\n" + out.stdout
    assert "count: int (default 100, ≥ 0)" in out.stdout


def test_launch_counter_example_from_its_directory(tmp_path):
    out = gf("launch", "-q", str(ROOT / "graphs/counter.json"), "--set", "src.count=20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "counter.jsonl").read_text().splitlines()]
    assert sorted(r["value"] for r in rows if r["stream"] == "s1") == [2 * i for i in range(20)]
    assert "all sources finished" in out.stderr
