"""Sources that never hang the graph: range checks, a failing decode thread, oversized images, image file names,
resuming after a restart, the give-up policy and per-stream state, and live pacing of files (`realtime`)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
from PIL import Image

from graphflow.engines.decode import Decode
from graphflow.engines.source import Source
from graphflow import Message, ParamError, StreamEnd
from graphflow.testing import run_source
from graphflow.media.video import SourceError, SourceSpec
from graphflow.media.sources import open_source

DEMO = Path(__file__).resolve().parent.parent / "graphs" / "data" / "demo.mp4"
CLIP_FRAMES, CLIP_FPS, CLIP_GOP = 100, 25, 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 4 s 64×48 H.264 clip made with PyAV, a key frame every 10 frames (so a seek lands near any frame),
    each frame a distinct grey level so frames can be told apart after decoding."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=CLIP_FPS, options={"g": str(CLIP_GOP), "keyint_min": str(CLIP_GOP)})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(CLIP_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 2 * i + 20, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def images(folder: Path, n: int, size: tuple[int, int] = (32, 24)) -> list[str]:
    folder.mkdir(exist_ok=True)
    names = [f"img_{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        Image.new("RGB", size, (10 * i, 0, 0)).save(folder / name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain(engine: Decode, limit_s: float = 60.0) -> list:
    """Every message `engine.generate()` yields; fails the test instead of hanging past `limit_s`."""
    engine.check()
    got, deadline = [], time.monotonic() + limit_s
    gen = engine.generate()
    try:
        for msg in gen:
            assert time.monotonic() < deadline, f"hung: {engine.metrics()['sources']}"
            if isinstance(msg, Message):
                got.append(msg)
    finally:
        gen.close()
    return got


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("start", 1e300), ("start", float("nan")), ("start", float("inf")), ("start", -1),
    ("fps", 1e300), ("fps", float("nan")), ("open_timeout", 0), ("read_timeout", 1e12), ("max_frames", -1),
    ("threads", -1), ("threads", 65), ("threads", 1.5),
])
def test_absurd_numbers_are_one_line_param_errors(field, value):
    with pytest.raises(ParamError) as err:
        Decode("src", {"sources": [{"uri": str(DEMO)}, {"uri": str(DEMO), field: value}]}).check()
    assert err.value.field == f"sources[1].{field}" and "\n" not in str(err.value)
    assert f"(got {value!r})" in str(err.value)


def test_graph_with_absurd_start_fails_validation_naming_the_field(write_graph):
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": [{"uri": str(DEMO), "start": 1e300}]}},
                       "out": {"type": "sink", "params": {"path": "/dev/null"}}},
           "connections": [["src", "out"]]}
    proc = subprocess.run([sys.executable, "-m", "graphflow", "validate", str(write_graph(doc))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "engines.src.params.sources[0].start: must be ≥ 0" in proc.stderr + proc.stdout


def test_a_source_decodes_on_one_thread_unless_told_otherwise():
    """By default a decoder starts no threads of its own (the streams keep the cores busy); with `threads` 2 (or
    0: one per core) FFmpeg starts its own; both decode the same frames."""
    def decoder_threads() -> int:  # FFmpeg names its threads "av:<codec>:<role>"
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(Path(f"/proc/self/task/{task}/comm").read_text())
            except OSError:  # a thread that just ended
                pass
        return sum(name.startswith("av:") for name in names)

    def decoded(**fields):
        source = open_source(SourceSpec(str(DEMO), max_frames=5, **fields))
        try:
            return [f.image for f in source], decoder_threads()
        finally:
            source.close()

    one, extra_one = decoded()
    auto, extra_auto = decoded(threads=2)
    assert extra_one == 0 and extra_auto >= 1 and len(one) == len(auto) == 5
    assert all(np.array_equal(a, b) for a, b in zip(one, auto))


def test_realtime_on_a_live_stream_is_refused():
    with pytest.raises(ParamError) as err:
        Decode("src", {"sources": [{"uri": "rtsp://127.0.0.1:1/cam", "realtime": True}]}).check()
    assert err.value.field == "sources[0].realtime" and "network stream is live already" in str(err.value)


# --- a failing decode thread ------------------------------------------------------------------------------------

def test_unexpected_error_in_a_decode_thread_fails_that_source_alone(caplog):
    engine = Decode("src", {"sources": [{"id": "bad", "uri": str(DEMO)}, {"id": "ok", "uri": str(DEMO),
                                                                          "max_frames": 30}]})
    engine.check()
    # a value past every check reaches FFmpeg's seek, which raises OverflowError (not a SourceError)
    object.__setattr__(engine._specs["bad"], "start", 1e300)
    got = [msg for msg in engine.generate() if isinstance(msg, Message)]  # ends as usual: the failure is counted
    message = engine.metrics()["sources"]["bad"]["error"]
    assert message.startswith("stream 'bad': source ") and "OverflowError" in message and "\n" not in message
    assert [m.seq for m in got if m.stream == "ok"] == list(range(30)) and not [m for m in got if m.stream == "bad"]
    states = {s: m["state"] for s, m in engine.metrics()["sources"].items()}
    assert states == {"bad": "failed", "ok": "ended"} and engine.metrics()["failed"] == engine.metrics()["errors"] == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]


def test_stopping_after_a_source_failed_keeps_its_error(tmp_path):
    images(tmp_path, 3, size=(20, 20))
    engine = Decode("src", {"sources": [{"id": "bad", "uri": str(DEMO)},
                                        {"id": "loop", "uri": str(tmp_path), "loop": True}], "max_pixels": 1000})
    engine.check()
    gen = engine.generate()
    got, deadline = int(isinstance(next(gen), Message)), time.monotonic() + 60
    while engine.metrics()["sources"]["bad"]["state"] != "failed" or got < 3:
        assert time.monotonic() < deadline
        got += isinstance(next(gen), Message)
    engine.stopping.set()  # SIGTERM: the runtime sets stopping, then asks for the next message
    for _ in gen:
        pass
    sources = engine.metrics()["sources"]
    assert sources["loop"]["state"] == "stopped" and re.match(r"^stream 'bad': .*exceed max_pixels 1000$",
                                                               sources["bad"]["error"])
    assert engine.metrics()["errors"] == 1


def test_failed_source_is_counted_as_an_error_of_a_launched_run(tmp_path, write_graph):
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    images(tmp_path / "dir", 3)
    sources = [{"id": "big", "uri": str(DEMO)}, {"id": "small", "uri": str(tmp_path / "dir")}]
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": sources, "max_pixels": 640 * 360 - 1}},
                       "out": {"type": "sink", "params": {"path": str(out), "times": False}}},
           "connections": [["src", "out"]]}
    proc = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", str(write_graph(doc)), "--stats",
                           str(stats)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    src = json.loads(stats.read_text())["engines"]["src"]
    assert src["errors"] == 1 and src["metrics"]["sources"]["big"]["state"] == "failed"
    assert "stream 'big'" in src["metrics"]["sources"]["big"]["error"] and "max_pixels" in proc.stderr
    assert [json.loads(line)["stream"] for line in out.read_text().splitlines()] == ["small"] * 3


def test_a_corrupt_file_beside_a_good_one_ends_alone_and_the_run_exits_3(tmp_path, write_graph):
    """The good stream finishes, the corrupt one fails alone: exit 3, its error printed once, and the stream in the
    summary's streams table as failed."""
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    out = tmp_path / "out.jsonl"
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": [
                           {"id": "good", "uri": str(DEMO), "max_frames": 20}, {"id": "bad", "uri": str(bad)}]}},
                       "out": {"type": "sink", "params": {"path": str(out), "times": False}}},
           "connections": [["src", "out"]]}
    proc = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", str(write_graph(doc))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("bad.mp4") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "finished with 1 error — exit 3" in proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stderr.split("streams:")[1].split("engines:")[0].splitlines()
            if line.strip()}
    assert rows["bad"][1:5] == ["0", "0.0", "0", "failed"] and rows["good"][1] == rows["good"][3] == "20"
    assert [json.loads(line)["stream"] for line in out.read_text().splitlines()] == ["good"] * 20


