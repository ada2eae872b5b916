"""GPU checks: CuPy letterbox vs NumPy, torch fp16 backend vs onnxruntime CPU, NVDEC vs software decode,
torch backend throughput, and the preprocess → infer engines with the tensor kept on the GPU.

Usage: python bench/gpu_check.py [--quick]
Needs a CUDA GPU with CuPy, PyTorch and onnx2torch; prints a table and a final `RESULT {json}` line. The helpers
are shared with tests/test_gpu.py. Each section records its error instead of stopping the others.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from graphflow import Message
from graphflow.testing import run_engine
from graphflow.media.backends import make_backend, stack_batch
from graphflow.vision.detect import DetectParams, box_iou, postprocess
from graphflow.vision.letterbox import LetterboxSpec, letterbox, letterbox_cupy
from graphflow.media.models import REGISTRY
from graphflow.media.sources import open_source

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
VIDEO = ROOT / "graphs" / "data" / "demo.mp4"
MODEL = REGISTRY["yolox-nano"]
SPECS = {  # the shipped model's, plus every other branch of the kernel: centre, unit/imagenet, colour swap, size
    "yolox": MODEL.preprocess,
    "center-unit-rgb": LetterboxSpec(size=(320, 256), pad_value=0, center=True, normalize="unit", color="rgb"),
    "imagenet-640": LetterboxSpec(size=(640, 640), center=True, normalize="imagenet", color="rgb"),
}
STRONG = 0.4  # detections at least this sure must appear in both backends' outputs


def demo_frames(count: int) -> list[np.ndarray]:
    """The first `count` frames of the demo video (BGR, software-decoded)."""
    source = open_source({"uri": str(VIDEO), "max_frames": count})
    try:
        return [frame.image for frame in source]
    finally:
        source.close()


def photos() -> dict[str, np.ndarray]:
    """Test images, BGR: scikit-image's astronaut, coffee and chelsea when installed, plus three demo frames."""
    images = {f"demo{i}": frame for i, frame in enumerate(demo_frames(90)[::30])}
    try:
        from skimage import data
    except ImportError:
        return images
    return {name: np.ascontiguousarray(getattr(data, name)()[:, :, ::-1]) for name in ("astronaut", "coffee", "chelsea")} | images


def letterbox_diffs(images: dict[str, np.ndarray]) -> list[dict]:
    """Max |CuPy - NumPy| and the count of differing values, per spec, over all images and both colour orders."""
    rows = []
    for name, spec in SPECS.items():
        worst, differing = 0.0, 0
        for image in images.values():
            for color in ("bgr", "rgb"):
                ref, ref_info = letterbox(image, spec, color)
                gpu, info = letterbox_cupy(image, spec, color)
                diff = np.abs(gpu.get() - ref)
                worst, differing = max(worst, float(diff.max())), differing + int((diff > 0).sum())
                assert info == ref_info, (info, ref_info)
        rows.append({"spec": name, "max_abs_diff": worst, "differing_values": differing})
    return rows


def detect(backend: Any, tensors: Any, infos: list[dict], sizes: list[tuple[int, int]]) -> list[list[dict]]:
    """Detections per image from one backend run over the stacked batch."""
    outputs = backend.infer(tensors)
    return [postprocess(out, MODEL.output_format, info, size, MODEL.labels, DetectParams())
            for out, info, size in zip(outputs, infos, sizes)]


def match_detections(ref: list[dict], other: list[dict]) -> dict:
    """Strong detections (score ≥ STRONG) of each side paired with the other's best same-class box."""
    unmatched, ious, score_diffs = 0, [], []
    for a_side, b_side in ((ref, other), (other, ref)):
        for det in (d for d in a_side if d["score"] >= STRONG):
            same = [d for d in b_side if d["class_id"] == det["class_id"]]
            if not same:
                unmatched += 1
                continue
            overlaps = box_iou(np.array(det["box"]), np.array([d["box"] for d in same]))
            best = int(overlaps.argmax())
            ious.append(float(overlaps[best]))
            score_diffs.append(abs(det["score"] - same[best]["score"]))
    return {"strong_pairs": len(ious), "unmatched": unmatched, "min_iou": min(ious, default=1.0),
            "max_score_diff": max(score_diffs, default=0.0)}


