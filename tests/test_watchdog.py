"""Stalls are reported and never hang a stop: an engine holding one message past `watchdog_s` is named with its
stream and frame, a stopped (SIGSTOP) child is reported and, once a stop times out, killed and reported; a forced
stop collects every child's final counters first; a process engine over its `max_rss_mb` is killed and reported."""
import os
import signal
import threading
import time
from pathlib import Path

from graphflow import graph
from graphflow import runtime

ENGINES = '''
import os, time
from pathlib import Path
from graphflow import Engine, Param

class Stall(Engine):
    """Passes messages on, `delay` s each; holds frame `at` for `hold` s; writes its pid to `pidfile` at setup."""
    at = Param(int, -1)
    hold = Param(float, 0.0)
    delay = Param(float, 0.0)
    pidfile = Param(str, "")
    def setup(self):
        if self.pidfile:
            Path(self.pidfile).write_text(str(os.getpid()))
    def process(self, msg):
        time.sleep(self.hold if msg.seq == self.at else self.delay)
        self.send(msg)

class Hog(Engine):
    """Passes messages on and keeps `mb` MB more of memory for each (a leak), up to `cap` MB."""
    mb = Param(int, 20)
    cap = Param(int, 600)
    def setup(self):
        self.kept = []
    def process(self, msg):
        if len(self.kept) * self.mb < self.cap:
            self.kept.append(bytearray(self.mb << 20))
        self.send(msg)
'''


def chain(mid, out, source, **settings):
    return {"engines": {"src": source, "mid": mid, "out": {"type": "sink", "params": {"path": str(out)}}},
            "connections": [{"from": "src.out", "to": "mid.in", "capacity": 50}, ["mid.out", "out.in"]],
            "settings": settings}


def start(g):
    """Run `g` in a thread; return its Launcher, the thread and the box its Summary lands in."""
    launcher, box = runtime.Launcher(g), {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", launcher.run()), daemon=True)
    thread.start()
    return launcher, thread, box


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_engine_holding_a_message_too_long_is_named_with_stream_and_frame(tmp_path, user_module):
    user_module("wd_hold", ENGINES)
    mid = {"type": "wd_hold:Stall", "params": {"at": 3, "hold": 2.0}}
    g = graph.build(chain(mid, tmp_path / "o.jsonl", {"type": "source", "params": {"count": 6}},
                          stats_interval=0.1), "hold")
    g.settings["watchdog_s"] = 0.5
    summary = runtime.run(g, handle_signals=False)
    assert any("watchdog: engine 'mid' has held stream 's0' frame 3 for" in e for e in summary.errors), summary.errors
    assert sum("watchdog" in e for e in summary.errors) == 1  # once per message, not once per check
    assert summary.exit_code == 3 and summary.errors_by_engine == {"mid": 1}


def test_a_stopped_child_is_reported_and_killed_when_the_stop_times_out(tmp_path, user_module):
    user_module("wd_stop", ENGINES)
    pidfile = tmp_path / "pid"
    mid = {"type": "wd_stop:Stall", "placement": "process", "params": {"pidfile": str(pidfile), "delay": 0.01}}
    g = graph.build(chain(mid, tmp_path / "o.jsonl", {"type": "source", "params": {"count": 0, "rate": 50}},
                          stats_interval=0.1, shutdown_timeout=2), "sigstop")
    g.settings["watchdog_s"] = 1.0
    launcher, thread, box = start(g)
    wait_for(lambda: pidfile.exists() and launcher.tally["mid"]["received"] > 5)
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: any("watchdog" in e for e in launcher.errors), timeout=30)
        launcher.on_signal(signal.SIGTERM)
        thread.join(60)
    finally:
        os.kill(pid, signal.SIGCONT) if Path(f"/proc/{pid}").exists() else None
    assert not thread.is_alive(), "the stop hung on a stopped engine"
    summary = box["summary"]
    assert any(f"engine 'mid' (process {pid}) has not reported for" in e and "stopped or stuck" in e
               for e in summary.errors), summary.errors
    assert any(f"engine 'mid' (process {pid}) had not finished 2s after the stop began: killed" in e
               for e in summary.errors), summary.errors
    assert summary.exit_code == 1 and "not drained in 2s" in summary.stopped_by


def test_a_forced_stop_reports_each_childs_final_counters(tmp_path, user_module):
    """The producer's count is read after its last send: its consumer never shows more than it sent."""
    user_module("wd_final", ENGINES)
    mid = {"type": "wd_final:Stall", "placement": "process", "params": {"delay": 0.05}}
    g = graph.build(chain(mid, tmp_path / "o.jsonl", {"type": "source", "params": {"count": 0, "rate": 200}},
                          stats_interval=3.0, shutdown_timeout=1.5), "final")
    launcher, thread, box = start(g)
    wait_for(lambda: Path(tmp_path / "o.jsonl").exists() and len((tmp_path / "o.jsonl").read_text()) > 0)
    time.sleep(1.0)  # the queue before mid fills: draining it would take longer than the shutdown timeout
    launcher.on_signal(signal.SIGTERM)
    thread.join(60)
    summary = box["summary"]
    assert summary.exit_code == 1
    lines = len((tmp_path / "o.jsonl").read_text().splitlines())
    assert summary.stats["out"]["received"] == lines
    assert summary.stats["mid"]["sent"] >= lines, (summary.stats["mid"]["sent"], lines)


def test_a_process_engine_over_its_memory_limit_is_killed_and_reported(tmp_path, user_module):
    user_module("wd_hog", ENGINES)
    mid = {"type": "wd_hog:Hog", "placement": "process", "params": {"mb": 20, "cap": 600}}
    g = graph.build(chain(mid, tmp_path / "o.jsonl", {"type": "source", "params": {"count": 60, "rate": 50}},
                          stats_interval=0.1), "rss")
    g.nodes["mid"].max_rss_mb = 300
    summary = runtime.run(g, handle_signals=False)
    assert summary.exit_code == 1
    assert 0 < summary.stats["out"]["received"] < 30  # what it passed on before it reached 300 MB
    assert any("engine 'mid'" in e and "memory limit: RSS" in e and "over max_rss_mb 300" in e
               for e in summary.errors), summary.errors
    assert summary.stats["mid"]["state"] == "died"
