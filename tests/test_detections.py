"""Typed detections: the dict view user code keeps, the packed form that crosses processes, and equivalence with the
list-of-dicts contract on real data (the shipped detector on a photo, the walkers' detection file, a detfile →
track → publish graph placed in threads and in processes)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from graphflow import Detections, Engine, Message
from graphflow.engines.track import Track
from graphflow.runtime.links import Inbox, LocalLink, decode, encode
from graphflow.detections import plain
from graphflow.graph.loader import build
from graphflow.runtime.launcher import run
from graphflow.testing import run_engine
from graphflow.media.backends import make_backend
from graphflow.vision.detect import DECODERS, DetectParams, finish_candidates, nms, pack_candidates
from graphflow.vision.letterbox import letterbox, unletterbox_boxes
from graphflow.media.models import resolve_model
from graphflow.vision.mot import read_mot
from graphflow.vision.tracking import ByteTracker, follow

ROOT = Path(__file__).resolve().parents[1]
WALKERS = ROOT / "graphs" / "data" / "walkers_det.txt"
FULL = {"box": [1.5, 2.25, 30.0, 40.12], "score": 0.9123, "class_id": 2, "label": "car", "track_id": 7,
        "attributes": {"label": "red", "score": 0.8}}


def test_dicts_come_back_as_given_missing_and_own_fields_included():
    given = [FULL, {"box": [0, 0, 5, 5]}, {"box": [1, 1, 2, 2], "label": "x", "colour": "blue", "score": None}]
    dets = Detections.from_dicts(given)
    assert dets.to_dicts() == [FULL, {"box": [0.0, 0.0, 5.0, 5.0]}, {"box": [1.0, 1.0, 2.0, 2.0], "label": "x",
                                                                       "colour": "blue"}]
    assert list(dets.to_dicts()[0]) == ["box", "score", "class_id", "label", "track_id", "attributes"]  # JSON order
    assert dets.boxes.dtype == np.float32 and dets.scores.dtype == np.float32 and dets.class_ids.dtype == np.int32
    assert dets.track_ids.tolist() == [7, -1, -1] and np.isnan(dets.scores[1:]).all()
    assert dets == given[:2] + [{"box": [1, 1, 2, 2], "label": "x", "colour": "blue"}]


def test_user_code_reads_and_writes_objects_like_dicts():
    dets = Detections.from_dicts([FULL, {"box": [10, 10, 20, 20], "label": "person", "score": 0.5, "class_id": 0}])
    first, second = dets
    assert first["box"] == FULL["box"] and first.label == "car" and first.track_id == 7 and dict(first) == FULL
    assert "track_id" not in second and second.get("track_id") is None and {**second}["score"] == 0.5
    assert sum(d["label"] == "person" for d in dets) == 1  # the README's CountPeople reads detections so
    second["track_id"] = 3
    second["note"] = "seen"
    assert dets.track_ids.tolist() == [7, 3] and dets[1]["note"] == "seen" and dets[-1] == dets[1]
    people = dets[dets.labels == "person"]
    assert len(people) == 1 and people[0]["box"] == [10.0, 10.0, 20.0, 20.0]
    assert dets[[1, 0]].labels.tolist() == ["person", "car"] and len(dets[:0]) == 0 and not dets[:0]
    dets.append(box=[0, 0, 1, 1], label="dog", score=0.25)
    dets.append({"box": [2, 2, 3, 3], "track_id": 9})
    assert len(dets) == 4 and dets[2].score == 0.25 and dets[3].track_id == 9 and dets[3].label is None
    with pytest.raises(IndexError):
        dets[4]
    with pytest.raises(ValueError, match=r"detections\[1\]: expected an object with a 'box'"):
        Detections.from_dicts([FULL, {"score": 1.0}])
    with pytest.raises(ValueError, match=r"detections\[0\]\.box: must be \[x1, y1, x2, y2\]"):
        Detections.from_dicts([{"box": [1, 2, 3]}, FULL])


def test_packed_form_crosses_processes_and_fan_out_unchanged():
    dets = Detections.from_dicts([FULL, {"box": [0, 0, 5, 5], "extra": [1, 2]}])
    msg = Message("cam", 3, 0.3, {"detections": dets, "tracks": dets[:1], "n": 2})
    got = decode(encode(msg))
    assert got.data == msg.data and isinstance(got.data["tracks"], Detections)
    got.data["detections"][0]["score"] = 0.1  # the received columns are the consumer's own, writable
    assert dets[0]["score"] == 0.9123
    inbox = Inbox([("in", "block", 4), ("in", "block", 4)])
    for i in range(2):
        LocalLink(inbox, i, isolate=True).send(msg, threading.Event())
    copies = [inbox.get(1)[1] for _ in range(2)]
    assert all(c.data == msg.data for c in copies)
    copies[0].data["detections"][0]["label"] = "bus"  # a fan-out consumer cannot change what another one sees
    assert copies[1].data["detections"][0]["label"] == "car" and dets[0]["label"] == "car"
    assert json.loads(json.dumps(plain(msg.data)))["tracks"] == [FULL]


@pytest.fixture(scope="module")
def photo_output():
    spec = resolve_model("yolox-nano")
    backend = make_backend("auto")
    backend.load(spec.path)
    rgb = data.astronaut()
    tensor, info = letterbox(rgb, spec.preprocess, image_color="rgb")
    return spec, backend.infer(tensor[None])[0], info, (rgb.shape[1], rgb.shape[0])


def test_detector_output_is_the_dict_contract_as_columns(photo_output):
    """The typed result of the shipped detector on a photo equals the contract's dicts made the plain way (NMS,
    boxes mapped back, rounded to 2 and 4 decimals) from the same candidates."""
    spec, output, info, size = photo_output
    params = DetectParams(conf=0.02)
    candidates = pack_candidates(*DECODERS["yolox"](output, tuple(info["input"]), params))
    keep = nms(candidates[:, :4], candidates[:, 4], candidates[:, 5].astype(np.int64), params.iou)
    boxes = unletterbox_boxes(candidates[keep, :4], info, *size).tolist()
    by_hand = [{"box": [round(v, 2) for v in box], "score": round(score, 4), "class_id": int(cid),
                "label": spec.labels[int(cid)]} for box, score, cid in zip(boxes, candidates[keep, 4].tolist(),
                                                                           candidates[keep, 5].tolist())]
    dets = finish_candidates(candidates, info, size, spec.labels, params)
    assert len(by_hand) >= 10 and dets.to_dicts() == by_hand
    short = finish_candidates(candidates, info, size, ["only"], params)  # a label list shorter than the ids
    assert short.labels.tolist() == ["only" if d["class_id"] == 0 else str(d["class_id"]) for d in by_hand]


def test_tracking_columns_equals_tracking_the_dicts():
    """ByteTrack over the walkers' detection file: `follow` on Detections gives, frame by frame, what the
    track engine built from the contract's dicts (arrays rebuilt from them, each track a copy of its dict)."""
    table = read_mot(WALKERS)
    typed, plain_tracker = ByteTracker(), ByteTracker()
    frames = tracked = 0
    for _, rows in table.per_frame():
        dicts = [{"box": box, "score": round(score, 4), "class_id": 0, "label": "person"}
                 for box, score in zip(np.round(table.boxes[rows], 2).tolist(), table.conf[rows].tolist())]
        found = plain_tracker.update(np.array([d["box"] for d in dicts], np.float64).reshape(-1, 4),
                                     np.array([d["score"] for d in dicts], np.float64),
                                     np.zeros(len(dicts), np.int64))
        expected = [{**dicts[t.det_index], "box": [round(float(v), 2) for v in t.box], "score": round(t.score, 4),
                     "track_id": t.track_id} for t in found]
        assert follow(typed, Detections.from_dicts(dicts)).to_dicts() == expected
        frames, tracked = frames + 1, tracked + len(expected)
    assert frames > 100 and tracked > 500


