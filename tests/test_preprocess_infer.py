"""The preprocess and infer engines through graphflow.testing.run_engine, on real photos and the real model."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from graphflow.engines.infer import Infer
from graphflow.engines.preprocess import Preprocess
from graphflow import Message, ParamError
from graphflow.testing import run_engine, start_engine

PHOTOS = {"astronaut": "person", "coffee": "cup", "chelsea": "cat"}


def frames() -> list[Message]:
    """The photos as BGR frames, as a decode engine would send them."""
    out = []
    for seq, name in enumerate(PHOTOS):
        bgr = np.ascontiguousarray(getattr(data, name)()[:, :, ::-1])
        bgr.setflags(write=False)  # received arrays are read-only
        out.append(Message(stream="cam", seq=seq, data={"width": bgr.shape[1], "height": bgr.shape[0]},
                           arrays={"image": bgr}))
    return out


def preprocessed(params: dict | None = None) -> list[Message]:
    return run_engine(Preprocess, params or {}, frames())["out"]


def test_preprocess_adds_tensor_and_letterbox():
    msgs = preprocessed()
    assert [m.seq for m in msgs] == [0, 1, 2]
    coffee = msgs[1]
    assert coffee.arrays["tensor"].shape == (3, 416, 416) and coffee.arrays["tensor"].dtype == np.float32
    assert coffee.data["letterbox"] == {"scale": 416 / 600, "pad": [0, 0], "input": [416, 416]}
    assert coffee.data["width"] == 600 and coffee.arrays["image"].shape == (400, 600, 3)
    assert (coffee.arrays["tensor"][:, 277:] == 114).all()  # 400 * 416/600 = 277 rows of photo, then padding
    assert not (coffee.arrays["tensor"][:, 276] == 114).all()


def test_preprocess_params():
    msgs = preprocessed({"size": [320, 256], "normalize": "unit", "center": True, "color": "rgb", "pad_value": 0})
    tensor, info = msgs[0].arrays["tensor"], msgs[0].data["letterbox"]
    assert tensor.shape == (3, 256, 320) and info["pad"] == [32, 0] and tensor.max() <= 1.0
    assert (tensor[:, :, :32] == 0).all()
    with pytest.raises(ParamError, match="size"):
        run_engine(Preprocess, {"size": [416]}, [])
    with pytest.raises(ParamError, match="normalize"):
        run_engine(Preprocess, {"normalize": "zscore"}, [])


def test_infer_detects_photos_and_drops_tensor():
    out = run_engine(Infer, {}, preprocessed())["out"]
    assert [m.seq for m in out] == [0, 1, 2]
    for msg, label in zip(out, PHOTOS.values()):
        assert "tensor" not in msg.arrays and "image" in msg.arrays
        top = msg.data["detections"][0]
        assert top["label"] == label and top["score"] > 0.5
        assert set(top) == {"box", "score", "class_id", "label"}
        x1, y1, x2, y2 = top["box"]
        assert 0 <= x1 < x2 <= msg.data["width"] and 0 <= y1 < y2 <= msg.data["height"]


def test_infer_batched_equals_single_and_class_filter():
    msgs = preprocessed()  # fp32 onnxruntime on any machine: fp16 on a GPU moves boxes by more (tests/test_gpu.py)
    single = run_engine(Infer, {"max_batch": 1, "backend": "onnxruntime"}, msgs)["out"]
    batched = run_engine(Infer, {"max_batch": 2, "backend": "onnxruntime"}, msgs)["out"]  # full batch, then a partial one
    assert [m.seq for m in batched] == [0, 1, 2]
    for a, b in zip(single, batched):
        assert len(a.data["detections"]) == len(b.data["detections"])
        for da, db in zip(a.data["detections"], b.data["detections"]):
            assert da["class_id"] == db["class_id"]
            np.testing.assert_allclose(da["box"], db["box"], atol=0.5)
            assert abs(da["score"] - db["score"]) < 1e-3
    cats = run_engine(Infer, {"classes": ["cat", 41]}, msgs)["out"]
    assert {d["label"] for m in cats for d in m.data["detections"]} == {"cat", "cup"}


def test_infer_param_errors(tmp_path):
    with pytest.raises(ParamError, match="classes\\[0\\].*unicorn"):
        run_engine(Infer, {"classes": ["unicorn"]}, [])
    with pytest.raises(ParamError, match="model.*not a file"):
        run_engine(Infer, {"model": str(tmp_path / "missing.onnx")}, [])
    with pytest.raises(ParamError, match="backend"):
        run_engine(Infer, {"backend": "magic"}, [])


def test_infer_rejects_wrong_input():
    with pytest.raises(ValueError, match="preprocess"):
        run_engine(Infer, {}, [Message(arrays={"image": np.zeros((8, 8, 3), np.uint8)})])
    wrong = preprocessed({"size": [320, 320]})
    with pytest.raises(ValueError, match="does not fit model yolox-nano"):
        run_engine(Infer, {}, wrong)


def test_infer_letterboxing_frames_itself_equals_a_preprocess_engine_before_it():
    """`letterbox: true` (frames straight from decode, of different sizes in one batch) gives the detections the
    preprocess → infer chain gives, and the frames pass on untouched."""
    chain = run_engine(Infer, {"max_batch": 3, "backend": "onnxruntime"}, preprocessed())["out"]
    fused = run_engine(Infer, {"max_batch": 3, "backend": "onnxruntime", "letterbox": True}, frames())["out"]
    assert [m.seq for m in fused] == [0, 1, 2]
    for a, b in zip(chain, fused):
        assert a.data["letterbox"] == b.data["letterbox"]
        assert [d["label"] for d in a.data["detections"]] == [d["label"] for d in b.data["detections"]]
        np.testing.assert_allclose([d["box"] for d in a.data["detections"]], [d["box"] for d in b.data["detections"]],
                                   atol=1e-3)
        assert b.arrays["image"] is not None and "tensor" not in b.arrays
    with pytest.raises(ValueError, match="needs arrays\\['image'\\], an HxWx3 uint8 frame"):
        run_engine(Infer, {"letterbox": True}, [Message(arrays={"image": np.zeros((8, 8), np.uint8)})])


def test_infer_in_a_process_letterboxes_shared_memory_frames_like_the_preprocess_chain(tmp_path):
    """decode → infer(letterbox, process) — frames cross as shared-memory handles — gives the detections of
    decode → preprocess → infer in threads."""
    import json
    from pathlib import Path

    from graphflow import graph
    from graphflow import runtime

    video = str(Path(__file__).resolve().parents[1] / "graphs" / "data" / "demo.mp4")

    def run(fused: bool) -> list[dict]:
        out = tmp_path / f"{fused}.jsonl"
        engines = {"src": {"type": "decode", "params": {"sources": [{"id": "cam", "uri": video, "max_frames": 6}]}},
                   "det": {"type": "infer", "params": {"max_batch": 3, "backend": "onnxruntime", "letterbox": fused},
                           **({"placement": "process"} if fused else {})},
                   "out": {"type": "sink", "params": {"path": str(out)}}}
        connections = [["src.out", "det.in"], ["det.out", "out.in"]]
        if not fused:
            engines["pre"] = {"type": "preprocess"}
            connections = [["src.out", "pre.in"], ["pre.out", "det.in"], ["det.out", "out.in"]]
        summary = runtime.run(graph.build({"engines": engines, "connections": connections}, "fused"),
                              handle_signals=False)
        assert not summary.failed, summary.errors
        return [json.loads(line) for line in out.read_text().splitlines()]

    chain, fused = run(False), run(True)
    assert len(fused) == len(chain) == 6
    assert any(r["detections"] for r in fused)
    for a, b in zip(chain, fused):
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        np.testing.assert_allclose([d["box"] for d in a["detections"]],
                                   [d["box"] for d in b["detections"]], atol=0.01)


def test_model_runs_in_infers_worker_threads_count_as_its_busy_time():
    """The model runs on infer's own threads, not in process(): that time is still infer's busy time (read here
    before flush, whose wait for the last batches the runtime counts anyway)."""
    msgs = preprocessed()
    with start_engine(Infer, {"backend": "onnxruntime", "threads": 1}) as harness:
        for msg in msgs:
            harness.engine.process(msg)
        harness.wait_sent(len(msgs), timeout=60)  # a hang guard only
        metrics = harness.engine.metrics()
        model_s = metrics["batches"] * metrics["mean_run_ms"] / 1e3  # host time of the model runs
        assert metrics["batches"] == len(msgs) and model_s > 0
        assert harness.busy_s >= 0.95 * model_s
        harness.flush()
