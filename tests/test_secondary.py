"""Second stage: crops of detected objects through a real ONNX classifier, batched across frames and streams, with
per-track reuse; checked against what the crops' pixels say."""
import json
from pathlib import Path

import numpy as np
import pytest

from graphflow.engines.decode import Decode
from graphflow.engines.infer import Infer
from graphflow.engines.secondary import Secondary
from graphflow.engines.track import Track
from graphflow import Message, ParamError
from graphflow import cli
from graphflow import graph
from graphflow import runtime
from graphflow.testing import run_engine, run_source
from graphflow.vision.crops import CropSpec, Reuse, crop_region, crop_tensor
from graphflow.vision.ocr import character_list, ctc_decode
from onnx_models import colour_classifier, shaped_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "graphs/data/demo.mp4"
COLOURS = ["red", "green", "blue"]


@pytest.fixture
def classifier(tmp_path):
    """The colour classifier and its labels file: the class of a crop is its dominant RGB channel."""
    (tmp_path / "colours.txt").write_text("\n".join(COLOURS) + "\n")
    return {"model": str(colour_classifier(tmp_path / "colour.onnx")), "labels": str(tmp_path / "colours.txt"),
            "size": [16, 16], "normalize": "none", "color": "rgb"}


def painted_frame(seq, stream="cam"):
    """A grey BGR frame with a red, a green and a blue rectangle, and its detections (the contract's fields)."""
    image = np.full((120, 200, 3), 90, np.uint8)
    boxes = {"red": [10, 10, 50, 60], "green": [70, 20, 120, 90], "blue": [140, 30, 190, 110]}
    bgr = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (230, 60, 30)}
    for name, (x1, y1, x2, y2) in boxes.items():
        image[y1:y2, x1:x2] = bgr[name]
    dets = [{"box": [float(v) for v in box], "score": 0.9, "class_id": 0, "label": "thing"}
            for box in boxes.values()]
    dets.append({"box": [100.0, 100.0, 104.0, 103.0], "score": 0.5, "class_id": 1, "label": "speck"})  # too small
    return Message(stream, seq, seq / 10, {"detections": dets}, {"image": image})


def test_each_detection_gets_the_class_of_its_crop(classifier):
    frames = [painted_frame(i, stream) for i in range(3) for stream in ("a", "b")]
    engine = Secondary("sec", {**classifier, "max_batch": 4, "max_wait_ms": 50, "padding": 0.0})
    out = run_engine(engine, messages=frames)["out"]
    assert [(m.stream, m.seq) for m in out] == [(m.stream, m.seq) for m in frames]  # order kept per stream
    for msg in out:
        dets = msg.data["detections"]
        assert [d["attributes"]["label"] for d in dets[:3]] == COLOURS
        assert all(d["attributes"]["score"] > 0.9 for d in dets[:3])
        assert "attributes" not in dets[3]  # under min_size: not cropped
    assert engine.metrics()["crops_inferred"] == 18 and engine.metrics()["crops_skipped"] == 6
    assert engine.metrics()["batches"] < 6  # crops of several frames ran together


def test_chained_stages_keep_each_result_beside_the_others(classifier):
    """Two classifiers one after the other, each under its own name: every object keeps both results, and a rule's
    attribute filter can test both (here the second reads the crop as BGR, so it names red and blue the other way)."""
    from graphflow.vision.rules import parse_rules

    frames = [painted_frame(i) for i in range(3)]
    first = run_engine(Secondary("colour", {**classifier, "name": "colour"}), messages=frames)["out"]
    second = run_engine(Secondary("swapped", {**classifier, "name": "swapped", "color": "bgr"}), messages=first)["out"]
    for msg in second:
        got = [d["attributes"] for d in msg.data["detections"][:3]]
        assert [(a["colour"], a["swapped"]) for a in got] == [("red", "blue"), ("green", "green"), ("blue", "red")]
        assert all(a["colour_score"] > 0.9 and a["swapped_score"] > 0.9 for a in got)
    rule = parse_rules([{"id": "r", "kind": "crowding", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]], "min_count": 1,
                         "attributes": {"colour": "red", "swapped": "blue"}}])[0]
    tests = rule.attributes
    attrs = [d["attributes"] for d in second[0].data["detections"][:3]]
    assert [all(t.matches(a) for t in tests) for a in attrs] == [True, False, False]


