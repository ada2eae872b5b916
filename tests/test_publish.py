"""publish engine: JSON lines, a real redis-server (also started late), ZeroMQ with the docs' subscriber, JPEG
snapshots, annotated MP4 read back with PyAV, and the OSD (zones, lines, counts, trails, flashes)."""
from __future__ import annotations

import json
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import redis
import zmq
from PIL import Image

from graphflow.engines.publish import Publish
from graphflow.engines.publish.brokers import ZmqSink
from graphflow.engines.rule import Rule
from graphflow import Message, ParamError
from graphflow.testing import run_engine
from graphflow.vision.osd import FLASH_ALPHA, FLASH_COLOR, LINE_COLOR, ZONE_COLOR, Overlay, color_for, draw

ROOT = Path(__file__).resolve().parents[1]

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
        yield from event_msgs(4)            # server down: queued, the oldest dropped past 3 waiting
        wait_for(lambda: engine.failures >= 1)
        procs.append(start_redis(port))
        wait_for(lambda: engine.metrics()["sinks"]["0:redis"]["pending"] == 0)   # delivered after the back-off
        yield from event_msgs(1, "cam9")

    try:
        run_engine(engine, messages=feed())
        entries = redis.Redis(port=port, decode_responses=True).xrange("ev")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    got = [(f["stream"], json.loads(f["json"])["frame"]) for _, f in entries]
    # 4 events for 3 places: the oldest is dropped, unless the delivery thread had already taken it for a try
    # (an item being sent is never dropped)
    assert engine.dropped <= 1 and engine.lost == engine.dropped
    assert got == [("cam1", i) for i in range(engine.dropped, 4)] + [("cam9", 0)]   # the newest kept, in order


def test_redis_never_up_counts_failures_and_losses_without_raising():
    port = free_port()
    engine = Publish("pub", {"sinks": [{"kind": "redis", "url": f"redis://127.0.0.1:{port}"}], "retry": 0.0})
    run_engine(engine, messages=event_msgs(3))
    stats = engine.metrics()
    assert engine.failures >= 1 and engine.dropped == 0
    assert stats["lost"] == 3 and stats["sinks"]["0:redis"]["lost"] == 3     # not delivered at shutdown
    assert "Connection refused" in stats["sinks"]["0:redis"]["error"]


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


@pytest.mark.parametrize("order", [("a", "b/c", "b_c"), ("b_c", "b/c", "a")])
def test_video_one_file_per_stream_named_whatever_the_order(tmp_path, order):
    """A stream id that is not a safe name gets a hash of the real id: `b/c` and `b_c` never share a file."""
    img = np.zeros((32, 32, 3), np.uint8)
    msgs = [Message(stream=s, seq=i, arrays={"image": img}) for i in range(2) for s in order]
    run_engine(Publish, {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4")}]}, msgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.a.mp4", "v.b_c.mp4", "v.b_c~b9e2beb9a0.mp4"]


@pytest.mark.parametrize("sinks, field", [
    ([], "sinks"),
    ([{"kind": "jsonl", "path": "-"}, {"kind": "kafka"}], "sinks[1].kind"),
    ([{"kind": "jsonl"}], "sinks[0].path"),
    ([{"kind": "jsonl", "path": "/dev/null/dir/x.jsonl"}], "sinks[0].path"),   # under a file: no folder
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
        yield from event_msgs(2)            # down: queued; next try scheduled in 60 s
        wait_for(lambda: engine.failures == 1)
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


# --- zmq ------------------------------------------------------------------------------------------------

def doc_subscriber(tmp_path) -> Path:
    """The subscriber example of docs/zmq_subscriber.md, written to a file so the test runs the doc's code."""
    text = (ROOT / "docs/zmq_subscriber.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [b for b in blocks if "recv_multipart" in b]
    path = tmp_path / "zmq_subscriber.py"
    path.write_text(code)
    return path


def lines_of(proc: subprocess.Popen) -> queue.Queue:
    """A queue filled with the process's stdout lines by a daemon thread (so reads can time out)."""
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(line) for line in proc.stdout], daemon=True).start()
    return out


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.01)


def zmq_sink(engine: Publish) -> ZmqSink:
    (sink,) = [o for o in engine.outs if isinstance(o, ZmqSink)]
    return sink


def test_zmq_doc_subscriber_receives_its_stream(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, str(doc_subscriber(tmp_path)), address, "cam1"], stdout=subprocess.PIPE,
                            text=True)
    lines = lines_of(proc)
    engine = Publish("pub", {"sinks": [{"kind": "zmq", "address": address}]})

    def feed() -> Iterator[Message]:
        assert lines.get(timeout=10).startswith("listening")
        wait_for(lambda: zmq_sink(engine).subscriptions() == {b"cam1"})
        for i in range(3):
            yield from event_msgs(1, "cam2")   # not subscribed: counted as unheard
            yield Message(stream="cam1", seq=i, data={"events": [{**EVENT, "frame": i}]})

    try:
        run_engine(engine, messages=feed())
        got = [lines.get(timeout=5).split() for _ in range(3)]
    finally:
        proc.kill()
        proc.wait()
    assert got == [["cam1", str(i), "door", "enter", "7"] for i in range(3)]
    assert engine.metrics()["sinks"]["0:zmq"] == {"kind": "zmq", "written": 6, "lost": 0, "error": None, "failures": 0,
                                                  "dropped": 0, "pending": 0, "unheard": 3}


