"""GPU paths: CuPy letterbox, the torch backend, NVDEC decode (skipped without a CUDA GPU), and their CPU-side
fallbacks and one-line errors (run everywhere)."""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import data as photo_data

from graphflow.engines.infer import Infer
from graphflow.engines.preprocess import Preprocess
from graphflow import ParamError
from graphflow.testing import run_engine
from graphflow.media import backends, models
from graphflow.vision.detect import DECODERS, DetectParams, batch_candidates, decode_yolox, finish_candidates, nms, pack_candidates, postprocess
from graphflow.vision.letterbox import LetterboxSpec, PinnedStaging, letterbox, letterbox_batch, letterbox_batch_cupy, letterbox_cupy, unletterbox_boxes
from graphflow.media.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
VIDEO = str(ROOT / "graphs" / "data" / "demo.mp4")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_ready() -> bool:
    """CuPy and PyTorch installed and both see a CUDA GPU."""
    try:
        backends._require_torch_cuda("test")
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except (ValueError, ImportError, RuntimeError):
        return False


def _nvdec_ready() -> bool:
    """FFmpeg's h264_cuvid decoder opens (it needs an NVIDIA GPU and driver)."""
    import av

    try:
        av.CodecContext.create("h264_cuvid", "r").open()
    except (av.FFmpegError, ValueError):
        return False
    return True


gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs CuPy and PyTorch with a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_check():
    return _load_gpu_check()


# --- on a GPU -------------------------------------------------------------------------------------------------

@gpu
def test_letterbox_cupy_equals_numpy(gpu_check):
    for row in gpu_check.letterbox_diffs(gpu_check.photos()):
        assert row["max_abs_diff"] <= 1e-3, row


@gpu
def test_torch_fp16_matches_onnxruntime(gpu_check):
    result = gpu_check.compare_backends(gpu_check.photos())
    assert result["backend"] == "torch" and result["unmatched"] == 0, result
    assert result["min_iou"] > 0.9 and result["max_score_diff"] < 0.05, result
    assert result["cupy_input_same"] and result["batch1_matches_batch"] and result["cuda_graphs"], result


@gpu
def test_preprocess_engine_on_cuda(gpu_check):
    result, _, _ = gpu_check.preprocess_on_gpu(gpu_check.frame_messages(gpu_check.photos()))
    assert result == {"host_equal": True, "kept_type": "cupy", "kept_equal": True}


@gpu
def test_batch_letterbox_on_gpu_and_infer_letterboxing_itself(gpu_check):
    """letterbox_batch_cupy equals the NumPy batch, for frames of mixed sizes (one upload and launch each) and of
    one size (one pinned upload, the staging buffer reused; one kernel launch for the batch); infer with `letterbox: true` on torch gives the detections of
    preprocess → infer on torch."""
    images = gpu_check.photos()
    spec = LetterboxSpec()
    mixed = list(images.values())
    got = letterbox_batch_cupy(mixed, spec, ["bgr"] * len(mixed)).get()
    assert np.abs(got - letterbox_batch(mixed, spec, ["bgr"] * len(mixed))).max() <= 1e-3
    same = [f for f in mixed if f.shape == mixed[-1].shape]
    staging = PinnedStaging()
    assert len(same) >= 2
    mixed_colors = ["bgr", "rgb"] * len(same)
    for colors in (["bgr"] * len(same), ["rgb"] * len(same), mixed_colors[:len(same)]):  # one launch; per frame
        got = letterbox_batch_cupy(same, spec, colors, staging).get()
        assert np.abs(got - letterbox_batch(same, spec, colors)).max() <= 1e-3
    msgs = gpu_check.frame_messages(images)
    chain = run_engine(Infer, {"backend": "torch", "max_batch": 8}, run_engine(Preprocess, {}, msgs)["out"])["out"]
    fused = run_engine(Infer, {"backend": "torch", "max_batch": 8, "letterbox": True}, msgs)["out"]
    for a, b in zip(chain, fused):
        assert [d["label"] for d in a.data["detections"]] == [d["label"] for d in b.data["detections"]]
        for da, db in zip(a.data["detections"], b.data["detections"]):
            np.testing.assert_allclose(da["box"], db["box"], atol=0.5)