def compare_backends(images: dict[str, np.ndarray], kind: str = "torch") -> dict:
    """A GPU backend against onnxruntime on the CPU: from host tensors, and from tensors letterboxed by CuPy."""
    spec = MODEL.preprocess
    boxed = [letterbox(image, spec) for image in images.values()]
    infos = [info for _, info in boxed]
    sizes = [(image.shape[1], image.shape[0]) for image in images.values()]
    host = np.stack([tensor for tensor, _ in boxed])
    cpu, gpu = make_backend("onnxruntime"), make_backend(kind)
    cpu.load(MODEL.path)
    gpu.load(MODEL.path)
    ref = detect(cpu, host, infos, sizes)
    from_host = detect(gpu, host, infos, sizes)
    device_batch = stack_batch([letterbox_cupy(image, spec)[0] for image in images.values()])
    from_gpu = detect(gpu, device_batch, infos, sizes)
    from_parts = [detect(gpu, host[i:i + 1], infos[i:i + 1], sizes[i:i + 1])[0] for i in range(len(host))]
    per_image = {name: match_detections(r, h) for name, r, h in zip(images, ref, from_host)}
    return {
        "backend": gpu.name,
        "images": len(images),
        "cpu_detections": sum(len(r) for r in ref),
        "gpu_detections": sum(len(h) for h in from_host),
        "unmatched": sum(m["unmatched"] for m in per_image.values()),
        "min_iou": min(m["min_iou"] for m in per_image.values()),
        "max_score_diff": max(m["max_score_diff"] for m in per_image.values()),
        "cupy_input_same": from_gpu == from_host,
        "batch1_matches_batch": all(match_detections(a, b)["unmatched"] == 0 for a, b in zip(from_host, from_parts)),
        "cuda_graphs": getattr(gpu, "cuda_graphs", None),
        "top": {name: (r[0]["label"], r[0]["score"], h[0]["label"], h[0]["score"]) if r and h else None
                for name, r, h in zip(images, ref, from_host)},
    }


def decode_all(hwaccel: str | None) -> tuple[list[np.ndarray], list[float], str, float]:
    """Every frame of the demo video, their pts, the decoder's name and the decode time in seconds."""
    start = time.perf_counter()
    source = open_source({"uri": str(VIDEO), "hwaccel": hwaccel})
    try:
        frames = list(source)
        decoder = source._decoder.name
    finally:
        source.close()
    return [f.image for f in frames], [f.pts for f in frames], decoder, time.perf_counter() - start


def compare_decode() -> dict:
    """NVDEC (hwaccel cuda) against software decode of the demo video: frames, pts and pixels."""
    soft, soft_pts, soft_name, soft_s = decode_all(None)
    hard, hard_pts, hard_name, hard_s = decode_all("cuda")
    count = min(len(soft), len(hard))
    diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(soft[:count], hard[:count])]
    mse = float(np.mean([np.mean(d.astype(np.float64) ** 2) for d in diffs])) if diffs else float("nan")
    return {
        "decoder": hard_name, "software_decoder": soft_name,
        "frames": len(hard), "software_frames": len(soft), "same_pts": hard_pts == soft_pts,
        "max_abs_diff": int(max(d.max() for d in diffs)) if diffs else None,
        "mean_abs_diff": float(np.mean([d.mean() for d in diffs])) if diffs else None,
        "psnr_db": 10 * np.log10(255 ** 2 / mse) if mse > 0 else float("inf"),
        "fps": len(hard) / hard_s, "software_fps": len(soft) / soft_s,
    }


