"""Runtime: same results in threads and processes, end-of-stream flush, errors, drain on SIGTERM, no orphans."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from graphflow import graph
from graphflow import runtime

USER_ENGINES = textwrap.dedent('''
    import asyncio
    from graphflow import Engine, Message, Param

    class Window(Engine):
        """Sums `value` over windows of `size` messages per stream; flushes the partial window at the end."""
        size = Param(int, 4, ge=1)

        def setup(self):
            self.acc = {}

        def process(self, msg):
            vals = self.acc.setdefault(msg.stream, [])
            vals.append(msg.data["value"])
            if len(vals) == self.size:
                self.emit(msg.stream)

        def emit(self, stream):
            vals = self.acc.pop(stream)
            self.send(Message(stream=stream, seq=len(vals), data={"sum": sum(vals), "n": len(vals)}))

        def flush(self):
            for stream in sorted(self.acc):
                self.emit(stream)

    class AsyncTag(Engine):
        """An async engine: awaits, then tags the message and sends it on."""
        async def process(self, msg):
            await asyncio.sleep(0)
            msg.data["tag"] = f"{msg.stream}:{msg.seq}"
            self.send(msg)

    class Boom(Engine):
        """Raises on every third message."""
        def process(self, msg):
            if msg.seq % 3 == 2:
                raise RuntimeError("bad frame")
            self.send(msg)
''')


def chain_doc(out_path, placement, count=23, extra=None):
    doc = {
        "engines": {
            "src": {"type": "source", "params": {"count": count, "streams": 3, "shape": [4, 6, 3]}},
            "dbl": {"type": "map", "placement": placement, "params": {"function": "graphflow.examples:double_value"}},
            "tag": {"type": "userengines:AsyncTag", "placement": placement},
            "win": {"type": "userengines:Window", "placement": placement, "params": {"size": 5}},
            "out": {"type": "sink", "params": {"path": str(out_path), "times": False}},
        },
        "connections": [["src", "dbl"], ["dbl", "tag"], ["tag", "win"], ["win", "out"]],
    }
    doc["engines"].update(extra or {})
    return doc


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_thread_and_process_placement_give_same_outputs(tmp_path, write_graph, user_module):
    user_module("userengines", USER_ENGINES)
    results = {}
    for placement in ("thread", "process", "process:work"):  # the last: all three engines in one child process
        out = tmp_path / f"{placement.replace(':', '-')}.jsonl"
        g = graph.load(write_graph(chain_doc(out, placement), f"{placement.replace(':', '-')}.json"))
        summary = runtime.run(g)
        assert summary.exit_code == 0, summary.errors
        results[placement] = sorted(read_lines(out), key=lambda r: (r["stream"], r["seq"], r["sum"]))
    # 23 messages per stream in windows of 5 → 4 full windows + a flushed partial of 3, per stream
    assert len(results["thread"]) == 15
    assert sorted(r["n"] for r in results["thread"] if r["stream"] == "s0") == [3, 5, 5, 5, 5]
    assert sum(r["sum"] for r in results["thread"] if r["stream"] == "s1") == 2 * sum(range(23))
    assert results["thread"] == results["process"] == results["process:work"]


def test_engines_of_one_process_group_share_a_process(tmp_path, write_graph, user_module):
    """`process:NAME` puts engines in one child process (frames between them pass as objects, not through shared
    memory); `process` gives an engine a process of its own; `thread` keeps it in the launcher's."""
    user_module("pidengines", "import os\nfrom graphflow import Engine\nclass Pid(Engine):\n"
                "    def process(self, msg):\n        msg.data[self.id] = os.getpid()\n        self.send(msg)\n")
    out = tmp_path / "o.jsonl"
    doc = {"engines": {"src": {"type": "source", "params": {"count": 12, "streams": 2, "shape": [8, 8, 3]}},
                       "a": {"type": "pidengines:Pid", "placement": "process:shard"},
                       "b": {"type": "pidengines:Pid", "placement": "process:shard"},
                       "c": {"type": "pidengines:Pid", "placement": "process"},
                       "d": {"type": "pidengines:Pid"},
                       "out": {"type": "sink", "params": {"path": str(out), "times": False}}},
           "connections": [["src", "a"], ["a", "b"], ["b", "c"], ["c", "d"], ["d", "out"]]}
    summary = runtime.run(graph.load(write_graph(doc)))
    assert summary.exit_code == 0, summary.errors
    rows = read_lines(out)
    assert len(rows) == 24
    assert {(r["a"] == r["b"], r["b"] != r["c"], r["c"] != r["d"], r["d"] == os.getpid(), r["a"] != os.getpid())
            for r in rows} == {(True, True, True, True, True)}
    assert "shm" not in summary.stats["a"]["metrics"]  # a → b stays inside the process: no shared-memory pool
    assert "shm" in summary.stats["b"]["metrics"]  # b → c crosses processes