# --- image folders ----------------------------------------------------------------------------------------------

def test_image_messages_name_their_file(tmp_path):
    names = images(tmp_path, 3)
    out = run_source(Decode, {"sources": [{"id": "dir", "uri": str(tmp_path)}]})
    assert [m.data["file"] for m in out] == names
    one = run_source(Decode, {"sources": [{"uri": str(tmp_path / names[1])}]})
    assert [m.data["file"] for m in one] == [names[1]]
    assert "file" not in run_source(Decode, {"sources": [{"uri": str(DEMO), "max_frames": 1}]})[0].data


def test_huge_image_in_a_folder_is_skipped_with_one_line_and_the_folder_goes_on(tmp_path, caplog):
    names = images(tmp_path, 2)
    Image.new("1", (20000, 20000)).save(tmp_path / "img_00b_huge.png")  # 400 MP, 48 kB on disk
    engine = Decode("src", {"sources": [{"id": "dir", "uri": str(tmp_path)}]})
    out = drain(engine)
    assert [m.data["file"] for m in out] == names and [m.seq for m in out] == [0, 2], "seq = place in the folder"
    assert engine.metrics()["sources"]["dir"]["corrupt"] == 1
    assert engine.metrics()["sources"]["dir"]["state"] == "ended"
    skipped = [r.getMessage() for r in caplog.records if "img_00b_huge.png" in r.getMessage()]
    assert len(skipped) == 1 and "too large" in skipped[0] and "400000000 pixels" in skipped[0], skipped


