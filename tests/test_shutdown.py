"""Ctrl-C on `graphflow launch`: the first SIGINT drains (every frame the decoder read is written or counted
as dropped), the process ends in bounded time; a second SIGINT forces the exit at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "graphs" / "data" / "demo.mp4"
SLOW = '''
import time
from graphflow import Engine, Param

class Slow(Engine):
    """Sleeps `delay` seconds per message, then passes it on: a stand-in for a heavy model."""
    delay = Param(float, 0.01)

    def process(self, msg):
        time.sleep(self.delay)
        self.send(msg)
'''


def launch(tmp_path: Path, doc: dict) -> tuple[subprocess.Popen, Path]:
    """Start `graphflow launch --stats` on `doc` in its own process group (as a shell job is), with the
    Slow engine importable; return the process and the stats file it will write."""
    (tmp_path / "slowengine.py").write_text(SLOW)
    graph, stats = tmp_path / "graph.json", tmp_path / "stats.json"
    graph.write_text(json.dumps(doc))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", "-q", str(graph), "--stats", str(stats)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    return proc, stats


def wait_for_lines(proc: subprocess.Popen, path: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count("\n") >= count):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path.name} never reached {count} lines"
        time.sleep(0.05)


def streams_of(path: Path) -> Counter:
    lines = path.read_text().splitlines()
    assert all(line.endswith("}") for line in lines), "a line was cut short"
    return Counter(json.loads(line)["stream"] for line in lines)


def looping_sources() -> list[dict]:
    return [{"id": "a", "uri": str(DEMO), "loop": True}, {"id": "b", "uri": str(DEMO), "loop": True, "fps": 10}]


def test_first_sigint_drains_every_frame_read_into_outputs_or_drop_counts(tmp_path):
    keep, lossy = tmp_path / "keep.jsonl", tmp_path / "lossy.jsonl"
    doc = {"engines": {
        "src": {"type": "decode", "params": {"sources": looping_sources()}},
        "slow": {"type": "slowengine:Slow", "placement": "process", "params": {"delay": 0.004}},
        "keep": {"type": "sink", "params": {"path": str(keep), "times": False}},
        "slower": {"type": "slowengine:Slow", "params": {"delay": 0.03}},
        "lossy": {"type": "sink", "params": {"path": str(lossy), "times": False}}},
        "connections": [["src", "slow"], ["slow", "keep"],
                        {"from": "src", "to": "slower", "policy": "drop_oldest", "capacity": 2}, ["slower", "lossy"]]}
    proc, stats_path = launch(tmp_path, doc)
    wait_for_lines(proc, keep, 100)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    drain_s = time.monotonic() - t0
    assert proc.returncode == 0, err
    assert "stopped by SIGINT" in err and "Traceback" not in err, err
    assert drain_s < 10, f"drain took {drain_s:.1f}s"
    stats = json.loads(stats_path.read_text())["engines"]
    sent = stats["src"]["streams"]
    assert set(sent) == {"a", "b"} and min(sent.values()) > 10
    assert streams_of(keep) == sent, "block edges lose nothing: every frame sent was written"
    slower = stats["slower"]
    assert slower["dropped"] > 0, "the slower consumer should have dropped frames"
    assert slower["received"] + slower["dropped"] == sum(sent.values()), "each frame was processed or counted dropped"
    assert streams_of(lossy) == slower["streams"], "what the slower engine took in reached its sink"
    for stream, source in stats["src"]["metrics"]["sources"].items():
        assert source["kept"] == sent[stream] + source["discarded"], f"{stream}: decoded frames not accounted for"
        assert source["state"] == "stopped"


def test_second_sigint_forces_a_quick_exit(tmp_path):
    out = tmp_path / "out.jsonl"
    doc = {"settings": {"shutdown_timeout": 60},
           "engines": {
               "src": {"type": "decode", "params": {"sources": looping_sources()}},
               "slow": {"type": "slowengine:Slow", "placement": "process", "params": {"delay": 0.5}},
               "out": {"type": "sink", "params": {"path": str(out)}}},
           "connections": [{"from": "src", "to": "slow", "capacity": 30}, ["slow", "out"]]}
    proc, _ = launch(tmp_path, doc)
    wait_for_lines(proc, out, 2)
    time.sleep(0.5)  # let the slow engine's queue fill: draining it would take ~15 s
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None, "the first SIGINT should still be draining"
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5, "a second SIGINT must not wait for the drain"
    assert proc.returncode == 1, err
    assert "stopped by SIGINT (forced)" in err, err


def test_sighup_drains_like_sigint(tmp_path):
    """A closed terminal sends SIGHUP to the whole job: the run drains and writes everything, as on Ctrl-C."""
    keep = tmp_path / "keep.jsonl"
    doc = {"engines": {
        "src": {"type": "decode", "params": {"sources": looping_sources()}},
        "slow": {"type": "slowengine:Slow", "placement": "process", "params": {"delay": 0.004}},
        "keep": {"type": "sink", "params": {"path": str(keep), "times": False}}},
        "connections": [["src", "slow"], ["slow", "keep"]]}
    proc, stats_path = launch(tmp_path, doc)
    wait_for_lines(proc, keep, 50)
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped by SIGHUP" in err and "Traceback" not in err, err
    sent = json.loads(stats_path.read_text())["engines"]["src"]["streams"]
    assert streams_of(keep) == sent, "every frame sent was written"