def test_process_engine_error_is_reported_with_stream_and_frame(tmp_path, write_graph, user_module):
    user_module("userengines", USER_ENGINES)
    out = tmp_path / "o.jsonl"
    doc = {"engines": {"src": {"type": "source", "params": {"count": 9}},
                       "boom": {"type": "userengines:Boom", "placement": "process"},
                       "out": {"type": "sink", "params": {"path": str(out)}}},
           "connections": [["src", "boom"], ["boom", "out"]]}
    summary = runtime.run(graph.load(write_graph(doc)))
    assert not summary.failed and summary.exit_code == 3  # on_error: skip (default) keeps the graph running; errors give 3
    assert len(read_lines(out)) == 6
    assert summary.stats["boom"]["errors"] == 3
    assert any("engine 'boom' failed in process on stream 's0' frame 2" in e and "RuntimeError: bad frame" in e
               for e in summary.errors)
    doc["engines"]["boom"]["on_error"] = "stop"
    doc["engines"]["src"]["params"] = {"count": 0, "rate": 100}  # endless: only the policy can stop it
    summary = runtime.run(graph.load(write_graph(doc)))
    assert summary.exit_code == 1
    assert summary.stopped_by == "engine 'boom' process failed"


def test_setup_failure_fails_the_run(tmp_path, write_graph, user_module):
    user_module("badsetup", "from graphflow import Engine\nclass Bad(Engine):\n"
                "    def setup(self):\n        raise OSError('model file gone')\n    def process(self, m):\n        pass\n")
    doc = {"engines": {"src": {"type": "source", "params": {"count": 0, "rate": 50}},
                       "bad": {"type": "badsetup:Bad", "placement": "process"}},
           "connections": [["src", "bad"]]}
    t0 = time.monotonic()
    summary = runtime.run(graph.load(write_graph(doc)))
    assert summary.exit_code == 1
    assert time.monotonic() - t0 < 15
    assert any("model file gone" in e for e in summary.errors)


def test_fan_out_each_consumer_gets_every_message(tmp_path, write_graph):
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    doc = {"engines": {"src": {"type": "source", "params": {"count": 40, "shape": [8, 8, 3]}},
                       "a": {"type": "sink", "params": {"path": str(outs[0])}},
                       "dbl": {"type": "map", "placement": "process",
                               "params": {"function": "graphflow.examples:double_value"}},
                       "b": {"type": "sink", "params": {"path": str(outs[1])}}},
           "connections": [["src", "a"], ["src", "dbl"], ["dbl", "b"]]}
    assert runtime.run(graph.load(write_graph(doc))).exit_code == 0
    a, b = read_lines(outs[0]), read_lines(outs[1])
    assert [r["value"] for r in a] == list(range(40))  # the mutation in `dbl` did not leak into `a`
    assert [r["value"] for r in b] == [2 * i for i in range(40)]