def graph(tmp_path: Path, placement: str) -> dict:
    out = tmp_path / f"{placement}.jsonl"
    return {"engines": {
        "src": {"type": "detfile", "params": {"path": str(WALKERS), "fps": 10}},
        "trk": {"type": "track", "placement": placement},
        "out": {"type": "publish", "params": {"sinks": [{"kind": "jsonl", "path": str(out)},
                                                        {"kind": "mot", "path": str(tmp_path / f"{placement}.txt")}]}}},
        "connections": [["src.out", "trk.in"], ["trk.out", "out.in"]]}


def test_graph_output_is_the_same_in_threads_and_processes_and_keeps_the_json_shape(tmp_path):
    for placement in ("thread", "process"):
        summary = run(build(graph(tmp_path, placement), "g"), handle_signals=False)
        assert not summary.failed and not summary.errors
    lines = {p: (tmp_path / f"{p}.jsonl").read_text().splitlines() for p in ("thread", "process")}
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "times"}  # noqa: E731
    assert [strip(x) for x in lines["thread"]] == [strip(x) for x in lines["process"]]
    assert (tmp_path / "thread.0.txt").read_text() == (tmp_path / "process.0.txt").read_text() != ""
    record = next(strip(x) for x in lines["process"] if json.loads(x)["tracks"])
    assert list(record) == ["stream", "seq", "pts", "detections", "tracks"]
    track = record["tracks"][0]
    assert list(track) == ["box", "score", "class_id", "label", "track_id"] and track["label"] == "person"
    assert all(v == round(v, 2) for v in track["box"]) and isinstance(track["track_id"], int)
    assert '"box":[' in lines["thread"][0] and '"label":"person"' in lines["thread"][0]  # plain JSON lists


