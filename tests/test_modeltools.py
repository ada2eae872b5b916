"""`graphflow model inspect` and `graphflow model quantize`: heads recognised from real files, INT8 that agrees."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from graphflow import cli
from graphflow.media.modelinfo import ModelToolError, inspect_model
from graphflow.media.quantize import detection_agreement, quantize_model
from onnx_models import shaped_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "graphflow/models/yolox_nano.onnx"
DEMO = ROOT / "graphs/data/demo.mp4"


def test_inspect_recognises_the_shipped_yolox_and_names_infer_params():
    report = inspect_model(SHIPPED)
    assert report.head == "yolox"
    assert [t.shape for t in report.inputs] == [["batch", 3, 416, 416]]
    assert report.inputs[0].dynamic == [0] and report.outputs[0].shape == ["batch", 3549, 85]
    assert report.engine == "infer"
    assert report.params == {"model": str(SHIPPED), "letterbox": True, "max_batch": 4}


@pytest.mark.parametrize("inp, out, meta, head", [
    (["n", 3, 64, 64], ["n", 84, 85], None, "yolox"),  # 8×8 + 4×4 + 2×2 anchors: YOLOX's grid at 64 px
    (["n", 3, 64, 64], ["n", 100, 85], None, "yolov5"),
    ([1, 3, 96, 96], [1, 84, 189], None, "yolov8"),  # 80 classes over 12×12 + 6×6 + 3×3 anchors
    (["n", 3, 224, 224], ["n", 10], None, "classifier"),
    (["n", 224, 224, 3], ["n", 5], None, "classifier"),
    (["n", 3, "h", "w"], ["n", 1, "h", "w"], None, "ppocr-det"),
    (["n", 3, 48, "w"], ["n", "t", 6625], None, "ppocr-rec"),
    (["n", 3, "h", "w"], ["n", "t", 97], {"character": "a\nb"}, "ppocr-rec"),
    (["n", 3, "h", "w"], ["n", 2], None, "ppocr-cls"),
    (["n", 3, 64, 64], ["n", 7, 7, 7], None, "unknown"),
])
def test_inspect_guesses_each_head_from_a_built_model(tmp_path, inp, out, meta, head):
    report = inspect_model(shaped_model(tmp_path / "m.onnx", inp, out, meta))
    assert report.head == head, report.text()


def test_inspect_params_follow_the_head(tmp_path):
    v8 = inspect_model(shaped_model(tmp_path / "v8.onnx", [1, 3, 64, 64], [1, 7, 100], {"names": "['a', 'b', 'c']"}))
    assert v8.params == {"model": str(tmp_path / "v8.onnx"), "letterbox": True}  # fixed batch, names in the file
    assert any("fixed batch" in n for n in v8.notes)
    v5 = inspect_model(shaped_model(tmp_path / "v5.onnx", ["n", 3, 64, 64], ["n", 100, 8]))
    assert v5.params["labels"] == "labels.txt" and v5.params["max_batch"] == 4  # 3 classes, no names
    cls = inspect_model(shaped_model(tmp_path / "c.onnx", ["n", 112, 96, 3], ["n", 10]))
    assert cls.engine == "secondary"
    assert cls.params["size"] == [96, 112] and cls.params["layout"] == "nhwc" and cls.params["task"] == "classify"
    rec = inspect_model(shaped_model(tmp_path / "r.onnx", ["n", 3, 32, "w"], ["n", "t", 500], {"character": "x"}))
    assert rec.params["task"] == "text" and rec.params["size"] == [320, 32] and "labels" not in rec.params


@pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None,
                    reason="rapidocr-onnxruntime not installed (pip install -e '.[ocr]')")
def test_inspect_recognises_the_ppocr_models_of_rapidocr():
    models = Path(importlib.util.find_spec("rapidocr_onnxruntime").origin).parent / "models"
    heads = {p.name: inspect_model(p).head for p in models.glob("*.onnx")}
    assert sorted(heads.values()) == ["ppocr-cls", "ppocr-det", "ppocr-rec"], heads
    assert heads["ch_PP-OCRv4_rec_infer.onnx"] == "ppocr-rec"
    assert heads["ch_PP-OCRv4_det_infer.onnx"] == "ppocr-det"


def test_cli_model_inspect_prints_text_or_json_and_one_line_errors(tmp_path, capsys):
    assert cli.main(["model", "inspect", str(SHIPPED)]) == 0
    assert "head: yolox" in capsys.readouterr().out
    assert cli.main(["model", "inspect", str(SHIPPED), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["head"] == "yolox"
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    assert cli.main(["model", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: model {bad}: not an ONNX file") and "\n" not in err


def test_agreement_counts_matches_per_class_and_iou():
    ref = [[{"box": [0, 0, 10, 10], "score": 0.9, "class_id": 0},
            {"box": [20, 20, 30, 30], "score": 0.8, "class_id": 1}]]
    got = [[{"box": [1, 1, 10, 10], "score": 0.7, "class_id": 0},
            {"box": [20, 20, 30, 30], "score": 0.6, "class_id": 2},
            {"box": [0, 0, 10, 10], "score": 0.5, "class_id": 0}]]
    assert detection_agreement(ref, got) == (1, 2, 3)  # one box matched once; the class-2 box has no class-2 match
    assert detection_agreement(ref, got, same_class=False) == (2, 2, 3)


def test_quantize_writes_an_int8_model_that_agrees_with_fp32(tmp_path):
    onnx = pytest.importorskip("onnx")
    from graphflow.media.quantize import calibration_frames
    from graphflow.vision.detect import DetectParams, postprocess
    from graphflow.vision.letterbox import letterbox
    from graphflow.media.backends import OnnxRuntimeBackend
    from graphflow.media.models import resolve_model

    out = tmp_path / "nano.int8.onnx"
    done = quantize_model("yolox-nano", DEMO, out, frames=16)
    assert done.frames == 16
    assert {"Conv_41", "Conv_44"} <= set(done.float_convs)  # the stem and the depthwise convolution it feeds
    nodes = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    assert nodes["Conv_44"] == "Conv" and list(nodes.values()).count("QLinearConv") >= 90  # of 113
    assert out.stat().st_size < SHIPPED.stat().st_size / 2
    spec = resolve_model("yolox-nano")
    frames = calibration_frames(DEMO, 40, seed=7)  # another sample of the video than the one calibrated on
    found = {}
    for name, path in (("fp32", spec.path), ("int8", out)):
        runner = OnnxRuntimeBackend(1)
        runner.load(path)
        found[name] = []
        for frame in frames:
            tensor, info = letterbox(frame, spec.preprocess)
            found[name].append(postprocess(runner.infer(tensor[None])[0], "yolox", info, (640, 360), spec.labels,
                                           DetectParams(conf=0.3)))
    matched, n_ref, n_got = detection_agreement(found["fp32"], found["int8"])
    assert n_ref >= 50
    # measured here: recall 0.94, precision 0.90; with the stem quantized too (and minmax ranges) 0.58 and 0.75
    assert matched / n_ref >= 0.85 and matched / n_got >= 0.83, (matched, n_ref, n_got)


def test_calibration_tensors_are_what_infer_feeds_the_model():
    """Calibration sees the model input infer makes from decoded frames: letterboxed BGR 0-255, bit for bit."""
    from graphflow.media.quantize import calibration_frames, calibration_tensors
    from graphflow.vision.letterbox import letterbox_batch
    from graphflow.media.models import resolve_model

    spec = resolve_model("yolox-nano")
    frames = calibration_frames(DEMO, 3, seed=2)
    tensors = np.concatenate(calibration_tensors(frames, spec.preprocess))
    assert np.array_equal(tensors, letterbox_batch(frames, spec.preprocess, ["bgr"] * 3))
    assert tensors.shape == (3, 3, 416, 416) and tensors.max() > 200  # 0-255, not 0-1


def test_conv_stats_find_a_layer_that_amplifies_channels_rounded_away(tmp_path):
    """Two channels 1000x apart in range: rounded to one 8-bit scale, the small one is lost; a convolution that
    weighs it 100x more than the large one has almost nothing left, one that weighs them alike loses little."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from graphflow.media.quantize import conv_stats, sensitive_nodes

    scale = numpy_helper.from_array(np.array([1.0, 0.001], np.float32).reshape(1, 2, 1, 1), "scale")
    weights = {"amplify": np.array([[[[0.01]], [[1.0]]]], np.float32), "even": np.ones((1, 2, 1, 1), np.float32)}
    nodes = [helper.make_node("Mul", ["x", "scale"], ["spread"], name="spread")]
    inits = [scale]
    for name, w in weights.items():
        nodes.append(helper.make_node("Conv", ["spread", f"w_{name}"], [name], name=name))
        inits.append(numpy_helper.from_array(w, f"w_{name}"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in weights], inits)
    path = tmp_path / "spread.onnx"
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.write_bytes(onnx_model.SerializeToString())
    rng = np.random.default_rng(0)
    tensors = [rng.uniform(0, 255, (1, 2, 8, 8)).astype(np.float32) for _ in range(4)]
    stats = conv_stats(path, tensors)
    assert stats["amplify"].sqnr_db < 20 < 40 < stats["even"].sqnr_db, stats
    assert stats["even"].stride == 1
    assert sensitive_nodes(path, tensors, float_stride=0) == ["amplify"]
    assert sensitive_nodes(path, tensors) == ["amplify", "even"]  # at full resolution: both stay float


