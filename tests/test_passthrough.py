"""Messages that are not frames (notes, per-stream totals) pass through the built-in engines unchanged, in their
stream's order, through a real graph: decoded video, the real model (in a process of its own), tracker and rules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graphflow.engines.infer import Infer
from graphflow.engines.preprocess import Preprocess
from graphflow.engines.rule import Rule
from graphflow.engines.track import Track
from graphflow import Message
from graphflow import graph
from graphflow import runtime
from graphflow.testing import run_engine

VIDEO = str(Path(__file__).resolve().parents[1] / "graphs" / "data" / "demo.mp4")

USER_ENGINES = '''
from graphflow import Engine, Message


class Note(Engine):
    """Passes frames on; after each stream's third frame and at end of stream it sends a message without a frame."""

    def setup(self):
        self.frames = {}

    def process(self, msg):
        self.send(msg)
        n = self.frames[msg.stream] = self.frames.get(msg.stream, 0) + 1
        if n == 3:
            self.send(Message(stream=msg.stream, seq=msg.seq, data={"note": f"after frame {msg.seq}"}))

    def flush(self):
        for stream, n in self.frames.items():
            self.send(Message(stream=stream, seq=n, data={"frames_seen": n}))


class CountDetections(Engine):
    """Sums detections per stream over its frames and sends the sum at end of stream; other messages go on as they are."""

    def setup(self):
        self.sums = {}

    def process(self, msg):
        if "image" in msg.arrays:
            self.sums[msg.stream] = self.sums.get(msg.stream, 0) + len(msg.data["detections"])
        self.send(msg)

    def flush(self):
        for stream, total in self.sums.items():
            self.send(Message(stream=stream, seq=-1, data={"detections_summed": total}))
'''


def test_messages_without_frames_cross_every_built_in_engine_in_order(tmp_path, user_module):
    module = user_module("passthrough_engines", USER_ENGINES)
    out = tmp_path / "out.jsonl"
    engines = {
        "src": {"type": "decode", "params": {"sources": [{"id": "cam", "uri": VIDEO, "max_frames": 6}]}},
        "note": {"type": f"{module}:Note"},
        "pre": {"type": "preprocess"},
        # a batch waits for 4 frames: the note after frame 2 reaches infer while frames 0-2 are still queued there
        "det": {"type": "infer", "placement": "process", "params": {"max_batch": 4, "max_wait_ms": 300}},
        "count": {"type": f"{module}:CountDetections"},
        "trk": {"type": "track"},
        "zone": {"type": "rule", "params": {"rules": [{"id": "door", "kind": "line_cross", "line": [[0.5, 0], [0.5, 1]]}]}},
        "out": {"type": "sink", "params": {"path": str(out)}},
    }
    chain = ["src", "note", "pre", "det", "count", "trk", "zone", "out"]
    doc = {"engines": engines, "connections": [[f"{a}.out", f"{b}.in"] for a, b in zip(chain, chain[1:])]}
    summary = runtime.run(graph.build(doc, "passthrough"), handle_signals=False)
    assert not summary.failed, summary.errors

    records = [json.loads(line) for line in out.read_text().splitlines()]
    shapes = [("frame", r["seq"]) if "detections" in r else next(k for k in r if k not in ("stream", "seq", "pts",
                                                                                           "times"))
              for r in records]
    assert shapes == [("frame", 0), ("frame", 1), ("frame", 2), "note", ("frame", 3), ("frame", 4), ("frame", 5),
                      "frames_seen", "detections_summed"]
    frames = [r for r in records if "detections" in r]
    assert all("tracks" in r and "events" in r for r in frames)
    note, seen, summed = (r for r in records if "detections" not in r)
    for record, data in ((note, {"note": "after frame 2"}), (seen, {"frames_seen": 6}),
                         (summed, {"detections_summed": sum(len(r["detections"]) for r in frames)})):
        assert {k: v for k, v in record.items() if k != "times"} == {"stream": "cam", "seq": record["seq"],
                                                                      "pts": None, **data}
    assert summed["detections_summed"] > 0
    passed = {name: summary.stats[name]["metrics"]["passed_through"] for name in ("pre", "det", "trk", "zone")}
    assert passed == {"pre": 2, "det": 2, "trk": 3, "zone": 3}


@pytest.mark.parametrize("engine, params, picture, needs", [
    (Preprocess, {}, "tensor", "arrays\\['image'\\]"),
    (Infer, {}, "image", "arrays\\['tensor'\\]"),
    (Infer, {"letterbox": True}, "tensor", "arrays\\['image'\\]"),
    (Track, {}, "image", "data\\['detections'\\]"),
    (Rule, {"rules": []}, "image", "data\\['tracks'\\]"),
    (Rule, {"rules": []}, "detections", "data\\['tracks'\\]"),  # detfile's frames: detections, no picture
])
def test_a_frame_without_what_an_engine_takes_is_an_error(engine, params, picture, needs):
    """A message with a picture or detections is a frame: one lacking the engine's input means the engine is
    misplaced."""
    frame = Message(stream="cam", seq=4)
    if picture == "image":
        frame.arrays["image"] = np.zeros((8, 8, 3), np.uint8)
    elif picture == "tensor":
        frame.arrays["tensor"] = np.zeros((3, 416, 416), np.float32)
    else:
        frame.data["detections"] = []
    with pytest.raises(ValueError, match=f"^test: frame cam#4 has no {needs} \\(.+\\)$"):
        run_engine(engine, params, [frame])


def test_infer_holds_a_message_behind_queued_frames_and_releases_it_past_a_dropped_one():
    """Within a stream, a passed-through message leaves infer after the frames queued before it; when the frame it
    waits for is dropped, it leaves before the next frame instead."""
    frames = run_engine(Preprocess, {}, [Message("cam", seq, arrays={"image": np.full((48, 64, 3), seq, np.uint8)})
                                         for seq in range(2)])["out"]
    note = Message("cam", 0, data={"note": "after frame 0"})
    other = Message("side", 0, data={"note": "another stream"})
    # a batch never fills (2 frames, 1 queued per stream) before flush; a new frame drops the queued one
    params = {"max_batch": 2, "max_wait_ms": 10_000, "queue": 1, "drop": "drop_oldest"}
    engine = Infer("test", params)
    out = run_engine(engine, messages=[frames[0], note, other, frames[1]])["out"]
    assert [(m.stream, m.seq, "detections" in m.data) for m in out] == [("side", 0, False), ("cam", 0, False),
                                                                       ("cam", 1, True)]
    assert out[1] is note and engine.metrics()["passed_through"] == 2 and engine.metrics()["dropped"] == 1
