"""publish under faults: a failing sink stops alone and counts its losses, a full disk never tears a JSON line, a
killed recording still plays, and the on-disk spool delivers events to a real redis-server across outages,
restarts and a broker that never answers."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import msgpack
import numpy as np
import pytest
import redis
import zmq

from graphflow.engines.publish import Publish, sink_kinds
from graphflow import Message, Param, ParamError
from graphflow.engines.publish.spool import MemoryQueue, Spool
from graphflow.testing import run_engine

from test_publish import event_msgs, free_port, start_redis, wait_for

ROOT = Path(__file__).resolve().parents[1]


def frames(n: int, stream: str = "cam1", blob: str = "") -> list[Message]:
    """`n` small grey frames with one track each (and an optional filler to make records big)."""
    return [Message(stream=stream, seq=i, arrays={"image": np.full((48, 64, 3), 100, np.uint8)},
                    data={"tracks": [{"box": [4, 4, 20, 30], "track_id": 1, "score": 0.9}], "blob": blob})
            for i in range(n)]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- isolation ------------------------------------------------------------------------------------------------

def test_a_sink_that_cannot_create_its_file_fails_alone_once(tmp_path, caplog):
    gone = tmp_path / "gone"
    gone.mkdir()
    sinks = [{"kind": "video", "path": str(gone / "v.mp4")}, {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}]
    engine = Publish("out", {"sinks": sinks})

    def feed() -> Iterator[Message]:
        shutil.rmtree(gone)                   # the video's folder becomes a file after validation: not creatable
        gone.write_text("in the way")
        yield from frames(20)

    run_engine(engine, messages=feed())
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 20
    stats = engine.metrics()
    video = stats["sinks"]["0:video"]
    assert video["written"] == 0 and video["lost"] == 20 and "File exists" in video["error"]
    assert stats["lost"] == 20 and stats["sinks"]["1:jsonl"] == {"kind": "jsonl", "written": 20, "lost": 0,
                                                                 "error": None}
    (line,) = errors(caplog)
    assert line.startswith("publish 'out': sink 0 (video ") and "v.mp4" in line and "\n" not in line


def test_disk_full_on_the_video_costs_the_jsonl_nothing(small_disk, tmp_path, caplog):
    rng = np.random.default_rng(0)
    noisy = [Message(stream="cam1", seq=i, arrays={"image": rng.integers(0, 255, (240, 320, 3), np.uint8)})
             for i in range(60)]             # noise does not compress: the 64 KiB disk fills within a few frames
    sinks = [{"kind": "video", "path": str(small_disk / "v.mp4")}, {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}]
    engine = Publish("out", {"sinks": sinks})
    run_engine(engine, messages=noisy)
    assert [json.loads(r)["seq"] for r in (tmp_path / "a.jsonl").read_text().splitlines()] == list(range(60))
    video = engine.metrics()["sinks"]["0:video"]
    assert video["lost"] > 0 and video["written"] + video["lost"] == 60 and "No space left" in video["error"]
    assert len(errors(caplog)) == 1


def test_jsonl_on_a_full_disk_keeps_whole_lines_and_counts_the_rest(small_disk, caplog):
    path = small_disk / "out.jsonl"
    engine = Publish("out", {"sinks": [{"kind": "jsonl", "path": str(path)}]})
    run_engine(engine, messages=[Message(stream="s", seq=i, data={"blob": "x" * 1000}) for i in range(100)])
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(len(lines)))   # every line whole
    stats = engine.metrics()["sinks"]["0:jsonl"]
    assert 0 < stats["written"] == len(lines) < 100 and stats["lost"] == 100 - len(lines)
    assert "No space left" in stats["error"] and len(errors(caplog)) == 1


def test_jsonl_past_a_file_size_limit_keeps_whole_lines(tmp_path):
    """The same without root: a child process whose files may not grow past 20 kB (RLIMIT_FSIZE)."""
    path = tmp_path / "out.jsonl"
    child = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from graphflow.engines.publish import Publish
        from graphflow import Message
        from graphflow.testing import run_engine
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        engine = Publish("out", {{"sinks": [{{"kind": "jsonl", "path": {str(path)!r}}}]}})
        run_engine(engine, messages=[Message(stream="s", seq=i, data={{"blob": "x" * 1000}}) for i in range(100)])
        print(json.dumps(engine.metrics()["sinks"]["0:jsonl"]))
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.splitlines()[-1])
    lines = path.read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines)
    assert [json.loads(line)["seq"] for line in lines] == list(range(len(lines)))
    assert 0 < stats["written"] == len(lines) < 100 and stats["lost"] == 100 - len(lines)
    assert "File too large" in stats["error"] and run.stderr.count("sink 0 (jsonl") == 1   # one line, once


def test_messages_that_are_not_frames_pass_every_sink(tmp_path, caplog):
    sinks = [{"kind": "jsonl", "path": str(tmp_path / "all.jsonl")},
             {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "what": "events"},
             {"kind": "video", "path": str(tmp_path / "v_{stream}.mp4")},
             {"kind": "mot", "path": str(tmp_path / "m_{stream}.txt")},
             {"kind": "snapshot", "path": str(tmp_path / "shots")}]
    msgs = frames(3)
    msgs[1].data["events"] = [{"rule": "door", "event": "enter", "track_id": 1},
                              {"rule": "door", "event": "exit", "track_id": 1}]
    msgs.append(Message(stream="cam1", seq=3, data={"people_seen": 3}))   # a user's end-of-stream total
    engine = Publish("out", {"sinks": sinks})
    run_engine(engine, messages=msgs)
    assert not errors(caplog) and engine.metrics()["lost"] == 0
    rows = [json.loads(r) for r in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in rows] == [0, 1, 2, 3] and rows[3]["people_seen"] == 3
    events = [json.loads(r) for r in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["stream"], e["frame"], e["event"]) for e in events] == [("cam1", 1, "enter"), ("cam1", 1, "exit")]
    with av.open(str(tmp_path / "v_cam1.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3
    assert len((tmp_path / "m_cam1.txt").read_text().splitlines()) == 3
    assert len(list((tmp_path / "shots").iterdir())) == 2


def test_mot_without_tracks_fails_alone_with_one_line(tmp_path, caplog):
    sinks = [{"kind": "mot", "path": str(tmp_path / "r.txt")}, {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}]
    engine = Publish("out", {"sinks": sinks})
    run_engine(engine, messages=[Message(stream="s", seq=i, data={"detections": []}) for i in range(4)])
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 4
    (line,) = errors(caplog)
    assert "sink 0 (mot " in line and "no data['tracks'] (put track before publish)" in line


# --- recordings survive a kill ----------------------------------------------------------------------------------

def test_a_killed_recording_still_plays(tmp_path):
    child = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from graphflow.engines.publish import Publish
        from graphflow import Message
        engine = Publish("out", {{"sinks": [{{"kind": "video", "path": {str(tmp_path / "v.mp4")!r}, "fps": 10}}]}})
        engine.check()
        engine.setup()
        for i in range(30):
            engine.process(Message(stream="cam", seq=i, arrays={{"image": np.full((48, 64, 3), 8 * i, np.uint8)}}))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    with av.open(str(tmp_path / "v.cam.mp4")) as container:
        grey = [int(f.to_ndarray(format="gray")[24, 32]) for f in container.decode(video=0)]
    assert len(grey) >= 15                                    # most of the 30 frames, all but the last fragment
    assert np.abs(np.array(grey) - 8 * np.arange(len(grey))).max() < 12   # and they are the first ones, in order


# --- the spool and redis ----------------------------------------------------------------------------------------

def redis_sink(port: int, spool: Path, **more) -> dict:
    return {"kind": "redis", "url": f"redis://127.0.0.1:{port}", "stream": "ev", "spool": str(spool), **more}


def delivered(port: int) -> list[dict]:
    """The records in the `ev` stream, each once (de-duplicated on `id`, as a consumer does)."""
    seen: dict[str, dict] = {}
    for _, fields in redis.Redis(port=port, decode_responses=True).xrange("ev"):
        record = json.loads(fields["json"])
        assert record["id"] == fields["id"]
        seen.setdefault(record["id"], record)
    return list(seen.values())


def test_spool_carries_events_over_a_redis_outage(tmp_path):
    port = free_port()
    procs = [start_redis(port)]
    engine = Publish("out", {"sinks": [redis_sink(port, tmp_path / "spool")], "retry": 0.05, "retry_max": 0.1})

    def feed() -> Iterator[Message]:
        yield from event_msgs(5, "a")
        wait_for(lambda: engine.metrics()["sinks"]["0:redis"]["written"] == 5)
        procs[0].kill()
        procs[0].wait()
        yield from event_msgs(5, "b")       # redis is down: these wait in the spool
        wait_for(lambda: engine.failures >= 1)
        assert engine.metrics()["sinks"]["0:redis"]["spooled"] == 5
        procs.append(start_redis(port))     # the same port, an empty server
        yield from event_msgs(5, "c")

    try:
        run_engine(engine, messages=feed())
        got = delivered(port)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    # the a events went with the killed server; the new one got every event published after it
    assert sorted((r["stream"], r["frame"]) for r in got) == [(s, i) for s in "bc" for i in range(5)]
    stats = engine.metrics()
    sink = stats["sinks"]["0:redis"]
    assert stats["lost"] == 0 and sink["spooled"] == 0 and sink["written"] == 15


def test_a_restarted_publisher_sends_what_its_spool_holds(tmp_path):
    port = free_port()
    spool = tmp_path / "spool"
    first = Publish("out", {"sinks": [redis_sink(port, spool, timeout=0.2)]})
    run_engine(first, messages=event_msgs(6))             # no server: everything stays in the spool
    assert first.metrics()["lost"] == 0 and first.metrics()["sinks"]["0:redis"]["spooled"] == 6
    proc = start_redis(port)
    try:
        second = Publish("out", {"sinks": [redis_sink(port, spool)]})
        run_engine(second, messages=event_msgs(2, "late"))
        got = delivered(port)
    finally:
        proc.kill()
        proc.wait()
    expected = [("cam1", i) for i in range(6)] + [("late", 0), ("late", 1)]
    assert sorted((r["stream"], r["frame"]) for r in got) == expected
    assert second.metrics()["sinks"]["0:redis"]["spooled"] == 0


class SilentServer:
    """A TCP server that accepts connections and never answers (a hung broker)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        """Stop listening (new connections are refused) and drop the open ones; safe to call twice."""
        for sock in [self.sock, *self.conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # also wakes the thread blocked in accept()
            except OSError:
                pass
            sock.close()


def test_a_broker_that_never_answers_does_not_block_process(tmp_path):
    server = SilentServer()
    spool = tmp_path / "spool"
    engine = Publish("out", {"sinks": [redis_sink(server.port, spool, timeout=30.0)]})
    n = 300

    def feed() -> Iterator[Message]:
        yield from event_msgs(1)
        wait_for(lambda: server.conns)      # the delivery thread now waits up to 30 s on the silent server
        yield from event_msgs(n - 1)
        # every message was accepted while that one try still waits: process() never waited on the broker
        assert engine.failures == 0 and engine.metrics()["sinks"]["0:redis"]["spooled"] == n
        server.close()                      # the broker goes away: the try fails, and so does flush's

    try:
        run_engine(engine, messages=feed())
    finally:
        server.close()
    assert engine.failures >= 1 and engine.metrics()["lost"] == 0
    assert engine.metrics()["sinks"]["0:redis"]["spooled"] == n   # kept for the next run
    port = free_port()
    proc = start_redis(port)
    try:
        run_engine(Publish("out", {"sinks": [redis_sink(port, spool)]}))
        assert len(delivered(port)) == n
    finally:
        proc.kill()
        proc.wait()


def test_without_a_spool_what_is_pending_at_shutdown_is_counted_lost(caplog):
    server = SilentServer()
    engine = Publish("out", {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{server.port}", "timeout": 0.2}]})
    try:
        run_engine(engine, messages=event_msgs(50))
    finally:
        server.close()
    assert engine.metrics()["lost"] == 50
    assert any("50 items not delivered at shutdown" in line for line in errors(caplog))


def test_zmq_through_a_spool_carries_ids(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = Publish("out", {"sinks": [{"kind": "zmq", "address": address, "format": "json",
                                        "spool": str(tmp_path / "spool")}]})
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(address)
    sub.setsockopt(zmq.SUBSCRIBE, b"")

    def feed() -> Iterator[Message]:
        wait_for(lambda: engine.outs[0].subscriptions())
        yield from event_msgs(3)

    try:
        run_engine(engine, messages=feed())
        got = [json.loads(sub.recv_multipart()[1]) for _ in range(3) if sub.poll(5000)]
    finally:
        sub.close(0)
        context.term()
    assert [r["frame"] for r in got] == [0, 1, 2] and len({r["id"] for r in got}) == 3
    assert engine.metrics()["sinks"]["0:zmq"]["spooled"] == 0 and engine.metrics()["lost"] == 0


# --- the queues ---------------------------------------------------------------------------------------------------

def test_spool_is_bounded_persistent_and_never_drops_what_a_sender_holds(tmp_path):
    path = tmp_path / "s.db"
    item = {"x": "y" * 30}
    size = len(msgpack.packb(item))
    spool = Spool(path, max_bytes=10 * size)
    assert spool.put([item] * 10) == 0 and len(spool) == 10
    held = spool.take(3)
    assert [k for k, _ in held] == [1, 2, 3] and held[0][1] == item
    assert spool.put([{"x": "z" * 30}] * 4) == 4            # full: the oldest waiting (4..7) go, not the held 1..3
    spool.done(2)                                           # 1 and 2 delivered; 3 released
    assert len(spool) == 8 and [k for k, _ in spool.take(2)] == [3, 8]
    spool.close()
    again = Spool(path, max_bytes=10 * size)                  # a restart finds what was left
    assert len(again) == 8 and again.take(100)[-1] == (14, {"x": "z" * 30})
    again.close()


def test_memory_queue_drops_the_oldest_waiting_not_the_held():
    queue = MemoryQueue(bound=2)
    queue.put(["a", "b"])
    assert queue.take(1) == [(0, "a")]
    assert queue.put(["c", "d"]) == 1                        # b dropped: 2 wait at most besides a, being sent
    queue.done(0)
    assert queue.take(9) == [(2, "c"), (3, "d")]


def test_a_spool_that_cannot_be_opened_is_one_line_error(tmp_path):
    (tmp_path / "spool").write_text("a file, not a folder")
    with pytest.raises(ParamError, match=r"^sinks\[0\]\.spool: '.*/spool' is a file, not a folder$"):
        run_engine(Publish, {"sinks": [redis_sink(free_port(), tmp_path / "spool")]})


# --- declarations ---------------------------------------------------------------------------------------------

def test_sink_kinds_declare_every_key_they_accept():
    kinds = sink_kinds()
    assert set(kinds) == {"jsonl", "zmq", "redis", "video", "mot", "snapshot", "webhook", "mqtt"}
    assert all(isinstance(p, Param) and p.doc for keys in kinds.values() for p in keys.values())
    assert kinds["redis"]["spool"].default == "" and kinds["jsonl"]["what"].choices == ("events", "frames")
    for kind, keys in kinds.items():
        given = {"path": "x.out", "url": "http://127.0.0.1:9/hook"} if kind != "redis" else {}  # required keys
        spec = {"kind": kind, **{k: given.get(k, p.default) for k, p in keys.items() if k != "spool"}}
        Publish("pub", {"sinks": [spec]}).check()            # every declared key is accepted
        with pytest.raises(ParamError, match=rf"^sinks\[0\]\.colour: unknown key for a {kind} sink \(known: "):
            Publish("pub", {"sinks": [{**spec, "colour": 1}]}).check()


@pytest.mark.parametrize("spec, field", [
    ({"kind": "jsonl", "path": "x", "what": "all"}, "sinks[0].what"),
    ({"kind": "redis", "spool_max_mb": 0}, "sinks[0].spool_max_mb"),
    ({"kind": "redis", "spool": "/dev/null/spool"}, "sinks[0].spool"),
    ({"kind": "redis", "timeout": "2"}, "sinks[0].timeout"),
])
def test_bad_fault_keys_name_the_field(spec, field):
    with pytest.raises(ParamError) as err:
        Publish("pub", {"sinks": [spec]}).check()
    assert err.value.field == field and "\n" not in str(err.value)



def test_a_sink_kind_is_one_class_registered_by_being_defined(tmp_path):
    from graphflow.engines.publish import SINKS
    from graphflow.engines.publish.base import Output

    class Shout(Output):
        """Each stream id in capitals, one per line."""

        kind = "shout_test"
        path = Param(str, doc="output file")

        def write(self, msg: Message) -> None:
            with open(self.path, "a") as file:
                file.write(msg.stream.upper() + "\n")
            self.written += 1

    try:
        assert SINKS["shout_test"] is Shout and list(sink_kinds()["shout_test"]) == ["path"]
        engine = Publish("out", {"sinks": [{"kind": "shout_test", "path": str(tmp_path / "s.txt")}]})
        run_engine(engine, messages=event_msgs(2))
        assert (tmp_path / "s.txt").read_text() == "CAM1\nCAM1\n" and engine.metrics()["sinks"]["0:shout_test"][
            "written"] == 2
        with pytest.raises(ParamError, match=r"^sinks\[0\]\.loud: unknown key for a shout_test sink \(known: path\)$"):
            Publish("out", {"sinks": [{"kind": "shout_test", "path": "x", "loud": True}]}).check()
        with pytest.raises(ValueError, match="sink kind 'shout_test' is defined twice"):
            type("Again", (Output,), {"kind": "shout_test"})
    finally:
        SINKS.pop("shout_test", None)
