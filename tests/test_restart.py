"""Restarts that lose and repeat nothing: a restarted source resumes after the last frame its consumers got,
early exits (code 0, SystemExit) are deaths, losses are counted and give exit code 3, the restart budget heals
after a healthy period, and a middle engine past its budget stops the graph with exit code 1."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from graphflow import graph
from graphflow import runtime
from graphflow.runtime.actor import Stats

ENGINES = '''
import os, signal, sys, time
from pathlib import Path
from graphflow import Engine, Message, Param

class Counter(Engine):
    """Counts 0..count-1 on stream s0 at `rate`; honours `resume`. Its first incarnation SIGKILLs itself after
    sending frame `kill_at` (a marker file tells incarnations apart)."""
    inputs = ()
    count = Param(int, 80)
    rate = Param(float, 100.0)
    kill_at = Param(int, -1)
    marker = Param(str, "")
    def generate(self):
        first = not Path(self.marker).exists()
        Path(self.marker).write_text(str(os.getpid()))
        for seq in range(self.resume.get("s0", -1) + 1, self.count):
            time.sleep(1 / self.rate)
            yield Message(stream="s0", seq=seq, data={"value": seq, "pid": os.getpid()})
            if first and seq == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

class Lag(Engine):
    """Passes messages on after `delay` s each: a consumer with a queue."""
    delay = Param(float, 0.03)
    def process(self, msg):
        time.sleep(self.delay)
        self.send(msg)

class Quitter(Engine):
    """Passes messages on; at frame `at` of its first incarnation it leaves: os._exit(0), or SystemExit."""
    at = Param(int, 10)
    marker = Param(str)
    how = Param(str, "exit0")
    def process(self, msg):
        if msg.seq == self.at and not Path(self.marker).exists():
            Path(self.marker).write_text("x")
            if self.how == "exit0":
                os._exit(0)
            sys.exit(0)
        self.send(msg)

class Aging(Engine):
    """Passes messages on; dies by SIGKILL at its first message `life` s after its setup."""
    life = Param(float, 1.0)
    def setup(self):
        self.born = time.monotonic()
    def process(self, msg):
        if time.monotonic() - self.born > self.life:
            os.kill(os.getpid(), signal.SIGKILL)
        self.send(msg)

class Mortal(Engine):
    """Passes messages on; dies by SIGKILL after holding its `every`-th message of each incarnation `hold` s."""
    every = Param(int, 10)
    hold = Param(float, 0.0)
    def setup(self):
        self.seen = 0
    def process(self, msg):
        self.seen += 1
        if self.seen == self.every:
            time.sleep(self.hold)
            os.kill(os.getpid(), signal.SIGKILL)
        self.send(msg)
'''


def rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()] if Path(path).exists() else []


def launch(tmp_path, doc, timeout=90):
    """`graphflow launch -q --stats` on `doc` in a subprocess (a hang fails the test, it does not stall it);
    returns (exit code, stderr, stats document)."""
    path, stats = tmp_path / "graph.json", tmp_path / "stats.json"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", str(path), "--stats", str(stats)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    return done.returncode, done.stderr, json.loads(stats.read_text()) if stats.exists() else {}


def chain(mid, out, source=None):
    return {"engines": {"src": source or {"type": "source", "params": {"count": 60, "rate": 100.0}},
                        "mid": mid, "out": {"type": "sink", "params": {"path": str(out)}}},
            "connections": [["src.out", "mid.in"], ["mid.out", "out.in"]],
            "settings": {"shutdown_timeout": 5, "stats_interval": 0.05}}


def test_restarted_source_resumes_after_what_its_consumer_got(tmp_path, user_module):
    user_module("restart_counter", ENGINES)
    out = tmp_path / "out.jsonl"
    doc = {"engines": {"src": {"type": "restart_counter:Counter", "placement": "process", "restart": "on-failure",
                               "max_restarts": 2, "params": {"count": 40, "kill_at": 15, "marker": str(tmp_path / "m")}},
                       # a queue (8 frames, 0.8 s) still waiting for it when the source dies: the resume waits for it
                       "lag": {"type": "restart_counter:Lag", "params": {"delay": 0.1}},
                       "out": {"type": "sink", "params": {"path": str(out)}}},
           "connections": [["src.out", "lag.in"], ["lag.out", "out.in"]], "settings": {"stats_interval": 0.05}}
    summary = runtime.run(graph.build(doc, "resume"), handle_signals=False)
    values = [r["value"] for r in rows(out)]
    assert values == list(range(40)), f"duplicates or gaps: {len(values)} rows, {len(set(values))} distinct"
    assert len({r["pid"] for r in rows(out)}) == 2
    src = summary.stats["src"]
    assert src["restarts"] == 1 and src["sent"] >= 40 - 5  # the dead incarnation's sends are kept, not reset
    assert not summary.failed and summary.lost == 0


def test_exit_code_0_mid_run_is_a_death_that_restarts(tmp_path, user_module):
    user_module("restart_quit", ENGINES)
    out = tmp_path / "out.jsonl"
    mid = {"type": "restart_quit:Quitter", "placement": "process", "restart": "on-failure", "max_restarts": 1,
           "params": {"at": 10, "marker": str(tmp_path / "m")}}
    code, err, stats = launch(tmp_path, chain(mid, out))
    assert "engine 'mid'" in err and "exit code 0 before its engines finished; restart 1/1" in err, err
    assert max(r["value"] for r in rows(out)) == 59, "frames after the exit got through the new process"
    assert code == 3 and stats["engines"]["mid"]["restarts"] == 1, err  # recovered, but not clean


def test_system_exit_without_restart_ends_the_branch_with_end_of_stream(tmp_path, user_module):
    user_module("restart_sysexit", ENGINES)
    out = tmp_path / "out.jsonl"
    for placement in ("process", "thread"):
        (tmp_path / "m").unlink(missing_ok=True)
        mid = {"type": "restart_sysexit:Quitter", "placement": placement,
               "params": {"at": 10, "marker": str(tmp_path / "m"), "how": "sysexit"}}
        code, err, stats = launch(tmp_path, chain(mid, out))
        assert code == 1, err
        assert "engine 'mid'" in err and "SystemExit" in err, err
        assert [r["value"] for r in rows(out)] == list(range(10))
        assert stats["engines"]["mid"]["state"] in ("died", "exited")
        assert stats["engines"]["src"]["sent"] == 60  # its producer was never blocked by it


def test_a_child_dead_before_its_first_report_has_complete_stats(tmp_path, user_module):
    user_module("restart_early", ENGINES)
    out = tmp_path / "out.jsonl"
    mid = {"type": "restart_early:Mortal", "placement": "process", "params": {"every": 1}}
    doc = chain(mid, out)
    doc["settings"]["stats_interval"] = 30  # no report before it dies
    code, err, stats = launch(tmp_path, doc)
    assert code == 1 and "Traceback" not in err, err
    assert set(Stats.__dataclass_fields__) <= set(stats["engines"]["mid"]), stats["engines"]["mid"]
    assert stats["engines"]["mid"]["state"] == "died"


def test_frames_held_by_a_killed_engine_are_counted_lost_and_exit_3(tmp_path, user_module):
    user_module("restart_lost", ENGINES)
    out = tmp_path / "out.jsonl"
    mid = {"type": "restart_lost:Mortal", "placement": "process", "restart": "on-failure", "max_restarts": 1,
           "params": {"every": 10, "hold": 0.5}}
    summary = runtime.run(graph.build(chain(mid, out), "lost"), handle_signals=False)
    assert not summary.failed and summary.exit_code == 3, summary.errors
    assert summary.lost >= 1 and summary.stats["mid"]["lost"] == summary.lost
    assert any(k.startswith("mid: held by the engine when it died (killed by SIGKILL)") for k in summary.lost_reasons)
    assert len(rows(out)) + summary.lost <= 60
    assert summary.stats["mid"]["errors"] >= 1 and summary.errors_by_engine["mid"] >= 1


def test_restart_budget_heals_after_a_healthy_period(tmp_path, user_module):
    """Each incarnation dies 1.5 s after its setup; with `restart_window` 0.3 s every death finds the budget whole
    again, so max_restarts 1 is enough for any number of deaths. Without healing the second death is final."""
    user_module("restart_window", ENGINES)
    mid = {"type": "restart_window:Aging", "placement": "process", "restart": "on-failure", "max_restarts": 1,
           "params": {"life": 1.5}}
    endless = {"type": "source", "params": {"count": 0, "rate": 60.0}}
    g = graph.build(chain(mid, tmp_path / "out.jsonl", endless), "window")
    g.settings["restart_window"] = 0.3
    launcher, box = runtime.Launcher(g), {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", launcher.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (launcher.stats["mid"]["restarts"] >= 2 and launcher.stats["mid"]["state"] == "running"):
        assert thread.is_alive() and time.monotonic() < deadline, launcher.errors
        time.sleep(0.02)
    launcher.on_signal(signal.SIGTERM)  # with the third incarnation young: it drains, it does not die
    thread.join(60)
    summary = box["summary"]
    assert [e.split("; ")[-1] for e in summary.errors if "restart " in e] == ["restart 1/1 in 0.5s"] * 2
    assert not summary.failed and summary.exit_code == 3 and summary.stats["mid"]["restarts"] == 2

    g.settings["restart_window"] = 60.0  # no healing: the second death is past the budget, the graph stops
    summary = runtime.run(g, handle_signals=False)
    assert summary.failed and summary.exit_code == 1 and summary.stats["mid"]["restarts"] == 1
    assert any("gave up after 1 restarts" in e for e in summary.errors), summary.errors


def test_a_middle_engine_past_its_budget_stops_the_graph(tmp_path, user_module):
    user_module("restart_budget", ENGINES)
    out = tmp_path / "out.jsonl"
    mid = {"type": "restart_budget:Mortal", "placement": "process", "restart": "on-failure", "max_restarts": 1,
           "params": {"every": 3}}
    endless = {"type": "source", "params": {"count": 0, "rate": 50.0}}  # only a stop ends it
    code, err, stats = launch(tmp_path, chain(mid, out, endless))
    assert code == 1, err
    assert "gave up after 1 restarts; stopping the graph" in err, err
    assert "cannot deliver" in err, err
    assert stats["engines"]["mid"]["state"] == "died"


def test_every_frame_a_killed_incarnation_held_or_had_in_flight_is_counted(tmp_path, user_module):
    """A process `map` (restart on-failure) behind a source faster than it, SIGKILLed from outside mid-run: frames
    in its inbox, in process(), and on the connections to and from it (socket buffers: small messages fit by the
    hundred) die with it. Every one of the 800 is delivered once or counted lost, exactly (from the ledgers)."""
    user_module("restart_map", "import time\n\ndef slow(msg):\n    time.sleep(0.002)\n    return msg\n")
    out = tmp_path / "out.jsonl"
    mid = {"type": "map", "placement": "process", "restart": "on-failure", "params": {"function": "restart_map:slow"}}
    doc = chain(mid, out, {"type": "source", "params": {"count": 800}})
    launcher, box = runtime.Launcher(graph.build(doc, "inflight")), {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", launcher.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(rows(out)) < 150:
        assert thread.is_alive() and time.monotonic() < deadline, launcher.errors
        time.sleep(0.01)
    kids = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
    os.kill(max(kids, key=lambda c: c.create_time()).pid, signal.SIGKILL)
    thread.join(90)
    summary = box["summary"]
    seqs = [r["seq"] for r in rows(out)]
    assert len(seqs) == len(set(seqs)), "no frame twice"
    assert summary.stats["mid"]["restarts"] == 1 and 150 <= len(seqs) < 800, summary.errors
    assert len(seqs) + summary.lost == 800, (len(seqs), summary.lost_reasons)
    assert set(summary.lost_reasons) <= {"mid: held by the engine when it died (killed by SIGKILL)",
                                         "mid: in flight from 'src' when a process died",
                                         "out: in flight from 'mid' when a process died"}, summary.lost_reasons
    assert not summary.failed and summary.exit_code == 3