def test_classes_filter_and_passthrough_order(classifier):
    frames = [painted_frame(0), Message("cam", 0, None, {"total": 3}), painted_frame(1)]
    out = run_engine(Secondary, {**classifier, "classes": ["speck"], "min_size": 1}, frames)["out"]
    assert [m.data.get("total") for m in out] == [None, 3, None]  # the total leaves between its frames
    dets = out[0].data["detections"]
    assert [("attributes" in d) for d in dets] == [False, False, False, True]


def test_crop_tensor_layouts_fit_and_normalisation():
    image = np.zeros((20, 40, 3), np.uint8)
    image[5:15, 10:30] = (255, 0, 0)  # BGR blue patch, 20 wide and 10 high
    assert crop_region([10, 5, 30, 15], 40, 20, 0.5) == (0, 0, 40, 20)  # grown by half each side, clipped
    fit = crop_tensor(image, [10, 5, 30, 15], CropSpec((16, 4), resize="fit", normalize="signed", color="rgb"))
    assert fit.shape == (3, 4, 16)
    np.testing.assert_allclose(fit[2, :, :8], 1.0)  # blue channel last in RGB: 255 → 1
    np.testing.assert_allclose(fit[0, :, :8], -1.0)
    np.testing.assert_array_equal(fit[:, :, 8:], 0.0)  # aspect 2:1 at height 4 is 8 wide; the rest zero-padded
    nhwc = crop_tensor(image, [10, 5, 30, 15], CropSpec((8, 8), normalize="unit", color="bgr", layout="nhwc"))
    assert nhwc.shape == (8, 8, 3)
    np.testing.assert_allclose(nhwc[..., 0], 1.0)


def test_reuse_infers_tracks_every_interval_or_when_grown():
    reuse = Reuse(interval=5, grow=2.0)
    small, big = [0, 0, 10, 10], [0, 0, 15, 15]
    due = [reuse.due("s", 7, seq, small) for seq in range(11)]
    assert due == [True, False, False, False, False, True, False, False, False, False, True]
    assert reuse.due("s", 7, 11, big) is True  # area 225 ≥ 2 × 100
    assert reuse.due("t", 7, 11, small) is True  # another stream, another track
    reuse.store("s", 7, {"label": "x"})
    assert reuse.carried("s", 7) == {"label": "x"}
    reuse.forget_old("s", 500)
    assert reuse.carried("s", 7) is None


def test_ctc_decode_merges_repeats_and_drops_blanks():
    table = character_list(["京", "A", "1"], 5, "test")
    assert table == ["", "京", "A", "1", " "]
    steps = [1, 1, 0, 2, 0, 0, 3, 3, 0, 3, 4]
    scores = np.full((len(steps), 5), 0.01, np.float32)
    scores[np.arange(len(steps)), steps] = 0.9
    assert ctc_decode(scores, table) == {"text": "京A11 ", "score": 0.9}
    with pytest.raises(ValueError, match="3 characters for a recogniser of 9 classes"):
        character_list(["a", "b", "c"], 9, "test")


def tracked_demo(frames=150):
    """Demo video frames through the real decode → infer → track engines."""
    msgs = run_source(Decode, {"sources": [{"id": "cam", "uri": str(DEMO), "max_frames": frames}]})
    msgs = run_engine(Infer, {"letterbox": True, "backend": "onnxruntime", "conf": 0.3}, msgs)["out"]
    return run_engine(Track, {}, msgs)["out"]