def timed(fn: Callable[[], Any], seconds: float) -> float:
    """Calls per second of `fn` over about `seconds` (after two warm-up calls)."""
    fn()
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def throughput(batches: tuple[int, ...], seconds: float) -> list[dict]:
    """Images/s of the torch backend per batch size and mode: the forward pass alone, infer() on a GPU batch (adds
    the output's download) and on a host batch (adds the upload too)."""
    import cupy
    import torch

    from graphflow.media.backends import TorchBackend

    rows = []
    width, height = MODEL.preprocess.size
    for mode, half, graphs in (("fp16+graphs", True, True), ("fp16", True, False), ("fp32", False, False)):
        backend = TorchBackend(half=half, cuda_graphs=graphs, max_batch=max(batches))
        backend.load(MODEL.path)
        for n in batches:
            host = np.random.default_rng(0).uniform(0, 255, (n, 3, height, width)).astype(np.float32)
            device = backend.prepare(cupy.asarray(host))
            rows.append({"mode": mode, "batch": n,
                         "forward_img_s": n * timed(lambda: _forward_only(backend, device, torch), seconds),
                         "gpu_input_img_s": n * timed(lambda: backend.infer(device), seconds),
                         "host_input_img_s": n * timed(lambda: backend.infer(host), seconds)})
    return rows


def _forward_only(backend: Any, batch: Any, torch: Any) -> None:
    """The model's forward pass alone, output left on the GPU."""
    with torch.inference_mode():
        backend.forward(batch)
    torch.cuda.synchronize()


def letterbox_speed(seconds: float) -> list[dict]:
    """Frames/s of letterbox on the CPU and on the GPU (upload, kernel, download) for 360p and 1080p frames."""
    rng = np.random.default_rng(0)
    rows = []
    for name, shape in (("640x360", (360, 640, 3)), ("1920x1080", (1080, 1920, 3))):
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        spec = MODEL.preprocess
        rows.append({"frame": name, "cpu_fps": timed(lambda: letterbox(frame, spec), seconds),
                     "gpu_fps": timed(lambda: letterbox_cupy(frame, spec)[0].get(), seconds),
                     "gpu_kept_fps": timed(lambda: _synced(letterbox_cupy(frame, spec)[0]), seconds)})
    return rows


def _synced(array: Any) -> Any:
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    return array


def frame_messages(images: dict[str, np.ndarray]) -> list[Message]:
    """The images as read-only frame messages of one stream, as a decode engine would send them."""
    msgs = []
    for seq, image in enumerate(images.values()):
        frozen = image.view()
        frozen.setflags(write=False)
        msgs.append(Message(stream="cam", seq=seq, data={"width": image.shape[1], "height": image.shape[0]},
                            arrays={"image": frozen}))
    return msgs


def preprocess_on_gpu(msgs: list[Message]) -> tuple[dict, list[Message], list[Message]]:
    """The preprocess engine on cuda against the CPU one: host tensors and kept-on-GPU (CuPy) tensors."""
    from graphflow.engines.preprocess import Preprocess

    cpu = run_engine(Preprocess, {}, msgs)["out"]
    host = run_engine(Preprocess, {"device": "cuda"}, msgs)["out"]
    kept = run_engine(Preprocess, {"device": "cuda", "keep_on_gpu": True}, msgs)["out"]
    result = {
        "host_equal": all(np.array_equal(a.arrays["tensor"], b.arrays["tensor"]) for a, b in zip(cpu, host)),
        "kept_type": type(kept[0].arrays["tensor"]).__module__.split(".")[0],
        "kept_equal": all(np.array_equal(a.arrays["tensor"], b.arrays["tensor"].get()) for a, b in zip(cpu, kept)),
    }
    return result, cpu, kept


def infer_engine(reference: list[Message], msgs: list[Message], max_batch: int) -> dict:
    """The infer engine on torch over `msgs`, its detections matched against `reference` (infer's output)."""
    from graphflow.engines.infer import Infer

    out = run_engine(Infer, {"backend": "torch", "max_batch": max_batch}, msgs)["out"]
    pairs = [match_detections(a.data["detections"], b.data["detections"]) for a, b in zip(reference, out)]
    return {"frames": len(out), "unmatched": sum(p["unmatched"] for p in pairs),
            "min_iou": min((p["min_iou"] for p in pairs), default=None)}


