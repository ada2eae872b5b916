"""Tasks: several graphs in one real `graphflow serve` on 127.0.0.1, each stream bound to its task; tasks added,
replaced and removed through the API while the other tasks' streams keep running; restored after a restart."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn")

from test_service import DEMO, Server, free_port, wait_for  # noqa: E402

# a task: decode → YOLOX-Nano → ByteTrack → one line-crossing rule (its id tells the task's events apart)
ROOT = Path(__file__).resolve().parents[1]


def people(rule_id: str, x: float = 0.5, conf: float = 0.3) -> dict[str, Any]:
    return {"name": f"people-{rule_id}", "engines": {
        "src": {"type": "decode"},
        "det": {"type": "infer", "params": {"letterbox": True, "conf": conf, "threads": 1}},
        "trk": {"type": "track"},
        "zone": {"type": "rule", "params": {"rules": [
            {"id": rule_id, "kind": "line_cross", "line": [[x, 0.0], [x, 1.0]], "classes": ["person"]}]}}},
        "connections": [["src.out", "det.in"], ["det.out", "trk.in"], ["trk.out", "zone.in"]],
        "settings": {"shutdown_timeout": 10}}


class TaskServer(Server):
    """`graphflow serve` with the graph files `names` (one task each) in `folder`."""

    def __init__(self, folder: Path, names: list[str], *extra: str) -> None:
        self.names = names
        super().__init__(folder, *extra)

    def command(self, folder: Path) -> list[str]:
        return [sys.executable, "-m", "graphflow", "serve", *[str(folder / f"{n}.json") for n in self.names]]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    shutil.copy(DEMO, tmp_path / "clip.mp4")
    (tmp_path / "doors.json").write_text(json.dumps(people("door")))
    (tmp_path / "aisles.json").write_text(json.dumps(people("aisle", x=0.4)))
    return tmp_path


def live(site: Path, stream: str, task: str | None = None) -> dict[str, Any]:
    spec = {"id": stream, "uri": str(site / "clip.mp4"), "fps": 10, "loop": True, "realtime": True}
    return {**spec, "task": task} if task else spec


def rules_seen(server: Server, **query: str) -> set[str]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return {e["event"]["rule"] for e in server.call("GET", f"/events?kind=cross&limit=500&{q}")[1]}


def test_each_task_runs_its_own_engines_and_rules(site: Path):
    server = TaskServer(site, ["doors", "aisles"])
    try:
        tasks = {t["id"]: t for t in server.call("GET", "/tasks")[1]}
        assert set(tasks) == {"doors", "aisles"} and tasks["doors"]["default"] and tasks["aisles"]["ready"]
        assert server.call("POST", "/streams", live(site, "cam1"))[0] == 201  # no task named: the default one
        assert server.call("POST", "/streams", live(site, "cam2", "aisles"))[0] == 201
        assert server.call("GET", "/streams/cam1")[1]["task"] == "doors"
        assert server.call("GET", "/tasks/aisles")[1]["streams"] == ["cam2"]
        wait_for(lambda: rules_seen(server, stream="cam1") and rules_seen(server, stream="cam2"), timeout=90,
                 what="crossings on both streams")
        assert rules_seen(server, stream="cam1") == {"door"} and rules_seen(server, stream="cam2") == {"aisle"}
        assert rules_seen(server, task="aisles") == {"aisle"}
        # both tasks define their detector alike: one model instance batches both tasks' frames
        det = [server.call("GET", f"/tasks/{t}")[1]["engines"]["det"]["stats"] for t in ("doors", "aisles")]
        assert all(d["received"] > 0 for d in det)
        assert [server.call("GET", f"/tasks/{t}")[1]["shared"]["det"] for t in ("doors", "aisles")] == [2, 2]
        status, text = server.call("GET", "/metrics")
        assert status == 200 and 'task="aisles"' in text and 'engine="det",task="doors"' in text
        # a stream moves to the other task: from then on its events are that task's
        assert server.call("PUT", "/streams/cam1", {"task": "aisles"})[1]["task"] == "aisles"
        moved = time.time()
        wait_for(lambda: [e for e in server.call("GET", "/events?stream=cam1&kind=cross&limit=50")[1]
                          if e["ts"] > moved and e["event"]["rule"] == "aisle"], timeout=90, what="cam1 in aisles")
        assert server.call("PUT", "/streams/cam1", {"task": "nope"}) == (400, {"error": "task: no task 'nope' (tasks: "
                                                                                  "aisles, doors)"})
        # a task with streams is not removed unless asked to stop them
        status, error = server.call("DELETE", "/tasks/aisles")
        assert status == 409 and "2 stream(s)" in error["error"]
        assert server.call("DELETE", "/tasks/aisles?stop_streams=true")[0] == 204
        assert server.call("GET", "/streams")[1] == [] and server.call("GET", "/tasks/aisles")[0] == 404
        assert [t["id"] for t in server.call("GET", "/tasks")[1]] == ["doors"]
    finally:
        assert server.stop() in (0, 3)


def test_a_task_from_the_network_is_checked_as_untrusted(site: Path):
    server = TaskServer(site, ["doors"])
    try:
        bad = people("x")
        bad["engines"]["evil"] = {"type": "os:system"}
        bad["connections"].append(["zone.out", "evil.in"])
        status, error = server.call("POST", "/tasks", {"id": "evil", "graph": bad})
        assert status == 400 and "'os:system' is not allowed in restricted mode" in error["error"]
        assert "\n" not in error["error"]
        tap = people("x")
        tap["engines"]["mine"] = {"type": "graphflow.serve.tap:Tap"}
        tap["connections"].append(["zone.out", "mine.in"])
        assert server.call("POST", "/tasks", {"id": "t", "graph": tap})[0] == 400
        two = people("x")
        two["engines"]["src2"] = {"type": "decode"}
        assert "exactly one 'decode' engine" in server.call("POST", "/tasks", {"id": "t", "graph": two})[1]["error"]
        assert server.call("POST", "/tasks", {"id": "../x", "graph": people("x")})[0] == 400
        assert server.call("POST", "/tasks", {"id": "doors", "graph": people("x")})[0] == 409
        assert server.call("POST", "/tasks", {"id": "t"})[0] == 400
        assert [t["id"] for t in server.call("GET", "/tasks")[1]] == ["doors"]
    finally:
        server.stop()


def frame_gaps(server: Server, stream: str, stop: threading.Event, out: list[float]) -> None:
    """Longest time between two polls of `stream` that saw its frame count rise, until `stop`."""
    last_count, last_rise = -1, time.monotonic()
    while not stop.is_set():
        count = server.call("GET", f"/streams/{stream}")[1]["frames"]
        now = time.monotonic()
        if count > last_count:
            out.append(now - last_rise)
            last_count, last_rise = count, now
        time.sleep(0.05)
    out.append(time.monotonic() - last_rise)


def test_replacing_a_task_takes_effect_while_the_other_task_runs_on(site: Path):
    server = TaskServer(site, ["doors", "aisles"])
    try:
        assert server.call("POST", "/streams", live(site, "cam1", "doors"))[0] == 201
        assert server.call("POST", "/streams", live(site, "cam2", "aisles"))[0] == 201
        wait_for(lambda: server.call("GET", "/streams/cam2")[1]["frames"] > 20, timeout=60, what="cam2 frames")
        wait_for(lambda: rules_seen(server, stream="cam1"), timeout=90, what="cam1 crossings")
        stop, gaps = threading.Event(), []
        watcher = threading.Thread(target=frame_gaps, args=(server, "cam2", stop, gaps))
        watcher.start()
        try:
            time.sleep(1.0)
            status, task = server.call("PUT", "/tasks/doors", {"graph": people("door2", x=0.45, conf=0.35)})
            replaced = time.time()
            assert status == 200 and task["streams"] == ["cam1"]
            assert task["graph"]["engines"]["det"]["params"]["conf"] == 0.35
            wait_for(lambda: "door2" in rules_seen(server, stream="cam1"), timeout=90, what="the new task's events")
            time.sleep(1.0)
        finally:
            stop.set()
            watcher.join()
        assert max(gaps) < 1.0, f"cam2 paused {max(gaps):.2f} s while the other task was replaced"
        late = [e for e in server.call("GET", "/events?stream=cam1&kind=cross&limit=500")[1] if e["ts"] > replaced + 5]
        assert all(e["event"]["rule"] == "door2" for e in late)
        assert server.call("GET", "/streams/cam1")[1]["task"] == "doors"
    finally:
        server.stop()


def test_tasks_streams_and_rules_come_back_after_a_restart(site: Path):
    server = TaskServer(site, ["doors"])
    try:
        status, added = server.call("POST", "/tasks", {"id": "aisles", "graph": people("aisle", x=0.4),
                                                       "labels": {"gpu": False}})
        assert status == 201 and added["labels"] == {"gpu": False}
        assert server.call("POST", "/streams", live(site, "cam2", "aisles"))[0] == 201
        rules = [{"id": "left", "kind": "line_cross", "line": [[0.3, 0.0], [0.3, 1.0]]}]
        misspelt = [{**rules[0], "classes": ["persn"]}]  # the service checks class names as `validate` does
        status, error = server.call("PUT", "/streams/cam2/rules", misspelt)
        assert status == 400 and "rules[0].classes" in error["error"] and "persn" in error["error"], error
        assert server.call("PUT", "/streams/cam2/rules", rules)[0] == 200
    finally:
        server.stop()
    server = TaskServer(site, ["doors"])
    try:
        assert {t["id"] for t in server.call("GET", "/tasks")[1]} == {"doors", "aisles"}
        assert server.call("GET", "/streams/cam2")[1]["task"] == "aisles"
        assert server.call("GET", "/streams/cam2/rules")[1] == rules
        assert server.call("GET", "/tasks/aisles")[1]["graph"] == people("aisle", x=0.4)
        wait_for(lambda: rules_seen(server, stream="cam2"), timeout=90, what="cam2 crossings after the restart")
        assert rules_seen(server, stream="cam2") == {"left"}
    finally:
        server.stop()


def test_the_tasks_command_adds_lists_and_removes(site: Path, tmp_path: Path):
    server = TaskServer(site, ["doors"])
    try:
        cli = [sys.executable, "-m", "graphflow", "tasks", "--server", server.url]
        run = lambda *a: subprocess.run([*cli[:4], *a, *cli[4:]], capture_output=True, text=True, timeout=200)  # noqa: E731
        got = run("add", "aisles", str(site / "aisles.json"))
        assert got.returncode == 0 and got.stdout.strip() == "added task aisles", got.stderr
        got = run("ls")
        assert [line.split()[0] for line in got.stdout.splitlines()] == ["doors", "aisles"]
        assert json.loads(run("show", "aisles").stdout)["graph"] == people("aisle", x=0.4)
        got = run("rm", "nope")
        assert got.returncode == 1 and got.stderr.strip() == "error: 404: no task 'nope'"
        assert run("rm", "aisles").stdout.strip() == "removed task aisles"
    finally:
        server.stop()


def readme_block(heading: str, index: int) -> str:
    """The `index`-th bash block of the README section under `heading`."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[index]