def dominant(image, box):
    """(class, margin) of a box's mean colour in RGB order, from the raw pixels."""
    x1, y1, x2, y2 = crop_region(box, image.shape[1], image.shape[0], 0.0)
    mean = image[y1:y2, x1:x2].reshape(-1, 3).mean(0)[::-1]
    top = np.sort(mean)
    return int(mean.argmax()), top[-1] - top[-2]


def test_reuse_on_a_tracked_video_infers_5x_fewer_crops_and_keeps_attributes(classifier):
    frames = tracked_demo()
    assert sum(len(m.data["tracks"]) for m in frames) >= 100
    every, reused = Secondary("a", classifier), Secondary("b", {**classifier, "interval": 10, "grow": 2.0})
    out_every = run_engine(every, messages=frames)["out"]
    out_reused = run_engine(reused, messages=frames)["out"]
    n_every, n_reused = every.metrics()["crops_inferred"], reused.metrics()["crops_inferred"]
    assert n_every >= 5 * n_reused, (n_every, n_reused)
    checked = 0
    for msg in out_every:
        for obj in msg.data["tracks"]:
            cls, margin = dominant(msg.arrays["image"], obj["box"])
            if margin > 8:  # a clear dominant colour: the model must name it
                assert obj["attributes"]["label"] == COLOURS[cls]
                checked += 1
    assert checked >= 20
    last: dict[int, dict] = {}
    for a, b in zip(out_every, out_reused):
        for ta, tb in zip(a.data["tracks"], b.data["tracks"]):
            assert "attributes" in tb  # every tracked object carries a result, inferred or reused
            if ta["attributes"] == tb["attributes"]:
                last[tb["track_id"]] = tb["attributes"]
            else:  # reused: the track's result from its last inference
                assert tb["attributes"] == last[tb["track_id"]]


def test_graph_runs_secondary_after_track_and_validates_params(tmp_path, classifier, capsys):
    out = tmp_path / "out.jsonl"
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": [{"id": "cam", "uri": str(DEMO),
                                                                         "max_frames": 12}]}},
                       "det": {"type": "infer", "params": {"letterbox": True, "backend": "onnxruntime"}},
                       "trk": {"type": "track"},
                       "sec": {"type": "secondary", "placement": "process", "params": {**classifier, "interval": 4}},
                       "out": {"type": "sink", "params": {"path": str(out)}}},
           "connections": [["src", "det"], ["det", "trk"], ["trk", "sec"], ["sec", "out"]]}
    summary = runtime.run(graph.build(doc, "sec"), handle_signals=False)
    assert not summary.failed, summary.errors
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and any(t.get("attributes") for r in rows for t in r["tracks"])
    doc["engines"]["sec"]["params"] = {"model": str(ROOT / "graphflow/models/yolox_nano.onnx")}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "engines.sec.params.model" in err and "looks like a yolox model" in err and "\n" not in err


def test_param_errors_name_the_field(tmp_path, classifier):
    rec = shaped_model(tmp_path / "rec.onnx", ["n", 3, 48, "w"], ["n", "t", 5], {"character": "a\nb\nc"})
    with pytest.raises(ParamError, match="^size: .*dynamic width or height"):
        Secondary("s", {"model": str(rec)}).check()
    engine = Secondary("s", {"model": str(rec), "size": [64, 48]})
    engine.check()
    assert engine.task_kind == "text" and engine.names == ["", "a", "b", "c", " "]
    with pytest.raises(ParamError, match=r"^size\[0\]: the model's input is \[16, 16\]"):
        Secondary("s", {**classifier, "size": [20, 16]}).check()
    with pytest.raises(ParamError, match="^labels: labels file .*2 names for a model of 3 classes"):
        (tmp_path / "two.txt").write_text("a\nb\n")
        Secondary("s", {**classifier, "labels": str(tmp_path / "two.txt")}).check()