def test_quantize_errors_are_one_line(tmp_path):
    with pytest.raises(ModelToolError, match="--calibrate .*nothing.mp4"):
        quantize_model("yolox-nano", tmp_path / "nothing.mp4", tmp_path / "o.onnx")
    with pytest.raises(ModelToolError, match="not a registered model"):
        quantize_model("no-such-model", DEMO, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_takes_built_in_names_as_infer_and_quantize_do(capsys):
    assert inspect_model("yolox-nano").head == "yolox"
    assert inspect_model("yolox-nano").params["model"] == "yolox-nano"
    assert cli.main(["model", "inspect", "ppocr-rec"]) == 0
    assert "head: ppocr-rec" in capsys.readouterr().out
    assert cli.main(["model", "inspect", "yolox-nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a built-in model (yolox-nano, ppocr-det" in err and f"no file at {Path.cwd() / 'yolox-nan'}" in err
    assert "\n" not in err


def test_quantize_streams_calibration_one_frame_at_a_time_and_reports_progress(tmp_path, monkeypatch):
    """The calibrator is handed one frame per range (onnxruntime's CalibStridedMinMax), so it never holds more than
    one frame's activations; progress hears of every frame measured and calibrated."""
    from onnxruntime.quantization import calibrate

    held = []
    collect = calibrate.HistogramCalibrater.collect_data

    def watched(self, reader):
        collect(self, reader)
        held.append(reader.done)

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", watched)
    heard = []
    done = quantize_model("yolox-nano", DEMO, tmp_path / "q.onnx", frames=3, progress=lambda *a: heard.append(a))
    assert done.frames == 3 and held == [1, 2, 3]
    assert heard == [("measure", 1, 3), ("measure", 2, 3), ("measure", 3, 3),
                     ("calibrate", 1, 3), ("calibrate", 2, 3), ("calibrate", 3, 3)]