@gpu
@pytest.mark.parametrize("params", [DetectParams(), DetectParams(conf=0.05), DetectParams(classes=frozenset({0, 41}))])
def test_gpu_decode_equals_cpu_decode(gpu_check, params):
    """TorchBackend.candidates (decode, score, threshold and class filter on the GPU) gives the CPU decoder's
    candidates and, through the shared NMS, the same detections as postprocess on the same raw outputs."""
    spec = models.resolve_model("yolox-nano")
    backend = backends.make_backend("torch", max_batch=4)
    backend.load(spec.path)
    images = list(gpu_check.photos().values())[:4]
    boxed = [letterbox(image, spec.preprocess) for image in images]
    batch = np.stack([tensor for tensor, _ in boxed])
    raw = backend.infer(batch)
    found = backend.candidates(batch, "yolox", params)
    assert len(found) == len(images) and sum(len(c) for c in found) > 0
    for image, (_, info), out, cand in zip(images, boxed, raw, found):
        expected = pack_candidates(*decode_yolox(out, spec.preprocess.size, params))
        assert cand.shape == expected.shape and np.array_equal(cand[:, 5], expected[:, 5])
        np.testing.assert_allclose(cand, expected, rtol=1e-5, atol=1e-3)
        size = (image.shape[1], image.shape[0])
        mine = finish_candidates(cand, info, size, spec.labels, params)
        reference = postprocess(out, "yolox", info, size, spec.labels, params)
        assert [d["class_id"] for d in mine] == [d["class_id"] for d in reference]
        for a, b in zip(mine, reference):
            assert np.allclose(a["box"], b["box"], atol=0.05) and abs(a["score"] - b["score"]) <= 1e-3


@gpu
def test_recorded_decode_equals_cpu_decode_and_times_runs_on_the_gpu(gpu_check):
    """The decode replayed from a CUDA graph (top_k rows per image) gives the CPU decoder's candidates of the same
    raw output at every batch size, padded or not; an image that fills all top_k rows reruns on the exact path
    (gpu_candidates); device_span brackets the run within the host's."""
    import time

    spec = models.resolve_model("yolox-nano")
    backend = backends.make_backend("torch", max_batch=4)
    backend.load(spec.path)
    images = list(gpu_check.photos().values())[:4]
    batch = np.stack([letterbox(image, spec.preprocess)[0] for image in images])

    def check(found: list[np.ndarray], raw: np.ndarray, params: DetectParams) -> None:
        assert len(found) == len(raw)
        for cand, out in zip(found, raw):
            expected = pack_candidates(*decode_yolox(out, spec.preprocess.size, params))
            assert cand.shape == expected.shape and np.array_equal(cand[:, 5], expected[:, 5])
            np.testing.assert_allclose(cand, expected, rtol=1e-5, atol=1e-3)

    for params in (DetectParams(), DetectParams(conf=0.05)):
        for n in (1, 3, 4):
            t0 = time.monotonic()
            found = backend.candidates(batch[:n], "yolox", params)
            t1 = time.monotonic()
            start, end = backend.device_span()
            assert t0 - 0.01 <= start < end <= t1 + 0.01, (t0, start, end, t1)
            assert backend.device_span() is None  # read once
            check(found, backend.infer(batch[:n]), params)  # the same recorded forward pass, so the same output
    assert sorted(k[:3] for k in backend.decoders) == sorted((size, "yolox", conf) for size in (1, 4)
                                                             for conf in (DetectParams().conf, 0.05))
    backend.top_k = 4  # conf 0.05 keeps more than four rows of an image: the exact path counts them all
    backend.decoders.clear()
    many = backend.candidates(batch, "yolox", DetectParams(conf=0.05))
    assert max(len(c) for c in many) > 4
    check(many, backend.infer(batch), DetectParams(conf=0.05))


@pytest.mark.skipif(not _nvdec_ready(), reason="needs NVDEC (h264_cuvid and an NVIDIA GPU)")
def test_nvdec_decode_matches_software(gpu_check):
    result = gpu_check.compare_decode()
    assert result["decoder"] == "h264_cuvid", result
    assert result["frames"] == result["software_frames"] == 250 and result["same_pts"], result
    assert result["psnr_db"] > 40, result


# --- everywhere: fallbacks and errors ---------------------------------------------------------------------------