def test_max_pixels_is_checked_before_decoding(tmp_path, caplog):
    images(tmp_path, 1, size=(32, 24))
    Image.new("RGB", (64, 48)).save(tmp_path / "img_99.png")
    engine = Decode("src", {"sources": [{"id": "dir", "uri": str(tmp_path)}], "max_pixels": 32 * 24})
    assert [m.data["file"] for m in drain(engine)] == ["img_00.png"]
    assert engine.metrics()["sources"]["dir"]["corrupt"] == 1
    assert any("img_99.png: too large: 64×48 pixels exceed max_pixels 768" in r.getMessage() for r in caplog.records)


# --- resume after a restart -------------------------------------------------------------------------------------

def resumed(sources: list[dict], resume: dict[str, int], **params) -> tuple[list, Decode]:
    engine = Decode("src", {"sources": sources, **params})
    engine.resume = resume
    return drain(engine), engine


@pytest.mark.parametrize("fields", [{}, {"fps": 10}, {"start": 1.0}, {"start": 0.5, "fps": 5}])
def test_resumed_file_goes_on_after_the_last_delivered_frame_by_seeking(clip, fields):
    whole = run_source(Decode, {"sources": [{"id": "c", "uri": str(clip), **fields}]})
    last = len(whole) * 3 // 4
    out, engine = resumed([{"id": "c", "uri": str(clip), **fields}], {"c": last})
    assert [m.seq for m in out] == list(range(last + 1, len(whole)))
    assert [m.pts for m in out] == pytest.approx([m.pts for m in whole[last + 1:]])
    assert [int(m.image.mean()) for m in out] == [int(m.image.mean()) for m in whole[last + 1:]]
    assert engine.metrics()["decoded"] <= CLIP_FRAMES - (whole[last].pts - fields.get("start", 0)) * CLIP_FPS + \
        CLIP_GOP, "frames before the last key frame ahead of the resume point are not decoded"
    assert engine.metrics()["kept"] == len(out), "this run's counters count only this run's frames"


