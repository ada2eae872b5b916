"""A stream's end frees what every built-in engine holds for it, and rules change per stream while running."""
from __future__ import annotations

import av
import numpy as np
import pytest

from graphflow.engines.publish import Publish
from graphflow.engines.rule import Rule
from graphflow.engines.track import Track
from graphflow import Message, ParamError, StreamEnd
from graphflow.testing import run_engine, start_engine
from graphflow.batching.scheduler import RETIRED_KEEP, BatchPolicy, Scheduler

W, H = 640, 360
LINE = [[0.5, 0.0], [0.5, 1.0]]


def det(x: float, y: float) -> dict:
    return {"box": [x - 20, y - 80, x + 20, y], "score": 0.9, "class_id": 0, "label": "person"}


def walking(stream: str, frames: int = 30) -> list[Message]:
    """One person walking left to right across the whole frame."""
    return [Message(stream, f, pts=f / 10, data={"width": W, "height": H, "detections": [det(100 + 15 * f, 200)]})
            for f in range(frames)]


def test_track_forgets_a_stream_at_its_end_and_starts_afresh_after():
    engine = Track("trk", {"min_hits": 2})
    out = run_engine(engine, messages=walking("a", 3) + [StreamEnd("a")] + walking("a", 2))["out"]
    assert out[3] == StreamEnd("a")  # passed on, in its place
    frames = [m for m in out if isinstance(m, Message)]
    # a stream's first frame shows its objects at once; after the end the tracker starts afresh: a first frame
    # again, ids from 1 (a tracker kept would hold the person back a frame, as a new track, and number it 2)
    assert [len(m.data["tracks"]) for m in frames] == [1, 1, 1, 1, 1]
    assert [m.data["tracks"][0]["track_id"] for m in frames] == [1, 1, 1, 1, 1]
    assert list(engine.trackers) == ["a"]
    run_engine(engine, messages=[StreamEnd("a")])
    assert engine.trackers == {}


def test_rules_set_per_stream_apply_from_the_next_frame_and_go_with_the_stream():
    engine = Rule("zone", {"rules": [{"id": "door", "kind": "line_cross", "line": LINE}]})
    tracked = run_engine(Track, {"min_hits": 1}, walking("a") + walking("b"))["out"]
    with start_engine(engine) as harness:
        sent = harness.out["out"]
        engine.on_command("set_rules", {"stream": "b", "rules": [
            {"id": "left", "kind": "line_cross", "line": [[0.2, 0.0], [0.2, 1.0]]},
            {"id": "right", "kind": "line_cross", "line": [[0.8, 0.0], [0.8, 1.0]]}]})
        for msg in tracked:
            engine.process(msg)
        rules = {m.stream: [e["rule"] for e in m.data["events"]] for m in sent if m.data["events"]}
        got = {s: sorted(r for m in sent if m.stream == s for r in (e["rule"] for e in m.data["events"])) for s in "ab"}
        assert got == {"a": ["door"], "b": ["left", "right"]}, rules
        assert [r["id"] for r in engine.on_command("rules", {"stream": "b"})] == ["left", "right"]
        assert [r["id"] for r in engine.on_command("rules", {"stream": "a"})] == ["door"]
        with pytest.raises(ParamError, match=r"rules\[0\]\.line"):
            engine.on_command("set_rules", {"stream": "b", "rules": [{"kind": "line_cross", "line": [[0, 0]]}]})
        assert engine.metrics()["events"] == {"a": {"door cross B->A": 1}, "b": {"left cross B->A": 1,
                                                                                "right cross B->A": 1}}
        engine.on_stream_end("b")
        assert set(engine.ruleset.streams) == {"a"} and engine.ruleset.own == {}
        # the ended stream's counts stay for the summary
        assert engine.metrics()["streams_held"] == 1 and "b" in engine.metrics()["events"]
        with pytest.raises(ValueError, match="no command 'reboot'"):
            engine.on_command("reboot", {})


def test_a_video_file_is_finished_when_its_stream_ends(tmp_path):
    frames = [Message("a", i, data={"width": 64, "height": 48}, arrays={"image": np.full((48, 64, 3), 9 * i, np.uint8)})
              for i in range(5)]
    engine = Publish("out", {"sinks": [{"kind": "video", "path": str(tmp_path / "{stream}.mp4"), "fps": 5}]})
    with start_engine(engine):
        for msg in frames:
            engine.process(msg)
        engine.on_stream_end("a")
        assert engine.outs[0].writers == {}, "the stream's writer is closed at its end"
        with av.open(str(tmp_path / "a.mp4")) as f:  # playable now, while the run goes on
            assert sum(1 for _ in f.decode(video=0)) == 5


def test_the_scheduler_forgets_ended_streams_and_keeps_a_bounded_record_of_them():
    scheduler = Scheduler(BatchPolicy(max_batch=4, max_wait_s=0.0, queue=4, drop="drop_oldest"))
    for i in range(RETIRED_KEEP + 10):
        scheduler.put(f"s{i}", i)
        batch = scheduler.take()
        for entry in batch:
            scheduler.completed(entry)
        scheduler.forget(f"s{i}")
    assert scheduler.queues == {}
    assert len(scheduler.stats.streams) == RETIRED_KEEP  # the last ended ones, for the summary
    scheduler.put("s10", 0)  # an id used again is live again: no longer among the retired
    scheduler.completed(scheduler.take()[0])
    assert "s10" in scheduler.stats.streams and "s10" not in scheduler.stats._retired


def test_the_runtime_forgets_the_counters_of_streams_long_ended(monkeypatch):
    """Per-stream counters of every engine stay bounded while streams come and go (the last ENDED_KEEP stay)."""
    from graphflow import graph
    from graphflow import runtime
    from graphflow.runtime import actor

    monkeypatch.setattr(actor, "ENDED_KEEP", 3)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 2, "streams": 10}},
                       "out": {"type": "sink", "params": {"path": "/dev/null"}}},
           "connections": [["src.out", "out.in"]]}
    summary = runtime.run(graph.build(doc, "ends"), handle_signals=False)
    assert summary.exit_code == 0
    for engine in ("src", "out"):
        assert len(summary.stats[engine]["streams"]) == 3, summary.stats[engine]["streams"]
    assert summary.stats["out"]["received"] == 20
