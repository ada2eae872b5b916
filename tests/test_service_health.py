"""Health that tells the truth, through a real `graphflow serve`: an engine process SIGKILLed (found with psutil)
shows in /readyz, /healthz, the streams' state and graphflow_engine_up; the service restarts it per its policy,
or stays up not ready, refusing new streams, and exits non-zero when stopped."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from test_service import DEMO, Server, wait_for

prometheus = pytest.importorskip("prometheus_client.parser")

PASS = '''
def same(msg):
    return msg
'''


def site_with(tmp_path: Path, mid: dict[str, Any]) -> Path:
    """A service graph decode (thread) → mid (a process `map`) → the service's tap."""
    (tmp_path / "passmod.py").write_text(PASS)
    graph = {"engines": {"src": {"type": "decode", "params": {"sources": []}},
                         "mid": {"type": "map", "placement": "process", "params": {"function": "passmod:same"}, **mid}},
             "connections": [["src.out", "mid.in"]], "settings": {"shutdown_timeout": 5, "stats_interval": 0.2}}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    shutil.copy(DEMO, tmp_path / "clip.mp4")
    return tmp_path


def engine_pid(server: Server) -> int:
    """The service's one engine process (multiprocessing's spawn starts it)."""
    kids = [c for c in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(kids) == 1, kids
    return kids[0].pid


def engine_up(server: Server) -> dict[str, float]:
    text = server.call("GET", "/metrics")[1]
    families = {f.name: f for f in prometheus.text_string_to_metric_families(text)}
    return {s.labels["engine"]: s.value for s in families["graphflow_engine_up"].samples}


def running_stream(server: Server, site: Path, stream: str = "cam1") -> None:
    spec = {"id": stream, "uri": str(site / "clip.mp4"), "fps": 10, "loop": True, "realtime": True}
    assert server.call("POST", "/streams", spec)[0] == 201
    wait_for(lambda: server.call("GET", f"/streams/{stream}")[1]["frames"] > 3, what="frames at the tap")


def test_an_engine_gone_for_good_makes_the_service_not_ready_and_it_exits_non_zero(tmp_path: Path):
    site = site_with(tmp_path, {})
    server = Server(site, "--stats", str(tmp_path / "stats.json"))
    try:
        running_stream(server, site)
        assert server.call("GET", "/readyz") == (200, {"ready": True})
        assert engine_up(server) == {"src": 1.0, "mid": 1.0}
        pid = engine_pid(server)
        os.kill(pid, signal.SIGKILL)

        status, body = wait_for(lambda: (r := server.call("GET", "/readyz"))[0] == 503 and r, what="not ready")
        assert body["ready"] is False and "engine 'mid'" in body["reason"] and "SIGKILL" in body["reason"]
        assert "not restarted" in body["reason"]
        status, body = server.call("GET", "/healthz")
        assert status == 503 and "engine 'mid'" in body["reason"]
        cam = server.call("GET", "/streams/cam1")[1]
        assert cam["state"] == "failed" and "engine 'mid'" in cam["error"]
        assert engine_up(server) == {"src": 1.0, "mid": 0.0}
        # a new stream would get no frame: refused, with the reason
        status, body = server.call("POST", "/streams", {"id": "cam2", "uri": str(site / "clip.mp4")})
        assert status == 503 and "engine 'mid'" in body["error"] and "\n" not in body["error"]
        assert [s["id"] for s in server.call("GET", "/streams")[1]] == ["cam1"]
    finally:
        code = server.stop()
    log = server.log.read_text()
    assert code == 1, log
    assert f"engine 'mid' (process {pid}) died: killed by SIGKILL" in log
    stats = json.loads((tmp_path / "stats.json").read_text())  # serve --stats: the run's summary, as launch's
    assert stats["exit_code"] == 1 and stats["engines"]["mid"]["state"] == "died" and stats["failed"]


def test_an_engine_with_restart_on_failure_comes_back_and_the_service_is_ready_again(tmp_path: Path):
    site = site_with(tmp_path, {"restart": "on-failure"})
    server = Server(site)
    try:
        running_stream(server, site)
        os.kill(engine_pid(server), signal.SIGKILL)
        status, body = wait_for(lambda: (r := server.call("GET", "/readyz"))[0] == 503 and r, what="restarting")
        assert "engine 'mid'" in body["reason"] and "restarting (1/3)" in body["reason"]
        assert server.call("GET", "/healthz")[0] == 200  # restarting is not broken
        wait_for(lambda: server.call("GET", "/readyz")[0] == 200, what="ready again")
        frames = server.call("GET", "/streams/cam1")[1]["frames"]
        wait_for(lambda: server.call("GET", "/streams/cam1")[1]["frames"] > frames + 5, what="frames again")
        # frames dropped while it was down make it `lagging` for a few seconds, then it is running again
        wait_for(lambda: server.call("GET", "/streams/cam1")[1]["state"] == "running", what="running again")
        assert engine_up(server) == {"src": 1.0, "mid": 1.0}
        running_stream(server, site, "cam2")
    finally:
        code = server.stop()
    assert code == 3, server.log.read_text()  # recovered; the death is counted as an error


SLOW = '''
import time
from pathlib import Path

from graphflow import Engine, Param


class Slow(Engine):
    """Passes frames on, with no tracks, after the delay (seconds) written in the file `delay`, read per frame."""
    delay = Param(str)

    def process(self, msg):
        time.sleep(float(Path(self.delay).read_text()))
        msg.data["tracks"] = []  # for the rule engine after it, which the service's tap listens to
        self.send(msg)
'''


def test_a_stream_the_graph_cannot_keep_up_with_drops_frames_and_shows_lagging(tmp_path: Path):
    """A 25 fps live stream (a file at its pace) into an engine doing 5 fps: the service's source connection drops
    the oldest frames (the graph gives no policy), so latency stays bounded; the stream shows `lagging` (API,
    metric, one log line) until the engine is fast again."""
    (tmp_path / "slowmod.py").write_text(SLOW)
    delay = tmp_path / "delay"
    delay.write_text("0.2")
    graph = {"engines": {"src": {"type": "decode", "params": {"sources": []}},
                         "slow": {"type": "slowmod:Slow", "params": {"delay": str(delay)}},
                         "zone": {"type": "rule", "params": {"rules": []}}},
             "connections": [["src", "slow"], ["slow", "zone"]], "settings": {"shutdown_timeout": 5, "stats_interval": 0.2}}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    shutil.copy(DEMO, tmp_path / "clip.mp4")
    server = Server(tmp_path)
    try:
        spec = {"id": "cam", "uri": str(tmp_path / "clip.mp4"), "loop": True, "realtime": True}
        assert server.call("POST", "/streams", spec)[0] == 201
        cam = wait_for(lambda: (s := server.call("GET", "/streams/cam")[1])["state"] == "lagging" and s,
                       what="lagging")
        wait_for(lambda: server.call("GET", "/streams/cam")[1]["frames"] > 40, timeout=60, what="8 s of frames")
        cam = server.call("GET", "/streams/cam")[1]
        # 8 s behind a 5 fps engine with `block` would be ~6 s late and growing; dropped, it stays within the
        # queue's 8 frames (1.6 s) and the engine's own frame
        assert cam["state"] == "lagging" and cam["drops"] > 50 and cam["latency_ms"]["p95"] < 3000, cam
        text = server.call("GET", "/metrics")[1]
        families = {f.name: f for f in prometheus.text_string_to_metric_families(text)}
        assert [s.value for s in families["graphflow_stream_lagging"].samples if s.labels["stream"] == "cam"] == [1]
        assert [s.value for s in families["graphflow_stream_drops"].samples if s.name.endswith("_total")][0] > 50

        delay.write_text("0")
        wait_for(lambda: server.call("GET", "/streams/cam")[1]["state"] == "running", timeout=30, what="keeps up")
    finally:
        code = server.stop()
    log = server.log.read_text()
    assert code == 0, log  # drops by a policy are not losses
    assert log.count("stream 'cam' is lagging") == 1 and log.count("stream 'cam' keeps up again") == 1, log
