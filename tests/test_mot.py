"""MOTChallenge files: parser/writer, the detfile source, the mot sink, and detfile → track → mot through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphflow.engines.detfile import DetFile
from graphflow.engines.publish import Publish
from graphflow import Detections, Message, ParamError
from graphflow.detections import plain
from graphflow.message import pack, unpack
from graphflow.graph.registry import resolve
from graphflow.testing import run_engine, run_source
from graphflow.vision.mot import MotFormatError, parse_mot, read_mot

ROOT = Path(__file__).resolve().parents[1]


def test_parse_rows_sorted_with_xyxy_boxes_and_min_conf():
    text = "2,-1,10,20,30,40,0.9,-1,-1,-1\n\n1 -1 0 0 5 5 0.2\n 1, 7, 1.5, 2.5, 10, 20, 0.8, -1, -1 \n"
    table = parse_mot(text)
    assert table.frames.tolist() == [1, 1, 2] and table.ids.tolist() == [-1, 7, -1]
    np.testing.assert_allclose(table.boxes[1], [1.5, 2.5, 11.5, 22.5])
    np.testing.assert_allclose(table.boxes[2], [10, 20, 40, 60])
    assert parse_mot(text, min_conf=0.5).conf.tolist() == [0.8, 0.9]
    frames = [(f, rows.stop - rows.start) for f, rows in parse_mot("3,-1,0,0,1,1,1").per_frame()]
    assert frames == [(1, 0), (2, 0), (3, 1)]
    assert len(parse_mot("")) == 0 and parse_mot("").last_frame == 0


@pytest.mark.parametrize("line, why", [
    ("1,-1,0,0,5", "expected at least 7 fields"),
    ("1,-1,0,zero,5,5,1", "field y is not a number ('zero')"),
    ("0,-1,0,0,5,5,1", "frame must be an integer ≥ 1"),
    ("1.5,-1,0,0,5,5,1", "frame must be an integer ≥ 1"),
    ("1,-1,0,0,-5,5,1", "box must be finite with w, h ≥ 0"),
    ("1,-1,inf,0,5,5,1", "box must be finite"),
])
def test_bad_line_is_one_line_error_with_file_and_line(tmp_path, line, why):
    path = tmp_path / "det.txt"
    path.write_text(f"1,-1,0,0,5,5,1\n\n{line}\n")
    with pytest.raises(MotFormatError) as err:
        read_mot(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and why in message and "\n" not in message


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(MotFormatError, match=r"nope\.txt: file not found$"):
        read_mot(tmp_path / "nope.txt")


def test_detfile_sends_every_frame_with_contract_detections(tmp_path):
    path = tmp_path / "det.txt"
    path.write_text("1,-1,10,20,30,40,0.9\n1,-1,0,0,5,5,0.05\n2,-1,11,20,30,40,0.8\n4,-1,12,20,30,40,0.7\n")
    msgs = run_source(DetFile, {"path": str(path), "fps": 10, "min_conf": 0.1})
    assert [(m.stream, m.seq) for m in msgs] == [("0", 0), ("0", 1), ("0", 2), ("0", 3)]
    assert [len(m.data["detections"]) for m in msgs] == [1, 1, 0, 1]
    assert msgs[0].data["detections"][0] == {"box": [10.0, 20.0, 40.0, 60.0], "score": 0.9, "class_id": 0,
                                             "label": "person"}
    assert msgs[3].pts == pytest.approx(0.3)
    assert isinstance(msgs[0].data["detections"], Detections)
    json.dumps([plain(m.data) for m in msgs])  # JSON once the typed detections are lists of dicts
    assert [unpack(pack(m.data)) for m in msgs] == [m.data for m in msgs]  # and they cross processes unchanged


def test_detfile_streams_are_interleaved_with_their_own_size(tmp_path):
    (tmp_path / "a.txt").write_text("1,-1,0,0,5,5,1\n3,-1,0,0,5,5,1\n")
    (tmp_path / "b.txt").write_text("2,-1,0,0,5,5,1\n")
    msgs = run_source(DetFile, {"sources": [{"id": "a", "path": str(tmp_path / "a.txt"), "width": 64, "height": 48},
                                            {"path": str(tmp_path / "b.txt"), "fps": 5}]})
    assert [(m.stream, m.seq) for m in msgs] == [("a", 0), ("1", 0), ("a", 1), ("1", 1), ("a", 2)]
    assert msgs[0].data["width"] == 64 and "width" not in msgs[1].data
    assert msgs[3].pts == pytest.approx(0.2)


@pytest.mark.parametrize("params, field, text", [
    ({}, "sources", "exactly one"),
    ({"path": "x.txt", "sources": [{"path": "y.txt"}]}, "sources", "exactly one"),
    ({"path": "{tmp}/missing.txt"}, "path", "missing.txt: file not found"),
    ({"sources": [{"path": "{tmp}/bad.txt"}]}, "sources[0].path", "bad.txt:2: field h is not a number"),
    ({"sources": [{"path": "{tmp}/ok.txt", "rate": 3}]}, "sources[0].rate", "unknown key"),
    ({"sources": [{"path": "{tmp}/ok.txt", "fps": 0}]}, "sources[0].fps", "must be a number > 0"),
    ({"sources": [{"path": "{tmp}/ok.txt", "width": None}]}, "sources[0].width", "must be a number > 0"),
    ({"sources": [{"path": "{tmp}/ok.txt", "id": None}]}, "sources[0].id", "non-empty string or an integer"),
    ({"sources": [{"id": "a", "path": "{tmp}/ok.txt"}, {"id": "a", "path": "{tmp}/ok.txt"}]}, "sources[1].id",
     "duplicate"),
    ({"sources": ["{tmp}/ok.txt"]}, "sources[0]", "must be an object"),
])
def test_detfile_param_errors_name_the_field(tmp_path, params, field, text):
    (tmp_path / "ok.txt").write_text("1,-1,0,0,5,5,1\n")
    (tmp_path / "bad.txt").write_text("1,-1,0,0,5,5,1\n2,-1,0,0,5,h,1\n")
    params = json.loads(json.dumps(params).replace("{tmp}", str(tmp_path)))
    with pytest.raises(ParamError) as err:
        DetFile("src", params).check()
    assert err.value.field == field and text in err.value.message and "\n" not in str(err.value)


def test_detfile_is_a_builtin():
    assert resolve("detfile") is DetFile


def test_mot_sink_round_trip(tmp_path):
    tracks = [[{"box": [10.0, 20.0, 40.0, 60.0], "score": 0.9, "track_id": 3, "class_id": 0, "label": "person"}],
              [],
              [{"box": [12.5, 20.0, 42.5, 61.0], "score": 0.75, "track_id": 3},
               {"box": [100.0, 0.0, 110.0, 30.0], "score": 0.5, "track_id": 4}]]
    msgs = [Message(stream=s, seq=i, data={"tracks": t}) for i, t in enumerate(tracks) for s in ("cam/1", "cam2")]
    run_engine(Publish, {"sinks": [{"kind": "mot", "path": str(tmp_path / "res_{stream}.txt")}]}, msgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res_cam2.txt", "res_cam_1~e77d7fc476.txt"]  # cam/1 → its safe name
    lines = (tmp_path / "res_cam2.txt").read_text().splitlines()
    assert lines[0] == "1,3,10.00,20.00,30.00,40.00,0.9,-1,-1,-1"
    table = read_mot(tmp_path / "res_cam_1~e77d7fc476.txt")
    assert table.frames.tolist() == [1, 3, 3] and table.ids.tolist() == [3, 3, 4]
    np.testing.assert_allclose(table.boxes, [t["box"] for ts in tracks for t in ts])
    np.testing.assert_allclose(table.conf, [0.9, 0.75, 0.5])


def test_mot_sink_needs_tracks(tmp_path):
    """A frame without tracks stops the mot sink with one line saying what is missing."""
    engine = Publish("pub", {"sinks": [{"kind": "mot", "path": str(tmp_path / "r.txt")}]})
    run_engine(engine, messages=[Message(data={"detections": []})] * 2)
    sink = engine.metrics()["sinks"]["0:mot"]
    assert sink["error"] == "message 0#0 has no data['tracks'] (put track before publish)"


def test_detfile_track_mot_graph_through_launch(tmp_path):
    """Three people walk (one crosses another, one is missed for 3 frames): each keeps one track id."""
    rows = []
    for f in range(1, 41):
        people = {1: (20 + 5 * f, 100), 2: (220 - 5 * f, 104), 3: (300, 40 + 2 * f)}
        for pid, (x, y) in people.items():
            if pid == 3 and 20 <= f < 23:
                continue
            rows.append(f"{f},-1,{x},{y},30,80,0.9,-1,-1,-1")
    (tmp_path / "det.txt").write_text("\n".join(rows) + "\n")
    graph = {"name": "mot", "engines": {
        "src": {"type": "detfile", "params": {"path": "det.txt"}},
        "trk": {"type": "track", "params": {"algorithm": "bytetrack", "min_hits": 1}},
        "out": {"type": "publish", "params": {"sinks": [{"kind": "mot", "path": "res_{stream}.txt"}]}}},
        "connections": [["src.out", "trk.in"], ["trk.out", "out.in"]]}
    (tmp_path / "g.json").write_text(json.dumps(graph))
    run = subprocess.run([sys.executable, "-m", "graphflow", "launch", "-q", "g.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    res = read_mot(tmp_path / "res_0.txt")
    assert res.last_frame == 40 and len(res) == len(rows)
    x, y = res.boxes[:, 0], res.boxes[:, 1]
    person = np.where(x == 300, 3, np.where(y == 100, 1, 2))  # 3 walks down, 1 and 2 cross at frame 20
    for pid, path in ((1, 20 + 5 * res.frames), (2, 220 - 5 * res.frames)):
        np.testing.assert_allclose(x[person == pid], path[person == pid])
    assert [len(set(res.ids[person == p].tolist())) for p in (1, 2, 3)] == [1, 1, 1]
    assert len(set(res.ids.tolist())) == 3


def test_mot_eval_example_graph_validates():
    run = subprocess.run([sys.executable, "-m", "graphflow", "validate", "graphs/mot_eval.json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
