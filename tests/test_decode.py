"""Decode engine and PyAV sources on the real demo clip, image folders, broken files; VideoWriter roundtrip."""
from __future__ import annotations

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphflow.engines.decode import Decode
from graphflow import Message, ParamError
from graphflow.testing import run_source
from graphflow.vision.osd import VideoWriter, draw
from graphflow.media.video import SourceError
from graphflow.media.sources import open_source

DEMO = Path(__file__).resolve().parent.parent / "graphs" / "data" / "demo.mp4"
DEMO_FRAMES, DEMO_FPS = 250, 25


def decode(*sources: dict, **params) -> list:
    return run_source(Decode, {"sources": list(sources), **params})


def test_demo_clip_decodes_every_frame_in_order():
    out = decode({"id": "cam1", "uri": str(DEMO)})
    assert len(out) == DEMO_FRAMES
    assert [m.seq for m in out] == list(range(DEMO_FRAMES))
    assert np.allclose([m.pts for m in out], np.arange(DEMO_FRAMES) / DEMO_FPS)
    first = out[0]
    assert first.stream == "cam1" and first.image.shape == (360, 640, 3) and first.image.dtype == np.uint8
    assert first.data == {"width": 640, "height": 360, "color": "bgr"}
    assert first.times["capture"] <= out[-1].times["capture"]
    assert not np.array_equal(out[0].image, out[100].image)


def test_fps_control_keeps_evenly_spaced_frames():
    out = decode({"uri": str(DEMO), "fps": 5})
    assert len(out) == DEMO_FRAMES // 5
    assert np.allclose(np.diff([m.pts for m in out]), 0.2)
    assert [m.seq for m in out] == list(range(len(out)))


def test_rgb_is_bgr_reversed():
    bgr = decode({"uri": str(DEMO), "max_frames": 1})[0].image
    rgb = decode({"uri": str(DEMO), "max_frames": 1}, color="rgb")[0]
    assert rgb.data["color"] == "rgb" and np.array_equal(rgb.image, bgr[:, :, ::-1])


def test_start_and_max_frames():
    out = decode({"uri": str(DEMO), "start": 2.0, "max_frames": 10})
    assert len(out) == 10
    assert out[0].pts == pytest.approx(2.0) and out[-1].pts == pytest.approx(2.36)


def test_loop_continues_pts_past_the_end():
    source = open_source({"uri": str(DEMO), "loop": True, "max_frames": DEMO_FRAMES + 5})
    frames = list(source)
    assert len(frames) == DEMO_FRAMES + 5 and source.stats.loops == 1
    assert np.all(np.diff([f.pts for f in frames]) > 0)
    assert np.array_equal(frames[DEMO_FRAMES].image, frames[0].image)