def test_zmq_json_frames_and_unheard_without_subscriber():
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = Publish("pub", {"sinks": [{"kind": "zmq", "address": address, "what": "frames", "format": "json"}]})
    context = zmq.Context()
    sub = context.socket(zmq.SUB)

    def feed() -> Iterator[Message]:
        yield Message(stream="a", seq=0)       # nobody listens yet
        wait_for(lambda: engine.metrics()["sinks"]["0:zmq"]["written"] == 1)   # sent by the delivery thread
        sub.connect(address)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        wait_for(lambda: zmq_sink(engine).subscriptions())
        yield Message(stream="b", seq=1, pts=0.1, data={"tracks": []})

    try:
        run_engine(engine, messages=feed())
        assert sub.poll(5000)
        topic, body = sub.recv_multipart()
    finally:
        sub.close(0)
        context.term()
    record = json.loads(body)
    assert topic == b"b" and record["seq"] == 1 and record["tracks"] == [] and record["pts"] == 0.1
    assert engine.metrics()["sinks"]["0:zmq"]["unheard"] == 1


def test_zmq_slow_subscriber_is_buffered_retried_and_counted():
    """A subscriber that stops reading: sends fail once its queue is full (XPUB_NODROP); nothing is lost
    without a counter: written + lost = published, and the subscriber gets every written message."""
    address = f"tcp://127.0.0.1:{free_port()}"
    n = 60
    engine = Publish("pub", {"sinks": [{"kind": "zmq", "address": address, "what": "frames", "hwm": 1}],
                             "buffer": 3, "retry": 0.0})
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    received = []

    def drain() -> None:
        while sub.poll(1500):
            received.append(sub.recv_multipart())

    def feed() -> Iterator[Message]:
        sub.connect(address)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        wait_for(lambda: zmq_sink(engine).subscriptions())
        blob = "x" * 200_000
        for i in range(n):
            yield Message(stream="cam", seq=i, data={"blob": blob})
        reader.start()                        # the subscriber reads again while the engine flushes and stops

    reader = threading.Thread(target=drain)
    try:
        run_engine(engine, messages=feed())
        stats = engine.metrics()["sinks"]["0:zmq"]
        reader.join()
    finally:
        sub.close(0)
        context.term()
    assert stats["failures"] >= 1 and stats["dropped"] >= 1
    assert stats["written"] + stats["lost"] == n and stats["lost"] >= stats["dropped"]
    assert len(received) == stats["written"]


def test_zmq_address_in_use_is_one_line_error():
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ParamError, match=r"^sinks\[1\]\.address: cannot bind tcp://127\.0\.0\.1:\d+ \(.*\)$"):
        run_engine(Publish, {"sinks": [{"kind": "zmq", "address": address}, {"kind": "zmq", "address": address}]})


# --- snapshot -----------------------------------------------------------------------------------------------

def scene(seq: int, events: list[dict], color: str = "bgr") -> Message:
    """A 120x160 grey frame with a blue (BGR) person box at track 7's box, and the events given."""
    image = np.full((120, 160, 3), 90, np.uint8)
    image[30:90, 40:80] = (255, 0, 0) if color == "bgr" else (0, 0, 255)
    track = {"box": [40, 30, 80, 90], "track_id": 7, "class_id": 0, "label": "person", "score": 0.9}
    return Message(stream="cam 1", seq=seq, arrays={"image": image},
                   data={"tracks": [track], "events": events, "color": color, "width": 160, "height": 120})


CAM_1 = "cam_1~8df28ca705"  # the safe name of stream "cam 1": not a safe name itself, so a hash of it follows