def threaded_dlpack(images: dict[str, np.ndarray], timeout: float = 30.0) -> dict:
    """CuPy tensors handed to the torch backend on one thread and run on another, as the infer engine's
    pipeline does; a thread still busy after `timeout` seconds is reported as hung."""
    import queue
    import threading

    backend = make_backend("torch")
    backend.load(MODEL.path)
    tensors = [letterbox_cupy(image, MODEL.preprocess)[0] for image in images.values()]
    handoff: queue.Queue = queue.Queue(maxsize=1)
    outputs: list[np.ndarray] = []

    def assemble() -> None:
        for tensor in tensors:
            handoff.put(backend.prepare(tensor[None]))
        handoff.put(None)

    def run() -> None:
        while (batch := handoff.get()) is not None:
            outputs.append(backend.infer(batch))

    threads = [threading.Thread(target=fn, daemon=True) for fn in (assemble, run)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return {"hung": [t.name for t in threads if t.is_alive()], "outputs": len(outputs)}


def environment() -> dict:
    import av
    import onnxruntime

    info: dict[str, Any] = {"python": sys.version.split()[0], "av": av.__version__,
                            "cuvid_decoders": sorted(c for c in av.codecs_available if c.endswith("_cuvid")),
                            "onnxruntime": onnxruntime.__version__,
                            "onnxruntime_providers": onnxruntime.get_available_providers()}
    for name in ("torch", "cupy", "onnx2torch"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except ImportError as exc:  # report what is missing, run the rest
            info[name] = f"missing ({exc})"
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    except Exception as exc:
        info["gpu"] = f"none ({type(exc).__name__})"
    try:
        make_backend("tensorrt")
        info["tensorrt"] = "installed"
    except ValueError as exc:
        info["tensorrt"] = str(exc)
    return info


def section(results: dict, name: str, fn: Callable[[], Any]) -> None:
    """Run one check into results[name]; an exception is recorded with its last traceback line."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"SECTION {name} {time.perf_counter() - start:.1f} s: {json.dumps(results[name], default=str)}", flush=True)


def print_table(results: dict) -> None:
    """People-readable summary of each section."""
    for name, value in results.items():
        print(f"\n== {name}")
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if isinstance(row, dict):
                print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
            else:
                print(f"  {row}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    parser.add_argument("--hang-s", type=float, default=120, help="engine checks: dump stacks and exit after this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    seconds = 0.5 if args.quick else 1.0
    results: dict[str, Any] = {}
    images = photos()
    section(results, "environment", environment)
    section(results, "letterbox_cupy_vs_numpy", lambda: letterbox_diffs(images))
    section(results, "letterbox_speed", lambda: letterbox_speed(seconds))
    section(results, "torch_vs_onnxruntime", lambda: compare_backends(images))
    section(results, "nvdec_vs_software", compare_decode)
    section(results, "torch_throughput", lambda: throughput((1, 8, 32), seconds))
    faulthandler.dump_traceback_later(args.hang_s, exit=True)  # a hang below prints every thread's stack and ends
    section(results, "threaded_dlpack", lambda: threaded_dlpack(images))
    result, cpu, kept = preprocess_on_gpu(frame_messages(images))
    section(results, "preprocess_engine", lambda: result)
    from graphflow.engines.infer import Infer

    reference = run_engine(Infer, {"backend": "onnxruntime"}, cpu)["out"]
    section(results, "infer_engine_host", lambda: infer_engine(reference, cpu, 4))
    for max_batch in (1, 4):
        section(results, f"infer_engine_cupy_batch{max_batch}", lambda: infer_engine(reference, kept, max_batch))
    faulthandler.cancel_dump_traceback_later()
    print_table(results)
    print("RESULT " + json.dumps(results, default=str))


if __name__ == "__main__":
    main()
