"""publish engine: JSON lines, a real redis-server (also started late), annotated MP4 read back with PyAV."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import av
import numpy as np
import pytest
import redis

from engines.publish import Publish
from graphflow import Message, ParamError
from graphflow.testing import run_engine
from graphflow.vision.osd import color_for

EVENT = {"rule": "door", "kind": "zone", "event": "enter", "track_id": 7, "class_id": 0, "label": "person"}


def event_msgs(n: int, stream: str = "cam1") -> list[Message]:
    return [Message(stream=stream, seq=i, pts=i / 10, data={"events": [{**EVENT, "frame": i}]}) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """A real redis-server on loopback `port`, waited for until it answers PING."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = start_redis(port)
    yield port
    proc.kill()
    proc.wait()


def test_jsonl_writes_one_line_per_message(tmp_path):
    path = tmp_path / "out.jsonl"
    run_engine(Publish, {"sinks": [{"kind": "jsonl", "path": str(path)}]}, event_msgs(3))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [0, 1, 2]
    assert lines[2]["events"][0]["frame"] == 2 and lines[0]["stream"] == "cam1"


def test_redis_events_are_xadded(redis_port, tmp_path):
    params = {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{redis_port}/0", "stream": "ev"},
                        {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}]}
    run_engine(Publish, params, event_msgs(4) + [Message(stream="cam1", seq=4)])
    entries = redis.Redis(port=redis_port, decode_responses=True).xrange("ev")
    assert len(entries) == 4
    events = [json.loads(fields["json"]) for _, fields in entries]
    assert [e["frame"] for e in events] == [0, 1, 2, 3]
    assert events[0]["event"] == "enter" and entries[0][1]["stream"] == "cam1"


def test_redis_frames_mode_and_maxlen(redis_port):
    params = {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{redis_port}", "stream": "fr",
                         "what": "frames", "maxlen": 5}]}
    msgs = [Message(stream="cam2", seq=i) for i in range(3)]
    run_engine(Publish, params, msgs)
    entries = redis.Redis(port=redis_port, decode_responses=True).xrange("fr")
    assert [json.loads(f["json"])["seq"] for _, f in entries] == [0, 1, 2]


def test_redis_down_then_up_delivers_buffered_events():
    port = free_port()
    engine = Publish("pub", {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{port}", "stream": "ev"}],
                             "retry": 0.05, "retry_max": 0.1, "buffer": 3})
    procs = []

    def feed() -> Iterator[Message]:
        yield from event_msgs(4)            # server down: buffered, oldest of 4 dropped (buffer 3)
        assert engine.failures >= 1
        procs.append(start_redis(port))
        time.sleep(0.15)                    # past the back-off
        yield from event_msgs(1, "cam9")

    try:
        run_engine(engine, messages=feed())
        entries = redis.Redis(port=port, decode_responses=True).xrange("ev")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert engine.dropped == 2              # 5 events through a buffer of 3 while down
    got = [(f["stream"], json.loads(f["json"])["frame"]) for _, f in entries]
    assert got == [("cam1", 2), ("cam1", 3), ("cam9", 0)]


def test_redis_never_up_counts_failures_without_raising():
    port = free_port()
    engine = Publish("pub", {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{port}"}], "retry": 0.0})
    run_engine(engine, messages=event_msgs(3))
    assert engine.failures >= 3 and engine.dropped == 0


def test_video_has_frames_size_and_boxes(tmp_path):
    h, w = 48, 64
    box = [10, 20, 50, 40]
    msgs = [Message(stream="cam1", seq=i, arrays={"image": np.full((h, w, 3), 128, np.uint8)},
                    data={"tracks": [{"box": box, "track_id": 1, "class_id": 0, "label": "p"}]}) for i in range(10)]
    path = tmp_path / "out_{stream}.mp4"
    run_engine(Publish, {"sinks": [{"kind": "video", "path": str(path), "fps": 10}]}, msgs)
    with av.open(str(tmp_path / "out_cam1.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 10
    assert frames[0].shape == (h, w, 3)
    edge = frames[5][30, box[0]].astype(int)       # left edge of the box, mid-height
    inside = frames[5][30, 30].astype(int)
    assert np.abs(edge - np.array(color_for(1))).max() < 40
    assert np.abs(inside - 128).max() < 10


def test_video_one_file_per_stream(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    msgs = [Message(stream=s, seq=i, arrays={"image": img}) for i in range(2) for s in ("a", "b/c")]
    run_engine(Publish, {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4")}]}, msgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.b_c.mp4", "v.mp4"]


@pytest.mark.parametrize("sinks, field", [
    ([], "sinks"),
    ([{"kind": "jsonl", "path": "-"}, {"kind": "kafka"}], "sinks[1].kind"),
    ([{"kind": "jsonl"}], "sinks[0].path"),
    ([{"kind": "jsonl", "path": "/no/such/dir/x.jsonl"}], "sinks[0].path"),
    ([{"kind": "redis", "url": "http://x"}], "sinks[0].url"),
    ([{"kind": "redis", "what": "all"}], "sinks[0].what"),
    ([{"kind": "redis", "maxlen": -1}], "sinks[0].maxlen"),
    ([{"kind": "video", "path": "x.mp4", "fps": 0}], "sinks[0].fps"),
    ([{"kind": "video", "path": "x.mp4", "colour": 1}], "sinks[0].colour"),
])
def test_bad_sinks_name_the_field(sinks, field):
    with pytest.raises(ParamError) as err:
        Publish("pub", {"sinks": sinks}).check()
    assert err.value.field == field


def test_redis_flush_retries_despite_back_off():
    port = free_port()
    engine = Publish("pub", {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{port}", "stream": "ev"}],
                             "retry": 60.0})
    procs = []

    def feed() -> Iterator[Message]:
        yield from event_msgs(2)            # down: buffered; next try scheduled in 60 s
        procs.append(start_redis(port))

    try:
        run_engine(engine, messages=feed())  # flush/teardown must deliver without waiting for the back-off
        entries = redis.Redis(port=port, decode_responses=True).xrange("ev")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert engine.failures == 1
    assert [json.loads(f["json"])["frame"] for _, f in entries] == [0, 1]