class KeepBig(Engine):
    """A user's engine as the README shows one: keeps the wider objects (a mask on the columns), adds a hand-made
    object, and sends the columns or a list of dicts on."""

    inputs = ("in",)
    outputs = ("out",)

    def process(self, msg: Message) -> None:
        dets = msg.data["detections"]
        big = dets[(dets.boxes[:, 2] - dets.boxes[:, 0]) > 38]
        if msg.seq % 2:
            big.append(box=[0, 0, 20, 20], label="sign", score=1.0, class_id=80)
            msg.data["detections"] = big
        else:
            msg.data["detections"] = big.to_dicts() + [{"box": [0, 0, 20, 20], "score": 1.0, "class_id": 80,
                                                        "label": "sign", "note": "by hand"}]
        self.send(msg)


def test_user_engine_may_send_columns_or_dicts_and_track_takes_both():
    table = read_mot(WALKERS)
    msgs = [Message("cam", frame - 1, None, {"detections": Detections(table.boxes[rows], table.conf[rows],
                                                                      np.zeros(rows.stop - rows.start), ["person"] * (
                                                                          rows.stop - rows.start))})
            for frame, rows in table.per_frame(40)]
    kept = run_engine(KeepBig, {}, msgs)["out"]
    assert {type(m.data["detections"]) for m in kept} == {Detections, list}
    tracks = [m.data["tracks"] for m in run_engine(Track, {"min_hits": 1}, kept)["out"]]
    assert all(isinstance(t, Detections) for t in tracks) and sum(map(len, tracks)) > 40
    signs = [obj for t in tracks for obj in t if obj["label"] == "sign"]
    assert len(signs) == 40 and {s["track_id"] for s in signs} == {signs[0]["track_id"]}  # one track, kept alive
    assert all(s.get("note") == "by hand" for s in signs if "note" in s) and any("note" in s for s in signs)
    assert all(obj["box"][2] - obj["box"][0] > 38 for t in tracks for obj in t if obj["label"] == "person")


def test_unreadable_objects_from_a_users_engine_are_one_line_naming_engine_frame_and_field(tmp_path):
    """A user's engine that sends a box of three numbers: the run reports one line naming the engine, the frame and
    the object's field, no traceback."""
    (tmp_path / "badboxes.py").write_text(
        "from graphflow import Engine, Message\n\n\n"
        "class Bad(Engine):\n    inputs = ('in',)\n    outputs = ('out',)\n\n"
        "    def process(self, msg: Message) -> None:\n"
        "        msg.data['detections'] = [{'box': [1, 2, 3], 'label': 'x'}]\n        self.send(msg)\n")
    doc = {"engines": {"src": {"type": "detfile", "params": {"path": str(WALKERS)}},
                       "bad": {"type": "badboxes:Bad"}, "trk": {"type": "track"},
                       "out": {"type": "publish", "params": {"sinks": [{"kind": "jsonl", "path": str(tmp_path / "o")}]}}},
           "connections": [["src.out", "bad.in"], ["bad.out", "trk.in"], ["trk.out", "out.in"]]}
    (tmp_path / "g.json").write_text(json.dumps(doc))
    done = subprocess.run([sys.executable, "-m", "graphflow", "launch", "g.json", "-q"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if "data['detections'][0].box" in line]
    assert done.returncode == 3 and lines, done.stderr[-2000:]
    assert "'trk'" in lines[0] and "frame 0" in lines[0] and "must be [x1, y1, x2, y2] (got [1, 2, 3])" in lines[0]
    assert "Traceback" not in done.stderr