def jpeg(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB")).astype(int)


def test_snapshot_crops_the_event_track_and_bounds_the_count(tmp_path):
    ev = [{**EVENT, "frame": 0}, {**EVENT, "rule": "area", "event": "crowd_start", "track_id": None}]
    engine = Publish("pub", {"sinks": [{"kind": "snapshot", "path": str(tmp_path / "shots"), "margin": 0.0,
                                        "max_count": 3}]})
    run_engine(engine, messages=[scene(0, ev), scene(1, []), scene(2, [{**EVENT, "event": "exit"}]),
                                 scene(3, [{**EVENT, "event": "enter"}])])
    names = sorted(p.name for p in (tmp_path / "shots").iterdir())
    assert names == [f"{CAM_1}_area_tall_f000000_crowd_start.jpg", f"{CAM_1}_door_t7_f000000_enter.jpg",
                     f"{CAM_1}_door_t7_f000002_exit.jpg"]
    crop = jpeg(tmp_path / "shots" / names[1])
    assert crop.shape == (60, 40, 3)
    assert np.abs(crop[30, 20] - (0, 0, 255)).max() < 30     # the blue person, as RGB
    assert jpeg(tmp_path / "shots" / names[0]).shape == (120, 160, 3)   # area event: whole frame
    stats = engine.metrics()["sinks"]["0:snapshot"]
    assert stats["taken"] == 3 and stats["skipped"] == 1 and stats["written"] == 3


def test_snapshot_event_filter_modes_and_rgb(tmp_path):
    sinks = [{"kind": "snapshot", "path": str(tmp_path / "full"), "mode": "frame", "events": ["exit"]},
             {"kind": "snapshot", "path": str(tmp_path / "osd"), "mode": "annotated"}]
    run_engine(Publish, {"sinks": sinks}, [scene(0, [EVENT], "rgb"), scene(1, [{**EVENT, "event": "exit"}], "rgb")])
    (full,) = (tmp_path / "full").iterdir()
    assert full.name.endswith("_exit.jpg")
    image = jpeg(full)
    assert image.shape == (120, 160, 3) and np.abs(image[60, 60] - (0, 0, 255)).max() < 30
    annotated = jpeg(tmp_path / "osd" / f"{CAM_1}_door_t7_f000000_enter.jpg")
    assert np.abs(annotated[60, 41] - FLASH_COLOR).max() < 60     # the box edge flashes: an event happened


def test_snapshot_disk_failure_is_retried_then_delivered(tmp_path):
    shots = tmp_path / "shots"
    engine = Publish("pub", {"sinks": [{"kind": "snapshot", "path": str(shots)}], "retry": 0.0})

    def feed() -> Iterator[Message]:
        shutil.rmtree(shots)                 # the disk goes away
        yield scene(0, [EVENT])
        yield scene(1, [{**EVENT, "event": "exit"}])
        assert engine.failures == 2 and not shots.exists()
        shots.mkdir()                        # and comes back
        yield scene(2, [])

    run_engine(engine, messages=feed())
    assert sorted(p.name for p in shots.iterdir()) == [f"{CAM_1}_door_t7_f000000_enter.jpg",
                                                       f"{CAM_1}_door_t7_f000001_exit.jpg"]
    assert engine.dropped == 0 and engine.metrics()["sinks"]["0:snapshot"]["pending"] == 0


@pytest.mark.parametrize("spec, field", [
    ({"kind": "snapshot"}, "sinks[0].path"),
    ({"kind": "snapshot", "path": "s", "mode": "crops"}, "sinks[0].mode"),
    ({"kind": "snapshot", "path": "s", "events": "enter"}, "sinks[0].events"),
    ({"kind": "snapshot", "path": "s", "quality": 101}, "sinks[0].quality"),
    ({"kind": "snapshot", "path": "s", "max_count": -1}, "sinks[0].max_count"),
    ({"kind": "zmq", "address": "localhost:5"}, "sinks[0].address"),
    ({"kind": "zmq", "format": "xml"}, "sinks[0].format"),
    ({"kind": "mot"}, "sinks[0].path"),
    ({"kind": "video", "path": "v.mp4", "trail": -1}, "sinks[0].trail"),
])
def test_bad_new_sinks_name_the_field(spec, field):
    with pytest.raises(ParamError) as err:
        Publish("pub", {"sinks": [spec]}).check()
    assert err.value.field == field


# --- osd: zones, lines, counts, trails, flashes -----------------------------------------------------------------

ZONE = {"id": "yard", "kind": "zone", "polygon": [[20, 20], [140, 20], [140, 100], [20, 100]], "inside": 1}
LINE = {"id": "door", "kind": "line_cross", "line": [[80, 0], [80, 120]], "counts": {"A->B": 2, "B->A": 0}}


def test_osd_draws_zone_line_and_counts():
    frame = np.zeros((120, 160, 3), np.uint8)
    out = draw(frame, rules=[ZONE, LINE])
    assert tuple(out[60, 20]) == ZONE_COLOR[::-1]          # zone edge (BGR frame)
    assert tuple(out[60, 140]) == ZONE_COLOR[::-1]
    assert tuple(out[110, 80]) == LINE_COLOR[::-1]          # the line
    assert (out[60, 30:60] == 0).all()                      # inside the zone stays untouched
    label = out[20:40, 20:60]
    assert (label == ZONE_COLOR[::-1]).all(-1).any() and (label == 0).all(-1).any()   # "yard: 1" on a tag
    counts = out[2:20, 80:160]
    assert (counts == LINE_COLOR[::-1]).all(-1).mean() > 0.3   # "door A>B 2 B>A 0" tag
    assert not np.array_equal(draw(frame, rules=[{**LINE, "counts": {"A->B": 3, "B->A": 0}}]), draw(frame, rules=[LINE]))


def test_osd_flash_tints_the_zone_and_marks_the_track():
    frame = np.zeros((120, 160, 3), np.uint8)
    track = {"box": [40, 30, 70, 90], "track_id": 3}
    out = draw(frame, [track], rules=[ZONE], flash_tracks={3}, flash_rules={"yard"}, color="rgb")
    assert np.abs(out[60, 100].astype(int) - np.array(FLASH_COLOR) * FLASH_ALPHA).max() <= 1   # tinted inside
    assert tuple(out[60, 41]) == FLASH_COLOR and tuple(out[60, 20]) == FLASH_COLOR             # box and zone edge
    plain = draw(frame, [track], rules=[ZONE], color="rgb")
    assert tuple(plain[60, 41]) == color_for(3) and tuple(plain[60, 100]) == (0, 0, 0)


def test_overlay_trails_and_flash_duration():
    overlay = Overlay(trail=5, flash=3)
    frame = np.zeros((120, 160, 3), np.uint8)
    outs = []
    for seq in range(8):
        track = {"box": [10 + 10 * seq, 40, 30 + 10 * seq, 80], "track_id": 1}
        events = [{"rule": "door", "track_id": 1}] if seq == 2 else []
        outs.append(overlay.render(frame, seq, [track], [LINE], events, color="rgb"))
    trail_pixel = outs[4][80, 35]                       # bottom-centre path of frames 2..4
    assert tuple(trail_pixel) == color_for(1)
    assert [tuple(o[60, 10 + 10 * s + 1]) == FLASH_COLOR for s, o in enumerate(outs)] == \
        [False, False, True, True, True, False, False, False]
    assert list(overlay.trails[1]) == [(20 + 10 * s, 80) for s in range(3, 8)]


def test_rule_geometry_reaches_the_video(tmp_path):
    """rule → publish(video): the line from the rule's normalised params, its counts and the crossing flash."""
    h, w = 96, 128
    msgs = [Message(stream="cam", seq=i, pts=i / 10, arrays={"image": np.full((h, w, 3), 40, np.uint8)},
                    data={"width": w, "height": h,
                          "tracks": [{"box": [10 + 10 * i, 30, 30 + 10 * i, 70], "track_id": 4, "class_id": 0,
                                      "label": "person"}]}) for i in range(10)]
    rules = run_engine(Rule, {"rules": [{"id": "door", "kind": "line_cross", "line": [[0.5, 0], [0.5, 1]]}]}, msgs)["out"]
    assert rules[0].data["rules"] == [{"id": "door", "kind": "line_cross", "line": [[64.0, 0.0], [64.0, 96.0]],
                                       "counts": {"A->B": 0, "B->A": 0}}]
    crossed = [m.seq for m in rules if m.data["events"]]
    assert crossed == [5] and rules[-1].data["rules"][0]["counts"] == {"A->B": 0, "B->A": 1}
    run_engine(Publish, {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4"), "flash": 2}]}, rules)
    with av.open(str(tmp_path / "v.cam.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    assert np.abs(frames[0][90, 64] - LINE_COLOR).max() < 40          # the line, drawn from the start
    left_edge = [np.abs(f[50, 10 + 10 * i] - FLASH_COLOR).max() < 60 for i, f in enumerate(frames)]
    assert left_edge == [False] * 5 + [True, True] + [False] * 3       # flashes 2 frames from the crossing
