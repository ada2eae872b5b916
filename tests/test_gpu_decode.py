"""NVDEC frames kept on the GPU (`hwaccel: nvdec`): NV12 letterbox against the CPU path, many decoders sharing one
CUDA context in one process, infer on GPU frames (skipped without a CUDA GPU); the NV12 conversion and the one-line
errors run everywhere."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from graphflow.engines.infer import Infer
from graphflow import Message
from graphflow import graph
from graphflow.testing import run_engine
from graphflow.vision.detect import box_iou
from graphflow.media.nvdec import GpuFrame, letterbox_nv12_batch, nv12_to_rgb_numpy, yuv_terms
from graphflow.vision.letterbox import LetterboxSpec, letterbox_batch
from graphflow.media.models import REGISTRY
from graphflow.media.video import SourceError
from graphflow.media.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
VIDEO = str(ROOT / "graphs" / "data" / "demo.mp4")
SPECS = {"yolox": REGISTRY["yolox-nano"].preprocess,
         "center-unit-rgb": LetterboxSpec(size=(320, 256), pad_value=0, center=True, normalize="unit", color="rgb"),
         "imagenet-640": LetterboxSpec(size=(640, 640), center=True, normalize="imagenet", color="rgb")}


def _cuda_ready() -> bool:
    """CuPy sees a CUDA GPU and FFmpeg's CUDA hwaccel opens on it."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
    except (ImportError, RuntimeError):
        return False
    return "cuda" in av.codec.hwaccel.hwdevices_available()


gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs CuPy with a CUDA GPU and PyAV's CUDA hwaccel")


def _clip(tmp_path_factory: pytest.TempPathFactory, width: int, height: int) -> str:
    spec = importlib.util.spec_from_file_location("clip", ROOT / "bench" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.make_clip(tmp_path_factory.getbasetemp() / "clips", width, height, 30, 1.0, gop=15))


