"""The shipped detector on real photos, the letterbox, the decoders on hand-built outputs, and model errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from skimage import data

from graphflow.media.backends import make_backend
from graphflow.vision.detect import DetectParams, decode_yolov5, decode_yolov8, nms, postprocess, yolox_grid
from graphflow.vision.letterbox import LetterboxSpec, letterbox, unletterbox_boxes
from graphflow.media.models import MODELS_DIR, guess_output_format, resolve_model


@pytest.fixture(scope="module")
def yolox():
    spec = resolve_model("yolox-nano")
    backend = make_backend("onnxruntime")  # the CPU reference; the torch (GPU, fp16) backend is tested in test_gpu.py
    backend.load(spec.path)
    return spec, backend


def detect(yolox, rgb: np.ndarray, **params) -> list[dict]:
    spec, backend = yolox
    tensor, info = letterbox(rgb, spec.preprocess, image_color="rgb")
    output = backend.infer(tensor[None])[0]
    return postprocess(output, "yolox", info, (rgb.shape[1], rgb.shape[0]), spec.labels, DetectParams(**params))


def test_shipped_model_is_small_and_licensed():
    assert (MODELS_DIR / "yolox_nano.onnx").stat().st_size < 4_000_000
    assert "Megvii" in (MODELS_DIR / "LICENSE-yolox").read_text()
    labels = resolve_model("yolox-nano").labels
    assert len(labels) == 80 and labels[0] == "person" and labels[2] == "car" and labels[79] == "toothbrush"


def test_astronaut_is_a_person_covering_the_figure(yolox):
    dets = detect(yolox, data.astronaut())
    top = dets[0]
    assert top["label"] == "person" and top["class_id"] == 0 and top["score"] > 0.8
    x1, y1, x2, y2 = top["box"]
    # the figure spans roughly x 0-380, y 20-512 of the 512x512 photo
    assert x1 < 40 and y1 < 60 and 330 < x2 < 420 and y2 > 480
    assert all(0 <= v <= 512 for v in top["box"])


def test_coffee_is_a_cup_and_chelsea_a_cat(yolox):
    coffee = detect(yolox, data.coffee())
    assert coffee[0]["label"] == "cup" and coffee[0]["score"] > 0.8
    cx = (coffee[0]["box"][0] + coffee[0]["box"][2]) / 2
    assert 200 < cx < 400  # the cup sits in the middle of the 600-wide photo
    chelsea = detect(yolox, data.chelsea())
    assert chelsea[0]["label"] == "cat" and chelsea[0]["score"] > 0.5


def test_class_filter_and_threshold(yolox):
    only_table = detect(yolox, data.coffee(), classes=frozenset({60}))
    assert [d["label"] for d in only_table] == ["dining table"]
    assert detect(yolox, data.coffee(), conf=0.99) == []


def test_batch_of_four_equals_four_single_runs(yolox):
    spec, backend = yolox
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    tensors = np.stack([letterbox(im, spec.preprocess, image_color="rgb")[0] for im in images])
    batched = backend.infer(tensors)
    singles = np.concatenate([backend.infer(t[None]) for t in tensors])
    assert batched.shape == (4, 3549, 85)
    np.testing.assert_allclose(batched, singles, rtol=1e-4, atol=1e-3)


def test_letterbox_geometry_and_values():
    image = np.zeros((100, 200, 3), np.uint8)
    image[..., 0] = 10  # blue in BGR
    image[..., 2] = 200  # red
    spec = LetterboxSpec(size=(64, 64), pad_value=114)
    tensor, info = letterbox(image, spec)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == np.float32
    assert info == {"scale": 0.32, "pad": [0, 0], "input": [64, 64]}
    assert (tensor[:, :32] == np.array([10, 0, 200], np.float32)[:, None, None]).all()
    assert (tensor[:, 32:] == 114).all()

    rgb_unit, info_c = letterbox(image, LetterboxSpec(size=(64, 64), center=True, normalize="unit", color="rgb"))
    assert info_c["pad"] == [0, 16]
    assert np.allclose(rgb_unit[:, 16:48, 5], np.array([200, 0, 10])[:, None] / 255)
    assert np.allclose(rgb_unit[:, :16], 114 / 255)

    boxes = unletterbox_boxes(np.array([[0, 16, 64, 48], [-5, 0, 70, 70]], np.float32), info_c, 200, 100)
    np.testing.assert_allclose(boxes, [[0, 0, 200, 100], [0, 0, 200, 100]])


def test_letterbox_rejects_bad_input():
    with pytest.raises(ValueError, match="HxWx3"):
        letterbox(np.zeros((10, 10), np.uint8), LetterboxSpec())
    with pytest.raises(ValueError, match="normalize"):
        LetterboxSpec(normalize="zscore")


def test_yolox_grid_order():
    cells, strides = yolox_grid(416, 416)
    assert len(cells) == 3549
    assert cells[1].tolist() == [1, 0] and cells[52].tolist() == [0, 1] and strides[0, 0] == 8
    assert cells[2704].tolist() == [0, 0] and strides[2704, 0] == 16 and strides[-1, 0] == 32


def test_yolov5_decoder_on_hand_built_output():
    # 4 anchors, 3 classes: [cx, cy, w, h, obj, c0, c1, c2]
    out = np.array([
        [50, 50, 20, 40, 0.9, 0.1, 0.9, 0.0],   # class 1, score 0.81
        [52, 50, 20, 40, 0.8, 0.1, 0.8, 0.0],   # overlaps the first, same class: suppressed
        [52, 50, 20, 40, 0.9, 0.7, 0.1, 0.0],   # overlaps, other class: kept (score 0.63)
        [10, 10, 4, 4, 0.2, 0.0, 0.0, 0.9],     # score 0.18: below threshold
    ], np.float32)
    boxes, scores, ids = decode_yolov5(out, (100, 100), DetectParams(conf=0.3))
    np.testing.assert_allclose(boxes[0], [40, 30, 60, 70])
    np.testing.assert_allclose(scores, [0.81, 0.64, 0.63], rtol=1e-5)
    assert ids.tolist() == [1, 1, 0]
    assert nms(boxes, scores, ids, 0.45).tolist() == [0, 2]

    info = {"scale": 0.5, "pad": [0, 10], "input": [100, 100]}
    dets = postprocess(out, "yolov5", info, (200, 160), ["a", "b", "c"], DetectParams(conf=0.3, classes=frozenset({0})))
    assert dets == [{"box": [84.0, 40.0, 124.0, 120.0], "score": 0.63, "class_id": 0, "label": "a"}]


def test_yolov8_decoder_on_hand_built_output():
    # [4 + 2 classes, 3 anchors], no objectness
    out = np.array([
        [30, 70, 31],
        [30, 70, 30],
        [20, 10, 20],
        [20, 10, 20],
        [0.1, 0.95, 0.5],
        [0.6, 0.0, 0.2],
    ], np.float32)
    boxes, scores, ids = decode_yolov8(out, (100, 100), DetectParams(conf=0.3))
    assert ids.tolist() == [1, 0, 0]
    np.testing.assert_allclose(scores, [0.6, 0.95, 0.5])
    np.testing.assert_allclose(boxes[1], [65, 65, 75, 75])
    keep = nms(boxes, scores, ids, 0.45)
    assert keep.tolist() == [1, 0, 2]  # anchor 2 is class 0 like anchor 1 but far away; anchor 0 is class 1
    keep_same = nms(boxes, scores, np.zeros(3, np.int64), 0.45)
    assert keep_same.tolist() == [1, 0]  # one class: anchor 2 overlaps anchor 0 (IoU 0.9) and goes


def test_nms_empty():
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64), 0.5).tolist() == []


def test_bad_models_raise_one_line(tmp_path):
    with pytest.raises(ValueError, match="nope.onnx.*not a file"):
        resolve_model(str(tmp_path / "nope.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a model at all" * 10)
    with pytest.raises(ValueError, match="junk.onnx.*not an ONNX") as err:
        resolve_model(str(junk))
    assert "\n" not in str(err.value)

    model = onnx.load(str(MODELS_DIR / "yolox_nano.onnx"))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    del dims[2]
    odd = tmp_path / "odd.onnx"
    onnx.save(model, str(odd))
    with pytest.raises(ValueError, match="odd.onnx.*unrecognised output shape"):
        resolve_model(str(odd))


def test_model_by_path_reads_input(tmp_path):
    spec = resolve_model(str(MODELS_DIR / "yolox_nano.onnx"))
    assert spec.output_format == "yolox" and spec.preprocess.size == (416, 416) and spec.labels[0] == "person"
    backend = make_backend("onnxruntime", threads=1)
    backend.load(spec.path)
    assert backend.input.name == "images" and backend.input.dynamic_batch
    with pytest.raises(ValueError, match="backend nosuch: not available"):
        make_backend("nosuch")


def test_output_format_from_shape():
    assert guess_output_format("m", ["batch", 3549, 85], (416, 416)) == "yolox"
    assert guess_output_format("m", [1, 25200, 85], (640, 640)) == "yolov5"
    assert guess_output_format("m", [1, 84, 8400], (640, 640)) == "yolov8"
    with pytest.raises(ValueError, match="model m: unrecognised output shape"):
        guess_output_format("m", [1, "anchors", 85], (640, 640))


def test_dense_nms_keeps_exactly_what_the_greedy_loop_keeps(monkeypatch):
    """Up to DENSE_NMS candidates NMS uses one IoU matrix; it must keep the same boxes in the same order as the
    one-box-at-a-time loop, ties and duplicates included."""
    from graphflow.vision import detect

    rng = np.random.default_rng(7)
    for t in range(400):
        n = int(rng.integers(0, 120))
        xy = rng.uniform(0, 400, (n, 2)).astype(np.float32)
        wh = rng.uniform(1, 120, (n, 2)).astype(np.float32)
        if t % 3 == 0:  # a coarse grid: equal boxes and equal IoUs
            xy, wh = np.round(xy / 20) * 20, np.round(wh / 20) * 20 + 1
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.uniform(0, 1, n).astype(np.float32)
        if t % 4 == 0:
            scores = np.round(scores, 1)  # equal scores: the stable order decides
        class_ids = rng.integers(0, 3, n)
        iou, max_keep = float(rng.choice([0.3, 0.45, 0.7])), int(rng.choice([300, 4]))
        dense = detect.nms(boxes, scores, class_ids, iou, max_keep)
        monkeypatch.setattr(detect, "DENSE_NMS", -1)
        loop = detect.nms(boxes, scores, class_ids, iou, max_keep)
        monkeypatch.undo()
        assert np.array_equal(dense, loop), (t, dense, loop)
