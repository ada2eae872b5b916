"""OCR with PP-OCRv4 from rapidocr-onnxruntime: the graph reads the made sign video's known strings, and per-track
reuse reads far fewer crops at the same accuracy."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from graphflow import graph
from graphflow import runtime
from graphflow.vision.ocr import db_boxes, edit_distance, read_signs, same_text, text_accuracy

ROOT = Path(__file__).resolve().parents[1]
TRUTH = json.loads((ROOT / "graphs/data/ocr/signs.json").read_text())["frames"]
needs_rapidocr = pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None,
                                    reason="rapidocr-onnxruntime not installed (pip install -e '.[ocr]')")


def test_db_boxes_grow_regions_and_drop_weak_ones():
    prob = np.zeros((40, 60), np.float32)
    prob[10:20, 5:45] = 0.9  # a text line, 40 × 10
    prob[30:33, 50:53] = 0.4  # weak: under box_thresh
    (box, score), = db_boxes(prob, thresh=0.3, box_thresh=0.6, unclip=1.5)
    d = 40 * 10 * 1.5 / (2 * 50)
    assert box == pytest.approx([max(0, 5 - d), 10 - d, 45 + d, 20 + d]) and score == pytest.approx(0.9)  # clipped


def test_accuracy_matches_signs_by_position_and_counts_characters():
    truth = [{"text": "京A·12345", "box": [0, 0, 100, 30]}, {"text": "出口 EXIT", "box": [0, 50, 100, 80]}]
    objects = [{"box": [0, 50, 40, 80], "attributes": {"text": "出口"}},
               {"box": [45, 50, 100, 80], "attributes": {"text": "EXIT"}},
               {"box": [0, 0, 100, 30], "attributes": {"text": "京A-1234"}}]
    pairs = read_signs(truth, objects)
    assert pairs == [("京A·12345", "京A-1234"), ("出口 EXIT", "出口EXIT")]
    assert same_text("京A-1 2") == "京A·12" and edit_distance("kitten", "sitting") == 3
    assert text_accuracy(pairs) == {"signs": 2, "exact": 0.5, "chars": round(1 - 1 / 14, 4)}


@needs_rapidocr
def test_ocr_graph_reads_the_known_strings_of_the_made_video(tmp_path):
    doc = json.loads((ROOT / "graphs/ocr.json").read_text())
    doc["engines"]["src"]["params"]["sources"][0].update(uri=str(ROOT / "graphs/data/ocr/signs.mp4"), max_frames=24)
    out = tmp_path / "ocr.jsonl"
    doc["engines"]["out"]["params"]["sinks"][0]["path"] = str(out)
    summary = runtime.run(graph.build(doc, "ocr"), handle_signals=False)
    assert not summary.failed, summary.errors
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24
    pairs = [p for r in rows for p in read_signs(TRUTH[r["seq"]]["signs"], r["tracks"])]
    read = {same_text(r) for _, r in pairs}
    assert {"京A·12345", "沪B·6F789", "粤C·D2468", "出口EXIT", "OPEN24H"} <= read
    accuracy = text_accuracy(pairs)
    assert accuracy["exact"] >= 0.85 and accuracy["chars"] >= 0.95, accuracy
    metrics = summary.stats["read"]["metrics"]  # per-track reuse: each track re-read every 10 frames
    assert metrics["crops_inferred"] * 5 <= sum(len(r["tracks"]) for r in rows), metrics


def test_textdet_refuses_a_model_that_is_not_a_text_detector():
    from graphflow.engines.textdet import TextDet
    from graphflow import ParamError

    with pytest.raises(ParamError, match="^model: yolox_nano.onnx looks like a yolox model, not a DB text detector"):
        TextDet("t", {"model": str(ROOT / "graphflow/models/yolox_nano.onnx")}).check()


@needs_rapidocr
def test_chained_plate_graph_keeps_three_attributes_and_its_rule_tests_two(tmp_path):
    """graphs/plates.json as shipped: plate colour, vehicle class and plate text stay side by side on each object,
    and the line counts only the plate that is both blue and from Beijing (京A·12345 crosses it; 沪B·6F789, blue too,
    and 粤C·D2468, yellow, cross it as well and must not count)."""
    doc = json.loads((ROOT / "graphs/plates.json").read_text())
    out = tmp_path / "plates.jsonl"
    doc["engines"]["out"]["params"]["sinks"][0]["path"] = str(out)
    summary = runtime.run(graph.build(doc, str(ROOT / "graphs/plates.json")), handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    attrs = [t["attributes"] for r in rows for t in r["tracks"] if "plate" in (t.get("attributes") or {})]
    assert attrs and all({"colour", "vehicle", "plate"} <= a.keys() for a in attrs)
    by_plate = {same_text(a["plate"]): (a["colour"], a["vehicle"]) for a in attrs}
    assert by_plate["京A·12345"] == by_plate["沪B·6F789"] == ("blue", "small")
    events = [e for r in rows for e in r.get("events") or []]
    assert [same_text(e["attributes"]["plate"]) for e in events] == ["京A·12345"]
    assert events[0]["rule"] == "beijing-blue" and events[0]["attributes"]["colour"] == "blue"
