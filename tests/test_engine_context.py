"""The engine's link to what runs it: EngineContext, the public Stopped, and the test harness."""
from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

from graphflow import Engine, EngineContext, Message, ParamError, Stopped
from graphflow.runtime.links import Inbox, LocalLink
from graphflow.engines.publish import Publish
from graphflow.testing import Harness, run_engine, start_engine


class Relay(Engine):
    """Sends each message on from a worker thread of its own, its work counted with `busy()`."""

    def setup(self) -> None:
        self.threads: list[threading.Thread] = []
        self.torn_down = 0

    def process(self, msg: Message) -> None:
        def work() -> None:
            with self.busy():
                msg.data["relayed"] = True
                threading.Event().wait(0.02)
            self.send(msg)
        thread = threading.Thread(target=work)
        thread.start()
        self.threads.append(thread)

    def flush(self) -> None:
        for thread in self.threads:
            thread.join()

    def teardown(self) -> None:
        self.torn_down += 1


class FailingSetup(Relay):
    def setup(self) -> None:
        raise OSError("camera gone")


def test_an_engine_not_running_cannot_send_and_allocs_plain_arrays():
    engine = Relay("relay")
    with pytest.raises(RuntimeError, match="engine 'relay' is not running, it cannot send"):
        engine.send(Message("s", 0))
    arr = engine.alloc((2, 3), np.float32)
    assert arr.shape == (2, 3) and arr.dtype == np.float32


def test_the_harness_records_sends_from_engine_threads_with_their_times_and_busy_time():
    with start_engine(Relay) as harness:
        for seq in range(3):
            harness.feed(Message("s", seq))
        assert harness.wait_sent(3, timeout=30)  # a hang guard only
        harness.flush()
        engine = harness.engine
        assert sorted(m.seq for m in harness.out["out"]) == [0, 1, 2]
        assert all(m.data["relayed"] for m in harness.out["out"])
        times = harness.sent_at["out"]
        assert len(times) == 3 and times == sorted(times)
        assert harness.busy_s >= 3 * 0.02
    assert engine.torn_down == 1


def test_the_harness_refuses_a_port_the_engine_does_not_have():
    class Wrong(Engine):
        def process(self, msg: Message) -> None:
            self.send(msg, "side")

    with pytest.raises(ValueError, match="no output port 'side' \\(has: out\\)"):
        run_engine(Wrong, messages=[Message("s", 0)])


def test_a_setup_that_raises_gets_no_teardown():
    harness = Harness(FailingSetup)
    with pytest.raises(OSError, match="camera gone"):
        harness.start()
    harness.close()
    assert not harness.set_up and "torn_down" not in harness.engine.__dict__


def test_context_alloc_takes_the_runners_slot_or_a_plain_array():
    slot = np.zeros((4, 4), np.uint8)
    ctx = EngineContext("e", send=lambda msg, port: None,
                        alloc=lambda shape, dtype, port: slot if port == "shared" else None)
    assert ctx.alloc((4, 4), np.uint8, "shared") is slot
    plain = ctx.alloc((4, 4), np.uint8, "out")
    assert plain is not slot and plain.shape == (4, 4)


def test_a_send_that_waits_on_a_full_channel_raises_stopped_when_the_graph_stops():
    inbox = Inbox([("in", "block", 1)])
    link = LocalLink(inbox, 0, isolate=False)
    ctx = EngineContext("e", send=lambda msg, port: link.send(msg, ctx.stopping))
    ctx.send(Message("s", 0))  # fills the queue
    threading.Timer(0.1, ctx.stopping.set).start()
    with pytest.raises(Stopped):
        ctx.send(Message("s", 1))
    inbox.close()
    with pytest.raises(Stopped):
        ctx.send(Message("s", 2))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_publish_setup_failing_half_way_closes_the_sinks_it_opened(tmp_path):
    (tmp_path / "sub").mkdir()
    params = {"sinks": [{"kind": "jsonl", "path": str(tmp_path / "a.jsonl")},
                        {"kind": "jsonl", "path": str(tmp_path / "sub" / "b.jsonl")}]}
    harness = Harness(Publish, params)
    harness.engine.check()
    shutil.rmtree(tmp_path / "sub")  # a file in its place between validation and start: the second sink cannot open
    (tmp_path / "sub").write_text("in the way")
    before = open_fds()
    with pytest.raises(ParamError, match=r"sinks\[1\]\.path: cannot open"):
        harness.engine.setup()
    assert open_fds() == before, "the first sink's file was left open"
    assert (tmp_path / "a.jsonl").exists()


class Doubler(Engine):
    """Sends each message's `n` doubled."""

    inputs = ("in",)
    outputs = ("out",)

    def process(self, msg: Message) -> None:
        msg.data["n"] *= 2
        self.send(msg)


def test_run_engine_takes_messages_second_or_says_in_one_line_what_is_wrong():
    from graphflow.testing import run_engine

    def msgs():
        return [Message(stream="a", data={"n": 1}), Message(stream="a", data={"n": 2})]

    assert [m.data["n"] for m in run_engine(Doubler, msgs())["out"]] == [2, 4]
    assert [m.data["n"] for m in run_engine(Doubler(), [Message(stream="a", data={"n": 3})])["out"]] == [6]
    assert [m.data["n"] for m in run_engine(Doubler, {}, msgs())["out"]] == [2, 4]  # the documented form
    with pytest.raises(TypeError, match=r"^run_engine: messages\[0\] is a dict, not a graphflow.Message"):
        run_engine(Doubler, [{"n": 1}])
    with pytest.raises(TypeError, match=r"^run_engine: params must be a dict .*\(got str\)"):
        run_engine(Doubler, "n=1")
