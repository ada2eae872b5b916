"""What the runtime counts for an engine: busy time of work in its own threads, errors that are all counted but
reported at a bounded rate, and run folders that never outlive their launcher."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from graphflow import graph
from graphflow import runtime
from graphflow.runtime.supervise import clean_stale_rundirs

ENGINES = '''
import queue, threading, time
from graphflow import Engine, Param

class Worker(Engine):
    """Hands each message to its own worker thread, which works `work` s on it inside busy(), then sends it."""
    work = Param(float, 0.02)
    def setup(self):
        self.jobs = queue.Queue()
        self.worker = threading.Thread(target=self.loop, daemon=True)
        self.worker.start()
    def loop(self):
        while (msg := self.jobs.get()) is not None:
            try:
                with self.busy():
                    time.sleep(self.work)
                self.send(msg)
            finally:
                self.jobs.task_done()
    def process(self, msg):
        self.jobs.put(msg)
    def flush(self):
        self.jobs.join()
        self.jobs.put(None)

class Broken(Engine):
    """Raises on every message."""
    def process(self, msg):
        raise ValueError(f"bad frame {msg.seq}")
'''


def test_work_in_an_engines_own_threads_is_its_busy_time(tmp_path, user_module):
    user_module("acc_worker", ENGINES)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 40}},
                       "w": {"type": "acc_worker:Worker", "params": {"work": 0.02}},
                       "out": {"type": "sink", "params": {"path": str(tmp_path / "o.jsonl")}}},
           "connections": [["src", "w"], ["w", "out"]]}
    summary = runtime.run(graph.build(doc, "busy"), handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    assert summary.stats["out"]["received"] == 40
    assert summary.stats["w"]["busy_s"] >= 40 * 0.02 * 0.9, summary.stats["w"]["busy_s"]


def test_a_source_waiting_for_its_next_frame_is_not_busy(tmp_path):
    """A source paced at 20 msg/s sleeps between frames (yielding None heartbeats): waiting, not work."""
    doc = {"engines": {"src": {"type": "source", "params": {"count": 20, "rate": 20.0}},
                       "out": {"type": "sink", "params": {"path": str(tmp_path / "o.jsonl")}}},
           "connections": [["src", "out"]]}
    summary = runtime.run(graph.build(doc, "idle"), handle_signals=False)
    assert summary.exit_code == 0 and summary.stats["out"]["received"] == 20
    assert summary.stats["src"]["busy_s"] < 0.25, summary.stats["src"]["busy_s"]  # of the ~1 s it ran


def test_an_engine_failing_on_every_frame_is_counted_in_full_and_logged_at_a_bounded_rate(tmp_path, user_module,
                                                                                         caplog):
    user_module("acc_broken", ENGINES)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 3000}},
                       "bad": {"type": "acc_broken:Broken"}},
           "connections": [["src", "bad"]]}
    with caplog.at_level(logging.ERROR):
        summary = runtime.run(graph.build(doc, "flood"), handle_signals=False)
    assert summary.stats["bad"]["errors"] == 3000 and summary.errors_by_engine == {"bad": 3000}
    assert summary.exit_code == 3
    logged = [r for r in caplog.records if "bad" in r.getMessage()]
    assert 3 <= len(logged) <= 10, len(logged)  # the first few in full, then a count per period
    assert sum(len(r.getMessage()) for r in logged) < 20_000
    assert any("engine 'bad': 2997 more errors (last: in process on stream 's0' frame 2999: ValueError: bad frame"
               in r.getMessage() for r in logged), [r.getMessage()[:200] for r in logged]
    assert len(summary.errors) <= 41


def test_stale_run_folders_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid(), open(f'/proc/{os.getpid()}/stat')"
                           ".read().rsplit(')', 1)[1].split()[19])"], capture_output=True, text=True).stdout.strip()
    for name, owner in (("graphflow-dead", dead), ("graphflow-live", None), ("graphflow-bare", "")):
        (tmp_path / name).mkdir()
        if owner is None:
            owner = f"{os.getpid()} {Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19]}"
        if owner:
            (tmp_path / name / "owner").write_text(owner)
    assert clean_stale_rundirs(str(tmp_path)) == [str(tmp_path / "graphflow-dead")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graphflow-bare", "graphflow-live"]


def test_a_killed_launcher_leaves_a_run_folder_the_next_run_removes(tmp_path):
    runs = tmp_path / "tmp"
    runs.mkdir()
    doc = {"engines": {"src": {"type": "source", "params": {"count": 0, "rate": 50}},
                       "out": {"type": "sink", "placement": "process", "params": {"path": str(tmp_path / "o.jsonl")}}},
           "connections": [["src", "out"]]}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "TMPDIR": str(runs)}
    cmd = [sys.executable, "-m", "graphflow", "launch", "-q", str(path)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((tmp_path / "o.jsonl").exists() and (tmp_path / "o.jsonl").read_text().count("\n") > 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert len(list(runs.glob("graphflow-*"))) == 1  # SIGKILL: nothing could clean up
    doc["engines"]["src"]["params"] = {"count": 3}
    path.write_text(json.dumps(doc))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert list(runs.glob("graphflow-*")) == []  # the stale one removed at start, its own at the end