@pytest.mark.skipif(_nvdec_ready(), reason="NVDEC works here, so there is no fallback to see")
def test_hwaccel_cuda_falls_back_to_software(caplog):
    with caplog.at_level(logging.WARNING, logger="graphflow.media.video"):
        source = open_source({"uri": VIDEO, "hwaccel": "cuda", "start": 2.0, "max_frames": 30})
        frames = list(source)
        source.close()
    assert any("h264_cuvid" in r.message and "decoding in software" in r.message for r in caplog.records)
    reference = open_source({"uri": VIDEO, "start": 2.0, "max_frames": 30})
    expected = list(reference)
    reference.close()
    assert [f.pts for f in frames] == [f.pts for f in expected] and len(frames) == 30
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, expected))


@pytest.mark.parametrize("kind, module, needs", [("torch", "torch", "PyTorch with CUDA is not installed"),
                                                  ("tensorrt", "tensorrt", "TensorRT is not installed")])
def test_gpu_backend_missing_is_one_line(monkeypatch, kind, module, needs):
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if not installed
    with pytest.raises(ValueError) as err:
        backends.make_backend(kind)
    text = str(err.value)
    assert text.startswith(f"backend {kind}: ") and needs in text and "pip install" in text and "\n" not in text


def test_auto_backend_without_torch_uses_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert backends.make_backend("auto").name == "onnxruntime"


def test_cuda_preprocess_without_cupy_is_a_param_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    with pytest.raises(ParamError, match="device.*CuPy"):
        run_engine(Preprocess, {"device": "cuda"}, [])
    with pytest.raises(ParamError, match="keep_on_gpu.*needs device 'cuda'"):
        run_engine(Preprocess, {"keep_on_gpu": True}, [])
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ValueError, match="^device cuda: CuPy is not installed"):
        letterbox_cupy(np.zeros((4, 4, 3), np.uint8), LetterboxSpec())


def test_top_rows_split_back_per_image_in_anchor_order():
    """A recorded decode's [N, K, 7] rows (best first, -1 scores not kept) become gpu_candidates' per-image [k, 6]
    rows in anchor order; an image with all K rows kept may have had more, so the caller must count exactly."""
    def row(anchor: int, score: float) -> list[float]:
        return [anchor, anchor + 1, anchor + 2, anchor + 3, score, anchor % 7, anchor]
    top = np.array([[row(9, 0.9), row(2, 0.5), row(5, -1.0)],
                    [row(4, -1.0), row(1, -1.0), row(0, -1.0)],
                    [row(3, 0.3), row(8, 0.2), row(6, -1.0)]], np.float32)
    found = backends.split_top_candidates(top)
    assert [len(c) for c in found] == [2, 0, 2]
    assert found[0].shape == (2, 6) and found[0][:, 0].tolist() == [2, 9] and np.allclose(found[0][:, 4], [0.5, 0.9])
    assert found[2][:, 0].tolist() == [3, 8] and found[1].shape == (0, 6)
    top[1, 2, 4] = 0.1  # image 1 kept all three rows
    assert backends.split_top_candidates(top) is None


def test_host_batches_pass_through_unchanged():
    batch = [np.full((3, 2, 2), i, np.float32) for i in range(3)]
    stacked = backends.stack_batch(batch)
    assert isinstance(stacked, np.ndarray) and stacked.shape == (3, 3, 2, 2) and stacked[2, 0, 0, 0] == 2
    assert backends.to_host(stacked) is stacked