def _nv12(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray]:
    """A software-decoded yuv420p frame's planes as NV12 (Y, interleaved UV)."""
    yuv = frame.to_ndarray(format="yuv420p")
    h, w = frame.height, frame.width
    u = yuv[h:h + h // 4].reshape(h // 2, w // 2)
    v = yuv[h + h // 4:].reshape(h // 2, w // 2)
    return yuv[:h], np.stack([u, v], axis=-1).reshape(h // 2, w)


# --- everywhere ----------------------------------------------------------------------------------------------

def test_nv12_conversion_is_close_to_swscale():
    """The exact BT.601 conversion (the GPU path's reference) against FFmpeg's fast one of the CPU path: swscale
    reads about one level lower, never more than 3."""
    with av.open(VIDEO) as container:
        frame = next(container.decode(video=0))
    y, uv = _nv12(frame)
    ours = nv12_to_rgb_numpy(y, uv, yuv_terms(int(frame.colorspace or 0), int(frame.color_range or 0)))
    theirs = frame.to_ndarray(format="bgr24")
    diff = ours.astype(int) - theirs.astype(int)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.abs(diff).max() <= 3
    assert 0 <= diff.mean() <= 1.5
    rgb = nv12_to_rgb_numpy(y, uv, color="rgb")
    assert np.array_equal(rgb, ours[:, :, ::-1])


def test_nvdec_source_without_gpu_fails_in_one_line():
    if _cuda_ready():
        pytest.skip("a GPU is present")
    with pytest.raises(SourceError) as err:
        open_source({"uri": VIDEO, "hwaccel": "nvdec"})
    text = str(err.value)
    assert "hwaccel nvdec" in text and "\n" not in text


def test_hwaccel_field_is_checked():
    with pytest.raises(SourceError) as err:
        open_source({"uri": VIDEO, "hwaccel": "nvenc"})
    assert "hwaccel" in str(err.value) and "'nvdec'" in str(err.value)


# --- on a GPU ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return _clip(tmp_path_factory, 1920, 1080), _clip(tmp_path_factory, 1280, 720)


def _frames(uri: str, count: int, hwaccel: str | None) -> list:
    source = open_source({"uri": uri, "max_frames": count, **({"hwaccel": hwaccel} if hwaccel else {})})
    try:
        return [f.image for f in source.frames()]
    finally:
        source.close()


@gpu
def test_nv12_letterbox_equals_cpu_path(clips):
    """A batch of NVDEC frames of two sizes, letterboxed in one launch from NV12, equals the NumPy letterbox of the
    same frames converted on the host (the CPU path) for three preprocessing specs, within one level."""
    frames = _frames(clips[0], 4, "nvdec") + _frames(clips[1], 4, "nvdec")
    assert all(isinstance(f, GpuFrame) for f in frames)
    host = [nv12_to_rgb_numpy(*f.host_planes(), f.terms) for f in frames]
    software = _frames(clips[0], 4, None) + _frames(clips[1], 4, None)
    for name, spec in SPECS.items():
        got = letterbox_nv12_batch(frames, spec).get()
        scale = 255.0 if spec.normalize == "unit" else 1.0 if spec.normalize == "none" else 58.0
        assert np.abs(got - letterbox_batch(host, spec, ["bgr"] * len(host))).max() * scale <= 1.0, name
        # the software decoder's frames (FFmpeg's fast YUV → BGR) stay within a few levels
        assert np.abs(got - letterbox_batch(software, spec, ["bgr"] * len(software))).max() * scale <= 6.0, name


@gpu
def test_gpu_frame_to_host_equals_numpy_conversion(clips):
    frame = _frames(clips[1], 1, "nvdec")[0]
    image = np.asarray(frame)
    assert image.shape == (720, 1280, 3) and image.dtype == np.uint8
    assert np.array_equal(image, nv12_to_rgb_numpy(*frame.host_planes(), frame.terms))


@gpu
def test_many_decoders_share_one_context(clips):
    """Eight streams decode at once in one process: every frame arrives, and each decoder costs far less GPU memory
    than a CUDA context of its own would (h264_cuvid: ~550 MB each on an H200)."""
    import cupy

    def used() -> int:
        free, total = cupy.cuda.runtime.memGetInfo()
        return total - free

    cupy.cuda.runtime.free(0)
    before = used()
    got: dict[int, list] = {}

    def play(i: int) -> None:
        got[i] = _frames(clips[0], 30, "nvdec")

    threads = [threading.Thread(target=play, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, used())
        threading.Event().wait(0.02)
    assert sorted(got) == list(range(8))
    assert all(len(frames) == 30 and all(isinstance(f, GpuFrame) and f.shape == (1080, 1920, 3) for f in frames)
               for frames in got.values())
    per_decoder_mb = (peak - before) / 8 / 2**20
    assert per_decoder_mb < 300, per_decoder_mb
    assert float(cupy.arange(4).sum()) == 6.0  # CuPy still works in the shared context


def _detections(frames: list, stream: str) -> list[list[dict]]:
    messages = [Message(stream=stream, seq=i, pts=i / 30, arrays={"image": f},
                        data={"width": f.shape[1], "height": f.shape[0], "color": "bgr"})
                for i, f in enumerate(frames)]
    out = run_engine(Infer, {"backend": "torch", "letterbox": True, "max_batch": 4, "conf": 0.3}, messages)["out"]
    return [m.data["detections"] for m in sorted(out, key=lambda m: m.seq)]


@gpu
def test_infer_on_gpu_frames_matches_software_decoding(clips):
    """infer letterboxes NVDEC frames on the GPU: the same detections as from software-decoded frames."""
    pytest.importorskip("onnx2torch")
    gpu_dets = _detections(_frames(clips[1], 12, "nvdec"), "gpu")
    cpu_dets = _detections(_frames(clips[1], 12, None), "cpu")
    assert len(gpu_dets) == len(cpu_dets) == 12
    strong = 0
    for ours, theirs in zip(gpu_dets, cpu_dets):
        for d in (d for d in theirs if d["score"] >= 0.5):
            strong += 1
            same = [o for o in ours if o["label"] == d["label"]]
            assert same and box_iou(np.array(d["box"]), np.array([o["box"] for o in same])).max() > 0.8
    assert strong > 0


def test_e2e_bench_graphs_validate(tmp_path, monkeypatch):
    """bench/e2e.py's graphs (GPU: NVDEC + torch in process shards; CPU: software + onnxruntime) pass validation."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    module = importlib.import_module("e2e")
    for decode, gpu_on, shards in (("nvdec", True, 3), ("software", False, 1)):
        args = argparse.Namespace(decode=decode, max_wait_ms=20.0, queue=8)
        doc = module.graph_doc(args, Path(VIDEO), 5, shards, tmp_path, gpu_on)
        built = graph.build(doc, str(tmp_path / "e2e.json"))
        assert len(built.nodes) == 5 * shards
        sources = [s for e in doc["engines"].values() if e["type"] == "decode" for s in e["params"]["sources"]]
        assert len(sources) == 5 and all(s["realtime"] and s["loop"] for s in sources)
        assert all(s.get("hwaccel") == ("nvdec" if gpu_on else None) for s in sources)