def test_killed_decode_process_is_restarted_where_it_was(tmp_path, clip, write_graph):
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    doc = {"engines": {"src": {"type": "decode", "placement": "process", "restart": "on-failure",
                               "params": {"sources": [{"id": "c", "uri": str(clip), "start": 2.0, "realtime": True}]}},
                       "out": {"type": "sink", "params": {"path": str(out), "times": False}}},
           "connections": [["src", "out"]]}
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", "-q", str(write_graph(doc)), "--stats",
                             str(stats)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() or len(out.read_text().splitlines()) < 10:  # the live-paced clip is under way
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        child = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(child) == 1
        child[0].kill()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "died: killed by SIGKILL" in err, err
    seqs = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert seqs == list(range(CLIP_FRAMES // 2)), "every frame once: none replayed, none lost"


def test_resumed_looping_file_continues_in_the_right_pass(clip):
    total = CLIP_FRAMES * 2 + 30
    source = {"id": "c", "uri": str(clip), "loop": True, "max_frames": total}
    whole = run_source(Decode, {"sources": [source]})
    out, _ = resumed([source], {"c": CLIP_FRAMES + 40})
    assert [m.seq for m in out] == list(range(CLIP_FRAMES + 41, total))
    assert [m.pts for m in out] == pytest.approx([m.pts for m in whole[CLIP_FRAMES + 41:]])


def test_resumed_image_folder_starts_at_the_next_image(tmp_path):
    names = images(tmp_path, 5)
    (tmp_path / names[1]).write_bytes(b"not a png")  # skipped, before the resume point
    whole = run_source(Decode, {"sources": [{"id": "dir", "uri": str(tmp_path)}]})
    assert [(m.seq, m.data["file"]) for m in whole] == [(0, names[0]), (2, names[2]), (3, names[3]), (4, names[4])]
    out, _ = resumed([{"id": "dir", "uri": str(tmp_path)}, {"id": "other", "uri": str(DEMO), "max_frames": 3}],
                     {"dir": whole[1].seq})
    assert [(m.seq, m.data["file"]) for m in out if m.stream == "dir"] == [(3, names[3]), (4, names[4])]
    assert [m.seq for m in out if m.stream == "other"] == [0, 1, 2], "a stream not in resume starts from 0"


def test_resume_past_the_end_delivers_nothing_and_ends(clip):
    out, engine = resumed([{"id": "c", "uri": str(clip)}], {"c": CLIP_FRAMES - 1})
    assert out == [] and engine.metrics()["sources"]["c"]["state"] == "ended"


# --- give-up policy and per-stream state ----------------------------------------------------------------------

def test_closed_port_is_given_up_after_give_up_s_while_connecting():
    url = f"rtsp://127.0.0.1:{free_port()}/cam"
    engine = Decode("src", {"sources": [{"id": "cam", "uri": url}, {"id": "file", "uri": str(DEMO), "max_frames": 20}],
                            "retry": 0.05, "retry_max": 0.1, "attempts": 0, "give_up_s": 0.6})
    engine.check()
    states, got = set(), []
    for msg in engine.generate():
        got += [msg] if isinstance(msg, Message) else []
        if not isinstance(msg, StreamEnd):  # a source's end comes once it has failed
            states.add(engine.metrics()["sources"]["cam"]["state"])
    message = engine.metrics()["sources"]["cam"]["error"]
    assert message.startswith("stream 'cam': source " + url) and "Connection refused" in message
    assert "without a frame (give_up_s 0.6)" in message and "\n" not in message
    assert states <= {"connecting"}, "connecting until a first frame, never running"
    cam = engine.metrics()["sources"]["cam"]
    assert cam["state"] == "failed" and cam["failed_attempts"] >= 3
    assert [m.seq for m in got if m.stream == "file"] == list(range(20))


def test_file_source_states_running_ended_stopped():
    engine = Decode("src", {"sources": [{"id": "short", "uri": str(DEMO), "max_frames": 5},
                                        {"id": "long", "uri": str(DEMO), "loop": True}]})
    engine.check()
    seen: dict[str, set] = {"short": set(), "long": set()}
    gen = engine.generate()
    for i, msg in enumerate(gen):
        for stream, m in engine.metrics()["sources"].items():
            seen[stream].add(m["state"])
        if engine.metrics()["sources"]["short"]["state"] == "ended" and i > 50:
            break
    gen.close()
    assert "running" in seen["long"] and "running" in seen["short"]
    assert {s: m["state"] for s, m in engine.metrics()["sources"].items()} == {"short": "ended", "long": "stopped"}


# --- live pacing --------------------------------------------------------------------------------------------------

def test_realtime_releases_each_frame_at_its_pts_looping_included(clip):
    engine = Decode("src", {"sources": [{"id": "c", "uri": str(clip), "start": 3.6, "loop": True, "realtime": True,
                                         "max_frames": 15}]})  # 10 frames to the end, 5 of the second pass
    engine.check()
    arrivals, out = [], []
    for msg in engine.generate():
        if isinstance(msg, Message):
            arrivals.append(time.time())
            out.append(msg)
    assert len(out) == 15
    pts = np.array([m.pts for m in out])
    capture = np.array([m.times["capture"] for m in out])
    assert np.all(np.diff(pts) > 0)
    assert np.allclose(capture - capture[0], pts - pts[0], atol=1e-6), "capture is the due time"
    assert all(a >= c - 1e-3 for a, c in zip(arrivals, capture)), "no frame is released before it is due"


def test_realtime_late_frames_are_released_not_skipped(clip):
    engine = Decode("src", {"sources": [{"id": "c", "uri": str(clip), "max_frames": 12, "realtime": True}],
                            "queue_size": 1})
    engine.check()
    out = []
    for msg in engine.generate():
        if isinstance(msg, Message):
            out.append(msg)
            time.sleep(0.1)  # a consumer slower than 25 fps
    assert [m.seq for m in out] == list(range(12))
    capture = np.array([m.times["capture"] for m in out])
    assert np.allclose(np.diff(capture), 1 / CLIP_FPS, atol=1e-6), "stamped when due, though released late"


def test_realtime_stops_promptly_while_waiting(tmp_path):
    images(tmp_path, 3)
    engine = Decode("src", {"sources": [{"id": "dir", "uri": str(tmp_path), "fps": 0.01, "realtime": True}]})
    engine.check()
    gen = engine.generate()
    first = next(m for m in gen if isinstance(m, Message))
    assert first.seq == 0
    stopper = threading.Timer(0.2, engine.stopping.set)
    stopper.start()
    rest = [m for m in gen if isinstance(m, Message)]
    assert rest == [] and engine.metrics()["sources"]["dir"]["state"] == "stopped"
    assert not [t for t in threading.enumerate() if t.name.startswith("src:")]


# --- sources added and removed while running (service mode) ----------------------------------------------------

def test_sources_added_and_removed_while_running(tmp_path):
    images(tmp_path, 3)
    engine = Decode("src", {"sources": [{"id": "a", "uri": str(tmp_path), "loop": True}]})
    engine.check()
    out, removed, deadline = [], False, time.monotonic() + 60
    gen = engine.generate()
    try:
        for msg in gen:
            assert time.monotonic() < deadline, engine.metrics()["sources"]
            if msg is None:
                continue
            out.append(msg)
            if len(out) == 5:
                adder = threading.Thread(target=engine.add_source, args=({"id": "b", "uri": str(DEMO),
                                                                          "max_frames": 10},))
                adder.start()  # from another thread, as the service's control channel would
                adder.join()
            if len([m for m in out if m.stream == "b"]) == 3 and not removed:
                engine.remove_source("a")
                removed = True
    finally:
        gen.close()
    a = [m for m in out if m.stream == "a"]
    assert [m.seq for m in a[:-1]] == list(range(len(a) - 1)) and a[-1] == StreamEnd("a")
    b = [m for m in out if m.stream == "b"]
    assert [m.seq for m in b[:-1]] == list(range(10)) and b[-1] == StreamEnd("b"), "generate() ran on until b ended"
    # a removed source is forgotten once its end went out; one that ended stays listed
    assert {s: m["state"] for s, m in engine.metrics()["sources"].items()} == {"b": "ended"}
    assert not [t for t in threading.enumerate() if t.name.startswith("src:")]


def test_adding_a_bad_or_duplicate_source_and_removing_an_unknown_one_are_param_errors():
    engine = Decode("src", {"sources": [{"id": "a", "uri": str(DEMO)}]})
    engine.check()
    with pytest.raises(ParamError) as err:
        engine.add_source({"id": "b", "uri": str(DEMO), "start": 1e300})
    assert err.value.field == "start"  # the entry's own field: the user never wrote a sources list
    with pytest.raises(ParamError) as err:
        engine.add_source({"id": "a", "uri": str(DEMO)})
    assert err.value.field == "id"
    with pytest.raises(ParamError) as err:
        engine.add_source({"id": "bad3", "uri": "/nonexist.mp4"})
    assert str(err.value) == "uri: file not found: '/nonexist.mp4'"
    with pytest.raises(ParamError, match="no source with id 'zz' \\(sources: a\\)"):
        engine.remove_source("zz")
    assert engine.add_source({"id": "c", "uri": str(DEMO), "max_frames": 2}) == "c"  # before generate(): at its start
    got = [m for m in engine.generate() if isinstance(m, Message)]
    assert sorted((m.stream, m.seq) for m in got) == [("a", i) for i in range(250)] + [("c", 0), ("c", 1)]


def test_waiting_for_sources_runs_with_none_until_stopped(tmp_path):
    images(tmp_path, 2)
    engine = Decode("src", {"sources": [], "wait_for_sources": True, "queue_size": 1})
    engine.check()
    gen = engine.generate()
    assert [next(gen) for _ in range(3)] == [None] * 3, "no source yet: heartbeats, not the end"
    for i in range(3):  # more sources than the queue had room for at the start
        engine.add_source({"id": f"s{i}", "uri": str(tmp_path)})
    got: list = []
    while len([m for m in got if isinstance(m, Message)]) < 6:
        got.append(next(gen))
    assert sorted((m.stream, m.seq) for m in got if isinstance(m, Message)) == [(f"s{i}", j) for i in range(3) for j in (0, 1)]
    while sum(isinstance(m, StreamEnd) for m in got) < 3:  # each source's end follows its last frame
        got.append(next(gen))
    assert [next(gen) for _ in range(3)] == [None] * 3, "all sources ended: still waiting for more"
    engine.stopping.set()
    assert list(gen) == []
    with pytest.raises(ParamError, match="wait_for_sources"):
        Decode("src", {"sources": []}).check()


def test_synthetic_source_resumes_each_stream_after_its_last_seq():
    engine = Source("src", {"count": 10, "streams": 2})
    engine.resume = {"s0": 4, "s1": 6}
    out = run_source(engine)
    assert [(m.stream, m.seq) for m in out] == [("s0", i) for i in (5, 6)] + \
        [(s, i) for i in (7, 8, 9) for s in ("s0", "s1")]


@pytest.mark.parametrize("fields", [{}, {"fps": 10}, {"fps": 7, "start": 1.5}, {"max_frames": 9}, {"start": 2.0}])
def test_a_files_length_from_its_header_is_the_frames_it_gives(fields):
    """What launch's progress share and ETA divide by: the header's count through start, fps and max_frames."""
    src = open_source(SourceSpec(uri=str(DEMO), **fields))
    expected = src.length()
    assert expected == sum(1 for _ in src)
    src.close()


def test_length_is_unknown_for_a_loop_and_counted_for_images(tmp_path):
    assert open_source(SourceSpec(uri=str(DEMO), loop=True)).length() is None
    assert open_source(SourceSpec(uri=str(DEMO), loop=True, max_frames=12)).length() == 12
    images(tmp_path / "imgs", 5)
    assert open_source(SourceSpec(uri=str(tmp_path / "imgs"), start=0.08)).length() == 3  # 25 fps: 2 skipped


def test_decode_reports_each_streams_expected_frames():
    engine = Decode("src", {"sources": [{"id": "a", "uri": str(DEMO), "fps": 5}, {"id": "b", "uri": str(DEMO),
                                                                               "loop": True, "max_frames": 4}]})
    got = drain(engine)
    per = engine.metrics()["sources"]
    assert (per["a"]["expected"], per["b"]["expected"]) == (50, 4)
    assert len([m for m in got if isinstance(m, Message) and m.stream == "a"]) == 50