def test_drop_oldest_bounds_queue_and_counts_drops(tmp_path, write_graph, user_module):
    user_module("slow", "import time\nfrom graphflow import Engine\nclass Slow(Engine):\n"
                "    outputs = ()\n    def process(self, m):\n        time.sleep(0.01)\n")
    doc = {"engines": {"src": {"type": "source", "params": {"count": 300}},
                       "slow": {"type": "slow:Slow"}},
           "connections": [{"from": "src", "to": "slow", "policy": "drop_oldest", "capacity": 4}]}
    summary = runtime.run(graph.load(write_graph(doc)))
    s = summary.stats["slow"]
    assert s["dropped"] > 100
    assert s["received"] + s["dropped"] == 300


def test_a_process_that_finished_still_delivers_what_it_queued_to_a_slow_consumer(tmp_path, write_graph):
    """Producer processes finish long before their slow consumers: what they still queue (end-of-stream
    included; frames of 60 kB travel inline, so the socket buffers fill) must arrive after they are done.
    A process that exited without terminating its ZeroMQ context lost it and its consumer waited forever;
    with frequent stats (the producer exits within 10 ms of its last send) that hung about half of these
    runs of three pairs."""
    (tmp_path / "slowsink.py").write_text(
        "import json, time\nfrom graphflow import Engine, Param\n"
        "class Slow(Engine):\n    outputs = ()\n    path = Param(str)\n"
        "    def setup(self):\n        self.f = open(self.path, 'w')\n"
        "    def process(self, m):\n        time.sleep(0.04)\n        self.f.write(json.dumps(m.data['value']) + '\\n')\n"
        "    def teardown(self):\n        self.f.close()\n")
    doc = {"settings": {"stats_interval": 0.01}, "engines": {}, "connections": []}
    for k in range(3):
        doc["engines"][f"src{k}"] = {"type": "source", "placement": "process",
                                     "params": {"count": 40, "shape": [100, 200, 3]}}
        doc["engines"][f"slow{k}"] = {"type": "slowsink:Slow", "placement": "process",
                                      "params": {"path": str(tmp_path / f"slow{k}.jsonl")}}
        doc["connections"].append([f"src{k}", f"slow{k}"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", str(write_graph(doc))],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    for k in range(3):
        assert [json.loads(line) for line in (tmp_path / f"slow{k}.jsonl").read_text().splitlines()] == list(range(40))


def launch(graph_path, *args):
    return subprocess.Popen([sys.executable, "-m", "graphflow", "launch", "-q", str(graph_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def live_doc(out):
    return {"engines": {"src": {"type": "source", "params": {"count": 0, "rate": 200, "streams": 2}},
                        "dbl": {"type": "map", "placement": "process",
                                "params": {"function": "graphflow.examples:double_value"}},
                        "out": {"type": "sink", "placement": "process", "params": {"path": str(out)}}},
            "connections": [["src", "dbl"], ["dbl", "out"]]}


def test_sigterm_drains_every_message_the_source_sent(tmp_path, write_graph):
    out = tmp_path / "live.jsonl"
    stats = tmp_path / "stats.json"
    proc = launch(write_graph(live_doc(out)), "--stats", str(stats))
    deadline = time.monotonic() + 20
    while (not out.exists() or out.stat().st_size < 2000) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    sent_by_source = json.loads(stats.read_text())["engines"]["src"]["sent"]
    lines = out.read_text().splitlines()
    assert all(line.endswith("}") for line in lines)
    assert len(lines) == sent_by_source > 0


def test_kill_9_of_launcher_leaves_no_orphan(tmp_path, write_graph):
    proc = launch(write_graph(live_doc(tmp_path / "x.jsonl")))
    deadline = time.monotonic() + 20
    kids = []
    while len(kids) < 2 and time.monotonic() < deadline:
        kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
        time.sleep(0.2)
    assert len(kids) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, [p.cmdline() for p in alive]


def test_shards_example_runs_two_pipelines_in_two_processes(tmp_path):
    """graphs/shards.json: two decode → infer → track shards, each in its own process group, one publisher. The
    same video in both shards gives the same detections, so each shard really ran the model on its own frames."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = json.loads(open(os.path.join(root, "graphs/shards.json")).read())
    for name in ("src_a", "src_b"):
        for source in doc["engines"][name]["params"]["sources"]:
            source.update(uri=os.path.join(root, "graphs/data/demo.mp4"), max_frames=10)
    doc["engines"]["out"]["params"]["sinks"] = [{"kind": "jsonl", "path": str(tmp_path / "out.jsonl")}]
    g = graph.build(doc, "shards.json")
    assert runtime.hosts(g) == {"src_a": "group:a", "det_a": "group:a", "trk_a": "group:a", "src_b": "group:b",
                                "det_b": "group:b", "trk_b": "group:b", "out": runtime.MAIN}
    summary = runtime.run(g)
    assert summary.exit_code == 0, summary.errors
    rows = {(r["stream"], r["seq"]): r for r in read_lines(tmp_path / "out.jsonl")}
    assert sorted({s for s, _ in rows}) == ["cam1", "cam2", "cam3", "cam4"] and len(rows) == 40
    boxes = {s: [[d["box"] for d in rows[s, k]["detections"]] for k in range(10)] for s in ("cam1", "cam3")}
    assert boxes["cam1"] == boxes["cam3"] and sum(map(len, boxes["cam1"])) > 0
    assert all("tracks" in r for r in rows.values())


LIFECYCLE = textwrap.dedent('''
    import os, time, uuid
    from graphflow import Engine, Param

    class Lifecycle(Engine):
        """Appends each lifecycle call, with the process and instance making it, to `trace` (metrics() only when
        called before setup, which must not happen); setup is slow or fails as asked."""
        trace = Param(str)
        slow = Param(float, 0.0)
        fail = Param(bool, False)

        def note(self, what):
            tag = self.__dict__.setdefault("tag", uuid.uuid4().hex)
            with open(self.trace, "a") as f:
                f.write(f"{os.getpid()}:{tag} {what}\\n")

        def check(self):
            self.note("check")

        def setup(self):
            self.note("setup")
            time.sleep(self.slow)
            if self.fail:
                raise OSError("no device")
            self.seen = 0

        def process(self, msg):
            self.seen += 1

        def metrics(self):
            if "seen" not in self.__dict__:
                self.note("metrics")
            return {"seen": self.seen}

        def teardown(self):
            self.note("teardown")
''')


def lifecycle_calls(trace):
    """Per engine instance, the lifecycle calls it got, in order."""
    calls = {}
    for line in trace.read_text().splitlines():
        who, what = line.split()
        calls.setdefault(who, []).append(what)
    return list(calls.values())


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_each_engine_instance_is_checked_once_and_metrics_wait_for_setup(tmp_path, write_graph, user_module,
                                                                        placement):
    user_module("lifecycle", LIFECYCLE)
    trace = tmp_path / "trace.txt"
    doc = {"engines": {"src": {"type": "source", "params": {"count": 5}},
                       "life": {"type": "lifecycle:Lifecycle", "placement": placement,
                                "params": {"trace": str(trace), "slow": 0.5}}},
           "connections": [["src", "life"]], "settings": {"stats_interval": 0.05}}
    summary = runtime.run(graph.load(write_graph(doc)))
    assert summary.exit_code == 0, summary.errors
    # the loader validated one instance; the runtime built its own and checked it once (not again in setup)
    assert lifecycle_calls(trace) == [["check"], ["check", "setup", "teardown"]]
    assert summary.stats["life"]["metrics"] == {"seen": 5}


def test_a_failed_setup_gets_no_teardown_and_no_metrics_call(tmp_path, write_graph, user_module):
    user_module("lifecycle", LIFECYCLE)
    trace = tmp_path / "trace.txt"
    doc = {"engines": {"src": {"type": "source", "params": {"count": 5}},
                       "life": {"type": "lifecycle:Lifecycle", "params": {"trace": str(trace), "fail": True}}},
           "connections": [["src", "life"]], "settings": {"stats_interval": 0.05}}
    summary = runtime.run(graph.load(write_graph(doc)))
    assert summary.exit_code == 1 and any("no device" in e for e in summary.errors)
    assert lifecycle_calls(trace) == [["check"], ["check", "setup"]]
    assert summary.stats["life"]["metrics"] == {}