def test_shared_nms_path_equals_postprocess_on_a_photo():
    """finish_candidates over packed candidates gives exactly what decoding, NMS and unletterboxing give by hand on
    a real photo's model output (the path GPU-decoded candidates take)."""
    spec = models.resolve_model("yolox-nano")
    backend = backends.make_backend("onnxruntime", threads=1)
    backend.load(spec.path)
    image = np.ascontiguousarray(photo_data.astronaut())
    tensor, info = letterbox(image, spec.preprocess, image_color="rgb")
    out = backend.infer(tensor[None])[0]
    size = (image.shape[1], image.shape[0])
    for params in (DetectParams(), DetectParams(conf=0.05, iou=0.3), DetectParams(classes=frozenset({0}))):
        boxes, scores, class_ids = decode_yolox(out, spec.preprocess.size, params)
        keep = nms(boxes, scores, class_ids, params.iou, params.max_detections)
        by_hand = unletterbox_boxes(boxes[keep], info, *size)
        detections = finish_candidates(pack_candidates(boxes, scores, class_ids), info, size, spec.labels, params)
        assert detections == postprocess(out, "yolox", info, size, spec.labels, params)
        assert len(detections) == len(keep) > 0
        assert [d["class_id"] for d in detections] == class_ids[keep].tolist()
        np.testing.assert_allclose([d["box"] for d in detections], by_hand, atol=0.006)
        np.testing.assert_allclose([d["score"] for d in detections], scores[keep], atol=6e-5)
    assert any(d["label"] == "person" for d in postprocess(out, "yolox", info, size, spec.labels, DetectParams()))


def _raw_outputs(fmt: str, rng: np.random.Generator) -> np.ndarray:
    """A batch of three raw outputs of `fmt`: the shipped YOLOX model on real photos, else synthetic scores (cubed,
    so most anchors fall under the threshold) and boxes, [N, A, 85] for v5 and [N, 84, A] for v8."""
    if fmt == "yolox":
        spec = models.resolve_model("yolox-nano")
        backend = backends.make_backend("onnxruntime", threads=1)
        backend.load(spec.path)
        photos = [photo_data.astronaut(), photo_data.coffee(), photo_data.chelsea()]
        return backend.infer(np.stack([letterbox(np.ascontiguousarray(p), spec.preprocess)[0] for p in photos]))
    rows = rng.random((3, 2000, 85), dtype=np.float32) ** 3
    rows[..., :4] = rng.uniform(0, 640, (3, 2000, 4)).astype(np.float32)
    return np.ascontiguousarray(rows[..., 1:].swapaxes(1, 2)) if fmt == "yolov8" else rows


@pytest.mark.parametrize("fmt", ["yolox", "yolov5", "yolov8"])
def test_batch_decode_on_numpy_equals_the_per_image_decoders(fmt):
    """detect.batch_candidates — the decode the torch backend runs on the GPU, there with torch as `xp` — gives on
    NumPy input, image by image, exactly the candidates of the CPU decoders, for thresholds and class filters."""
    size = (416, 416) if fmt == "yolox" else (640, 640)
    raw = _raw_outputs(fmt, np.random.default_rng(7))
    for params in (DetectParams(), DetectParams(conf=0.05), DetectParams(conf=0.02, classes=frozenset({0, 41}))):
        image, boxes, scores, class_ids = batch_candidates(raw, fmt, size, params)
        assert len(image) > 0 and image.tolist() == sorted(image.tolist())
        for i, out in enumerate(raw):
            expected = pack_candidates(*DECODERS[fmt](out, size, params))
            got = pack_candidates(boxes[image == i], scores[image == i], class_ids[image == i])
            assert got.shape == expected.shape and np.array_equal(got, expected), (fmt, params, i)


def test_yolox_decode_arithmetic_on_a_hand_built_output():
    """One anchor of a 32×32 input (21 anchors: 16 of stride 8, 4 of 16, 1 of 32): cell (1, 1) of stride 8 with
    offsets (0.5, 0.25) and log sizes log 2, log 4 is the box centred at (12, 10), 16 wide and 32 high."""
    out = np.zeros((21, 7), np.float32)
    out[5] = [0.5, 0.25, np.log(2), np.log(4), 0.9, 0.2, 0.8]
    out[20] = [0.0, 0.0, 0.0, 0.0, 0.9, 0.3, 0.1]  # stride 32, cell (0, 0): score 0.27, under the threshold
    for boxes, scores, class_ids in (decode_yolox(out, (32, 32), DetectParams()),
                                     batch_candidates(out[None], "yolox", (32, 32), DetectParams())[1:]):
        np.testing.assert_allclose(boxes, [[4, -6, 20, 26]], atol=1e-5)
        np.testing.assert_allclose(scores, [0.72], atol=1e-6)
        assert class_ids.tolist() == [1]
    with pytest.raises(ValueError, match=r"^yolox output: 20 anchors, expected 21 for input \[32, 32\]$"):
        batch_candidates(out[None, :20], "yolox", (32, 32), DetectParams(conf=0.0))
