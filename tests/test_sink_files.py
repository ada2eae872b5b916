"""File sinks over time and streams: one stream's id, size or failing file never stops another stream's file;
names are safe and collision-free; sinks create their folders; rotation and retention bound the files; a previous
run's file is kept, not overwritten; the `sink` engine is the jsonl sink (whole lines on a full disk)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from graphflow import Message, StreamEnd
from graphflow.engines.publish import Publish
from graphflow.engines.publish.base import safe_name
from graphflow.engines.sink import Sink
from graphflow.testing import run_engine

ROOT = Path(__file__).resolve().parents[1]


def frames(stream: str, n: int, h: int = 32, w: int = 48, start: int = 0) -> list[Message]:
    return [Message(stream=stream, seq=start + i, arrays={"image": np.full((h, w, 3), 60, np.uint8)},
                    data={"tracks": [{"box": [2, 2, 20, 20], "track_id": 1, "score": 0.9}]}) for i in range(n)]


def interleave(*groups: list[Message]) -> list[Message]:
    return [m for ms in zip(*groups) for m in ms]


def sizes(path: Path) -> list[tuple[int, int]]:
    """(height, width) of each frame of a video file."""
    with av.open(str(path)) as container:
        return [(f.height, f.width) for f in container.decode(video=0)]


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- one stream never stops another -----------------------------------------------------------------------------

def test_a_60000_character_stream_id_costs_no_stream_anything(tmp_path, caplog):
    long_id = "x" * 60_000
    msgs = interleave(frames("a", 4), frames(long_id, 4)) + frames("b", 4)   # b comes after the long one
    engine = Publish("out", {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4")},
                                       {"kind": "mot", "path": str(tmp_path / "m_{stream}.txt")}]})
    run_engine(engine, messages=msgs)
    assert not errors(caplog) and engine.metrics()["lost"] == 0
    for stream in ("a", long_id, "b"):
        video = tmp_path / f"v.{safe_name(stream)}.mp4"
        assert len(sizes(video)) == 4 and len(video.name.encode()) < 100
        assert len((tmp_path / f"m_{safe_name(stream)}.txt").read_text().splitlines()) == 4


def test_ids_that_clean_to_the_same_name_never_share_a_file(tmp_path):
    ids = ["a/b", "a_b", "a?b", "a b", "..", ""]
    run_engine(Publish, {"sinks": [{"kind": "mot", "path": str(tmp_path / "r_{stream}.txt")}]},
               [m for s in ids for m in frames(s, 1)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == len(ids) and "r_a_b.txt" in names
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())   # `..` stays in the folder


def test_a_stream_whose_file_fails_stops_alone(tmp_path, caplog):
    (tmp_path / "v.bad.mp4").mkdir()          # in the way of stream bad's file
    engine = Publish("out", {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4")}]})
    run_engine(engine, messages=interleave(frames("good", 5), frames("bad", 5)) + frames("later", 3))
    assert len(sizes(tmp_path / "v.good.mp4")) == 5 and len(sizes(tmp_path / "v.later.mp4")) == 3
    video = engine.metrics()["sinks"]["0:video"]
    assert video["written"] == 8 and video["lost"] == 5 and video["streams_failed"] == 1
    assert video["error"].startswith("stream 'bad': ")
    (line,) = errors(caplog)
    assert line.startswith("publish 'out': sink 0 (video ") and "stream 'bad' failed: " in line


def test_a_failed_stream_tries_again_when_it_comes_back(tmp_path):
    blocker = tmp_path / "v.cam.mp4"
    blocker.mkdir()
    engine = Publish("out", {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4")}]})

    def feed() -> Iterator[Message]:
        yield from frames("cam", 2)
        yield StreamEnd("cam")
        blocker.rmdir()                       # the way is clear for the stream's next life
        yield from frames("cam", 3, start=2)

    run_engine(engine, messages=feed())
    assert len(sizes(blocker)) == 3 and engine.metrics()["sinks"]["0:video"]["lost"] == 2


def test_streams_of_different_sizes_each_keep_their_file(tmp_path, caplog):
    shapes = {"s1": (512, 512), "s2": (400, 600), "s3": (240, 320), "s4": (96, 128)}
    msgs = interleave(*(frames(s, 3, h, w) for s, (h, w) in shapes.items()))
    engine = Publish("out", {"sinks": [{"kind": "video", "path": str(tmp_path / "v_{stream}.mp4")}]})
    run_engine(engine, messages=msgs)
    assert not errors(caplog) and engine.metrics()["lost"] == 0
    for s, shape in shapes.items():
        assert sizes(tmp_path / f"v_{s}.mp4") == [shape] * 3


def test_a_size_change_starts_a_new_file_and_keeps_the_earlier_one(tmp_path):
    run_engine(Publish, {"sinks": [{"kind": "video", "path": str(tmp_path / "v_{stream}.mp4")}]},
               frames("cam", 3, 48, 64) + frames("cam", 2, 96, 128, start=3))
    (earlier,) = tmp_path.glob("v_cam@*.mp4")
    assert sizes(earlier) == [(48, 64)] * 3 and sizes(tmp_path / "v_cam.mp4") == [(96, 128)] * 2


# --- folders -------------------------------------------------------------------------------------------------

def test_file_sinks_create_their_folders(tmp_path):
    out = tmp_path / "not" / "yet"
    sinks = [{"kind": "jsonl", "path": str(out / "j" / "a.jsonl")},
             {"kind": "mot", "path": str(out / "m" / "{stream}.txt")},
             {"kind": "video", "path": str(out / "v" / "{stream}" / "rec.mp4")},
             {"kind": "snapshot", "path": str(out / "s")}]
    engine = Publish("out", {"sinks": sinks})
    engine.check()                            # validation creates nothing
    assert not out.exists()
    run_engine(engine, messages=frames("cam", 2))
    assert engine.metrics()["lost"] == 0
    assert len((out / "j" / "a.jsonl").read_text().splitlines()) == 2
    assert len((out / "m" / "cam.txt").read_text().splitlines()) == 2
    assert len(sizes(out / "v" / "cam" / "rec.mp4")) == 2 and (out / "s").is_dir()


# --- previous runs, rotation, retention ------------------------------------------------------------------------

def lines_of(paths: list[Path]) -> list[int]:
    """The seq of every line in `paths`, in order; each line must be whole JSON."""
    return [json.loads(line)["seq"] for p in paths for line in p.read_text().splitlines()]


def test_a_previous_runs_file_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "events.jsonl"
    run_engine(Publish, {"sinks": [{"kind": "jsonl", "path": str(path)}]}, frames("cam", 3))
    run_engine(Publish, {"sinks": [{"kind": "jsonl", "path": str(path)}]}, frames("cam", 2, start=10))
    (kept,) = tmp_path.glob("events@*Z.jsonl")
    assert lines_of([kept]) == [0, 1, 2] and lines_of([path]) == [10, 11]
    run_engine(Publish, {"sinks": [{"kind": "jsonl", "path": str(path), "overwrite": True}]},
               frames("cam", 1, start=20))
    assert lines_of([path]) == [20] and list(tmp_path.glob("events@*")) == [kept]


def test_the_sink_engine_keeps_a_previous_runs_file_too(tmp_path):
    path = tmp_path / "out.jsonl"
    run_engine(Sink, {"path": str(path)}, frames("cam", 2))
    run_engine(Sink, {"path": str(path), "times": False}, frames("cam", 1, start=5))
    (kept,) = tmp_path.glob("out@*.jsonl")
    assert lines_of([kept]) == [0, 1] and [json.loads(x) for x in path.read_text().splitlines()] == \
        [{"stream": "cam", "seq": 5, "pts": None, "tracks": [{"box": [2, 2, 20, 20], "track_id": 1, "score": 0.9}]}]


def test_jsonl_rotates_by_size_and_keeps_the_newest_files(tmp_path):
    path = tmp_path / "e.jsonl"
    msgs = [Message(stream="s", seq=i, data={"blob": "x" * 200}) for i in range(60)]
    engine = Publish("out", {"sinks": [{"kind": "jsonl", "path": str(path), "rotate_mb": 2000 / 2**20,
                                        "keep_files": 3, "times": False}]})
    run_engine(engine, messages=msgs)
    earlier = sorted(tmp_path.glob("e@*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    assert len(earlier) == 3 and all(p.stat().st_size >= 2000 for p in earlier)
    seqs = lines_of([*earlier, path])
    assert seqs == list(range(60 - len(seqs), 60))     # the newest lines, whole and in order; older files deleted
    assert engine.metrics()["sinks"]["0:jsonl"]["written"] == 60


def test_retention_by_size_and_age(tmp_path):
    path = tmp_path / "e.jsonl"
    old = tmp_path / "e@20200101T000000000Z.jsonl"
    old.write_text('{"seq": -1}\n')
    os.utime(old, (time.time() - 3 * 86400,) * 2)   # three days old
    stranger = tmp_path / "e.cam@20200101T000000000Z.jsonl"   # another path's segment: never touched
    stranger.write_text("x\n")
    os.utime(stranger, (time.time() - 3 * 86400,) * 2)
    msgs = [Message(stream="s", seq=i, data={"blob": "x" * 500}) for i in range(40)]
    run_engine(Publish, {"sinks": [{"kind": "jsonl", "path": str(path), "rotate_mb": 1500 / 2**20,
                                    "keep_mb": 5000 / 2**20, "keep_days": 1}]}, msgs)
    earlier = list(tmp_path.glob("e@*.jsonl"))
    assert not old.exists() and stranger.exists()
    assert sum(p.stat().st_size for p in earlier) <= 5000 and len(earlier) >= 2


def test_rotation_by_time(tmp_path):
    path = tmp_path / "r.txt"
    engine = Publish("out", {"sinks": [{"kind": "mot", "path": str(tmp_path / "r_{stream}.txt"), "rotate_s": 0.2}]})

    def feed() -> Iterator[Message]:
        for m in frames("cam", 6):
            yield m
            time.sleep(0.1)

    run_engine(engine, messages=feed())
    files = [*tmp_path.glob("r_cam@*.txt"), tmp_path / "r_cam.txt"]
    assert len(files) >= 3 and not path.exists()
    assert sum(len(p.read_text().splitlines()) for p in files) == 6


def test_video_rotates_by_size_into_playable_files(tmp_path):
    rng = np.random.default_rng(1)
    msgs = [Message(stream="cam", seq=i, arrays={"image": rng.integers(0, 255, (96, 128, 3), np.uint8)})
            for i in range(40)]
    run_engine(Publish, {"sinks": [{"kind": "video", "path": str(tmp_path / "v.mp4"), "rotate_mb": 0.05}]}, msgs)
    files = [*tmp_path.glob("v.cam@*.mp4"), tmp_path / "v.cam.mp4"]
    assert len(files) >= 2 and sum(len(sizes(p)) for p in files) == 40


# --- the sink engine is the jsonl sink ------------------------------------------------------------------------

def test_the_sink_engine_past_a_file_size_limit_keeps_whole_lines(tmp_path):
    """Service hardening 7b: `sink` on a full disk (here RLIMIT_FSIZE) leaves no torn last line."""
    path = tmp_path / "out.jsonl"
    child = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from graphflow.engines.sink import Sink
        from graphflow import Message
        from graphflow.testing import run_engine
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        engine = Sink("out", {{"path": {str(path)!r}}})
        run_engine(engine, messages=[Message(stream="s", seq=i, data={{"blob": "x" * 1000}}) for i in range(100)])
        print(json.dumps(engine.metrics()))
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.splitlines()[-1])
    data = path.read_bytes()
    assert data.endswith(b"\n") and lines_of([path]) == list(range(len(data.splitlines())))
    assert 0 < stats["written"] == len(data.splitlines()) < 100 and stats["lost"] == 100 - stats["written"]
    assert "File too large" in stats["error"]


def test_the_sink_engine_writes_what_it_wrote_before(tmp_path):
    """The preset keeps `sink`'s format: record keys in order, `arrays` shapes, `times` on by default."""
    path = tmp_path / "o.jsonl"
    msg = Message(stream="c", seq=3, pts=0.3, arrays={"image": np.zeros((2, 4, 3), np.uint8)}, data={"n": 1})
    msg.times["decode"] = 1.5
    run_engine(Sink, {"path": str(path), "arrays": True}, [msg])
    (row,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert list(row) == ["stream", "seq", "pts", "n", "arrays", "times"]
    assert row["arrays"] == {"image": [[2, 4, 3], "|u1"]} and row["times"] == {"decode": 1.5}


@pytest.mark.parametrize("params, text", [
    ({"path": "/dev/null/x.jsonl"}, "path: cannot create '/dev/null': '/dev/null' is a file"),
])
def test_the_sink_engine_names_its_own_field(params, text):
    from graphflow import ParamError
    with pytest.raises(ParamError) as err:
        Sink("out", params).check()
    assert str(err.value).startswith("path: ") and err.value.field == "path"


def test_a_stream_back_in_the_same_run_keeps_its_earlier_file_even_with_overwrite(tmp_path):
    msgs = [*frames("cam", 2), StreamEnd("cam"), *frames("cam", 3, start=2)]
    run_engine(Publish, {"sinks": [{"kind": "mot", "path": str(tmp_path / "r_{stream}.txt"), "overwrite": True}]}, msgs)
    (earlier,) = tmp_path.glob("r_cam@*.txt")
    assert len(earlier.read_text().splitlines()) == 2 and len((tmp_path / "r_cam.txt").read_text().splitlines()) == 3


def test_snapshots_of_a_second_run_never_replace_the_first_runs(tmp_path):
    image = np.full((40, 60, 3), 10, np.uint8)
    event = {"rule": "door", "event": "enter", "track_id": 1}

    def shot(value: int) -> Message:
        return Message(stream="cam", seq=0, arrays={"image": image + value},
                       data={"tracks": [{"box": [5, 5, 30, 30], "track_id": 1}], "events": [event]})

    for value in (0, 100):                   # the same stream, rule, track, frame and event twice
        run_engine(Publish, {"sinks": [{"kind": "snapshot", "path": str(tmp_path), "mode": "frame"}]}, [shot(value)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cam_door_t1_f000000_enter-1.jpg", "cam_door_t1_f000000_enter.jpg"]
    from PIL import Image
    with Image.open(tmp_path / names[1]) as first, Image.open(tmp_path / names[0]) as second:
        assert np.asarray(first).mean() < 30 < np.asarray(second).mean()