def test_the_readme_tasks_example_runs_as_written(tmp_path: Path):
    """The README's `graphflow serve` line and each curl line after it, from a copy of the repository's graphs/ (the
    port is the only change: a free one for 8080)."""
    heading = "Tasks: several pipelines in one service"
    serve_line = readme_block(heading, 0).split("#")[0].split()
    assert serve_line[:2] == ["graphflow", "serve"]
    shutil.copytree(ROOT / "graphs", tmp_path / "graphs", ignore=shutil.ignore_patterns("*.jsonl", "*.mp4.*", "mot_*"))
    port = str(free_port())
    args = [a if a != "8080" else port for a in serve_line[2:]]
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "serve", *args], cwd=tmp_path,
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: subprocess.run(["curl", "-sf", f"localhost:{port}/readyz"], capture_output=True).returncode
                 == 0, timeout=120, what="the service")
        answers = []
        for line in readme_block(heading, 1).strip().splitlines():
            got = subprocess.run(["bash", "-c", line.replace("8080", port) + " -w '\\n%{http_code}'"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=200)
            body, _, code = got.stdout.rpartition("\n")
            assert got.returncode == 0 and code.startswith("2"), (line, got.stdout, got.stderr)
            answers.append(json.loads(body) if body.strip() else None)
        assert [t["id"] for t in answers[0]] == ["demo", "crowd"]
        assert answers[1]["task"] == "crowd" and answers[2]["id"] == "night" and answers[3]["task"] == "night"
        assert answers[4]["graph"]["engines"]["gate"]["params"]["rules"][0]["min_count"] == 3
        assert answers[4]["streams"] == ["gate"] and answers[4]["shared"]["det"] >= 3  # demo, crowd, night (+ the old
        # night graph in stats reported before it left)
    finally:
        proc.terminate()
        proc.wait(30)