def test_image_folder_sorted(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, rgb in enumerate(colors):
        Image.new("RGB", (32, 24), rgb).save(tmp_path / f"img_{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    out = decode({"id": "dir", "uri": str(tmp_path)})
    assert [m.seq for m in out] == [0, 1, 2]
    assert [tuple(m.image[0, 0]) for m in out] == [(0, 0, 255), (0, 255, 0), (255, 0, 0)]
    assert out[0].data["width"] == 32 and out[0].data["height"] == 24


def test_two_sources_interleave_with_their_ids():
    out = decode({"id": "a", "uri": str(DEMO), "max_frames": 60}, {"id": "b", "uri": str(DEMO), "fps": 5})
    by_stream = {s: [m.seq for m in out if m.stream == s] for s in ("a", "b")}
    assert by_stream == {"a": list(range(60)), "b": list(range(DEMO_FRAMES // 5))}
    first_b = next(i for i, m in enumerate(out) if m.stream == "b")
    assert first_b < 30, "sources should progress in parallel, not one after the other"


def test_missing_file_is_a_param_error_naming_the_source():
    with pytest.raises(ParamError) as err:
        decode({"uri": str(DEMO)}, {"uri": "/nonexistent/cam.mp4"})
    assert err.value.field == "sources[1].uri" and "/nonexistent/cam.mp4" in str(err.value)


@pytest.mark.parametrize("sources, field", [
    ([], "sources"),
    ([{"uri": str(DEMO), "fps": 0}], "sources[0].fps"),
    ([{"uri": str(DEMO), "max_frames": "10"}], "sources[0].max_frames"),
    ([{"uri": str(DEMO), "loop": 1}], "sources[0].loop"),
    ([{"uri": str(DEMO), "transport": "http"}], "sources[0].transport"),
    ([{"id": "cam"}], "sources[0].uri"),
    (["cam.mp4"], "sources[0]"),
    ([{"uri": str(DEMO), "speed": 2}], "sources[0].speed"),
    ([{"id": "x", "uri": str(DEMO)}, {"id": "x", "uri": str(DEMO)}], "sources[1].id"),
    ([{"id": ["x"], "uri": str(DEMO)}], "sources[0].id"),
    ([{"uri": "x" * 5000 + ".mp4"}], "sources[0].uri"),
    ([{"uri": str(DEMO), "read_timeout": "5"}], "sources[0].read_timeout"),
])
def test_bad_sources_rejected(sources, field):
    with pytest.raises(ParamError) as err:
        decode(*sources)
    assert err.value.field == field


def test_retry_cap_below_first_delay_rejected():
    with pytest.raises(ParamError, match=r"retry_max: must be ≥ retry \(2 s\) \(got 1\)"):
        decode({"uri": str(DEMO)}, retry=2.0, retry_max=1.0)


def test_unreadable_file_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    engine = Decode("src", {"sources": [{"id": "bad", "uri": str(bad)}]})
    assert [m for m in engine.generate() if isinstance(m, Message)] == []
    error = engine.metrics()["sources"]["bad"]["error"]
    assert str(bad) in error and "\n" not in error and engine.metrics()["errors"] == 1


@pytest.fixture
def damaged(tmp_path):
    """Copies of the demo clip: `cut` loses its last 40 %, `hit` has two 2000-byte runs of noise mid-file."""
    data = DEMO.read_bytes()
    cut, hit = tmp_path / "cut.mp4", tmp_path / "hit.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    noisy = bytearray(data)
    rng = np.random.default_rng(0)
    for start in (len(data) // 3, len(data) // 2):
        noisy[start:start + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    hit.write_bytes(noisy)
    return {"cut": cut, "hit": hit}


@pytest.mark.parametrize("kind, least", [("cut", 100), ("hit", DEMO_FRAMES - 10)])
def test_damaged_file_decodes_what_is_there(damaged, kind, least):
    source = open_source({"uri": str(damaged[kind])})
    frames = list(source)
    assert least <= len(frames) < DEMO_FRAMES
    assert source.stats.corrupt >= 1


def test_damaged_files_never_stop_a_launched_graph(tmp_path, damaged, write_graph):
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    sources = [{"id": k, "uri": str(v)} for k, v in damaged.items()]
    sources.append({"id": "ok", "uri": str(DEMO), "max_frames": 50})
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": sources}},
                       "out": {"type": "sink", "params": {"path": str(out), "times": False}}},
           "connections": [["src", "out"]]}
    proc = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", str(write_graph(doc)), "--stats",
                           str(stats)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ERROR" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    seqs: dict[str, list[int]] = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        seqs.setdefault(record["stream"], []).append(record["seq"])
    src = json.loads(stats.read_text())["engines"]["src"]
    per_source = src["metrics"]["sources"]
    counts = {stream: len(s) for stream, s in seqs.items()}
    assert counts == src["streams"] == {stream: m["kept"] for stream, m in per_source.items()}
    assert all(s == list(range(len(s))) for s in seqs.values())
    assert 100 <= counts["cut"] < DEMO_FRAMES and DEMO_FRAMES - 10 <= counts["hit"] < DEMO_FRAMES and counts["ok"] == 50
    assert {stream: m["corrupt"] > 0 for stream, m in per_source.items()} == {"cut": True, "hit": True, "ok": False}
    assert src["metrics"]["corrupt"] == per_source["cut"]["corrupt"] + per_source["hit"]["corrupt"]


def test_video_writer_roundtrip(tmp_path):
    path = tmp_path / "out.mp4"
    rng = np.random.default_rng(0)
    frames = [np.full((120, 160, 3), 40 * i, np.uint8) + rng.integers(0, 5, (120, 160, 3), dtype=np.uint8)
              for i in range(6)]
    with VideoWriter() as writer:
        writer.open(path, 10, (160, 120))
        for f in frames:
            writer.write(f)
    back = list(open_source({"uri": str(path)}))
    assert len(back) == len(frames)
    assert [abs(int(b.image.mean()) - int(f.mean())) <= 3 for b, f in zip(back, frames)] == [True] * len(frames)


def test_video_writer_rejects_wrong_sizes(tmp_path):
    writer = VideoWriter()
    with pytest.raises(ValueError, match="even"):
        writer.open(tmp_path / "x.mp4", 25, (161, 120))
    writer.open(tmp_path / "x.mp4", 25, (160, 120))
    with pytest.raises(ValueError, match="differs"):
        writer.write(np.zeros((10, 10, 3), np.uint8))
    writer.close()


def test_draw_marks_boxes_and_lines_on_a_copy():
    frame = np.zeros((360, 640, 3), np.uint8)
    objects = [{"box": [100, 100, 200, 250], "label": "person", "score": 0.9, "track_id": 3, "class_id": 0}]
    out = draw(frame, objects, lines=[[[0, 0.5], [1, 0.5]]], normalized_lines=True)
    assert frame.max() == 0, "input frame must stay untouched"
    assert tuple(out[150, 100]) == (151, 157, 255), "track 3's palette colour, in BGR"
    assert out[180, 320].any() and out[150, 103:197].sum() == 0


@pytest.fixture
def http_demo():
    """The demo clip served over HTTP by a real local server, as a network-stream stand-in."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DEMO.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{DEMO.name}"
    server.shutdown()
    server.server_close()


def test_network_stream_reconnects_and_seq_carries_on(http_demo):
    out = run_source(Decode, {"sources": [{"id": "net", "uri": http_demo, "fps": 25}]}, limit=DEMO_FRAMES + 10)
    assert [m.seq for m in out] == list(range(DEMO_FRAMES + 10))
    once = run_source(Decode, {"sources": [{"id": "net", "uri": http_demo}], "reconnect": False})
    assert len(once) == DEMO_FRAMES


def test_refused_stream_error_names_the_address():
    with pytest.raises(SourceError, match=r"rtsp://127\.0\.0\.1:1/cam: cannot open \(Connection refused\)"):
        open_source({"uri": "rtsp://127.0.0.1:1/cam", "open_timeout": 2})


@pytest.mark.parametrize("how", ["close", "stopping"])
def test_shutdown_mid_stream_joins_decode_threads(how):
    engine = Decode("dec", {"sources": [{"id": "a", "uri": str(DEMO), "loop": True},
                                        {"id": "b", "uri": str(DEMO), "loop": True}]})
    engine.check()
    gen = engine.generate()
    assert sum(1 for _, m in zip(range(20), gen) if isinstance(m, Message)) > 0
    if how == "close":
        gen.close()
    else:
        engine.stopping.set()
        assert len(list(gen)) <= 2 * engine.queue_size
    assert not [t for t in threading.enumerate() if t.name.startswith("dec:")]


def test_transport_stream_pts_from_zero_and_start_without_key_frame_index(tmp_path):
    path = tmp_path / "clip.ts"
    with VideoWriter() as writer:
        writer.open(path, 25, (64, 48))
        for i in range(50):
            writer.write(np.full((48, 64, 3), 5 * i, np.uint8))
    whole = list(open_source({"uri": str(path)}))
    assert len(whole) == 50 and whole[0].pts == pytest.approx(0.0)
    later = list(open_source({"uri": str(path), "start": 1.0}))
    assert len(later) == 25 and later[0].pts == pytest.approx(1.0)
    assert np.array_equal(later[0].image, whole[25].image)
