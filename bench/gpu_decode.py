"""NVDEC decoding with frames left on the GPU: PyAV's CUDA hwaccel in the primary context against NVIDIA's
PyNvVideoCodec, many decoders in one process, on a 1080p30 H.264 clip made by bench/clip.py.

Usage: python bench/gpu_decode.py [--threads 1,8,16,32] [--frames 600] [--quick]
For each library and decoder count: frames per second over all decoders (each decodes its own copy of the clip,
looping), host CPU seconds per frame (the interpreter's share, which bounds how many streams one process feeds) and
GPU memory per decoder (a decoder with a CUDA context of its own costs hundreds of MB more); and, for reference, the
`hwaccel: cuda` path (h264_cuvid, BGR on the host) at 8 decoders. PyNvVideoCodec is optional (`pip install
PyNvVideoCodec`; its rows say so when absent). Also checks that the NV12 letterbox kernel equals the NumPy letterbox
of the same frames. Prints a table and `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clip import make_clip
from graphflow.media.nvdec import GpuFrame, letterbox_nv12_batch, nv12_to_rgb_numpy
from graphflow.vision.letterbox import LetterboxSpec, letterbox_batch
from graphflow.media.models import REGISTRY
from graphflow.media.video import SourceSpec
from graphflow.media.sources import open_source


def gpu_used_mb() -> float:
    import cupy
    free, total = cupy.cuda.runtime.memGetInfo()
    return (total - free) / 2**20


def pyav_worker(path: Path, frames: int, out: list) -> None:
    """Decode `frames` frames (looping) with `hwaccel: nvdec` (PyAV, primary context); each frame a GpuFrame."""
    source = open_source(SourceSpec(uri=str(path), hwaccel="nvdec", loop=True, max_frames=frames))
    try:
        n = 0
        for frame in source.frames():
            assert isinstance(frame.image, GpuFrame)
            n += 1
        out.append(n)
    finally:
        source.close()


def cuvid_worker(path: Path, frames: int, out: list) -> None:
    """The existing `hwaccel: cuda` path: h264_cuvid (a CUDA context per decoder), BGR frames on the host."""
    source = open_source(SourceSpec(uri=str(path), hwaccel="cuda", loop=True, max_frames=frames))
    try:
        out.append(sum(1 for _ in source.frames()))
    finally:
        source.close()


_primary: list[int] = []


def primary_context() -> int:
    """The device's primary CUDA context handle (retained once), for decoders that take a context."""
    if not _primary:
        libcuda = ctypes.CDLL("libcuda.so.1")
        ctx = ctypes.c_void_p()
        assert libcuda.cuInit(0) == 0
        assert libcuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
        _primary.append(ctx.value)
    return _primary[0]


def nvc_worker(path: Path, frames: int, out: list) -> None:
    """Decode `frames` frames (looping) with PyNvVideoCodec's demuxer and core decoder in the primary context."""
    import PyNvVideoCodec as nvc
    n = 0
    decoder = None
    while n < frames:
        demuxer = nvc.CreateDemuxer(filename=str(path))
        if decoder is None:
            decoder = nvc.CreateDecoder(gpuid=0, codec=demuxer.GetNvCodecId(), cudacontext=primary_context(),
                                        cudastream=0, usedevicememory=True)
        for packet in demuxer:
            n += len(decoder.Decode(packet))
            if n >= frames:
                break
    out.append(n)


def run_threads(worker: Callable, path: Path, threads: int, frames: int) -> dict[str, Any]:
    before = gpu_used_mb()
    done: list[int] = []
    pool = [threading.Thread(target=worker, args=(path, frames, done), daemon=True) for _ in range(threads)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for t in pool:
        t.start()
    peak = before
    while any(t.is_alive() for t in pool):
        time.sleep(0.05)
        peak = max(peak, gpu_used_mb())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    total = sum(done)
    return {"threads": threads, "frames": total, "ok": len(done) == threads, "fps": round(total / wall, 1),
            "cpu_ms_per_frame": round(cpu / max(total, 1) * 1e3, 3), "wall_s": round(wall, 2),
            "gpu_mb_per_decoder": round((peak - before) / threads, 1)}


def letterbox_check(path: Path, count: int = 12) -> dict[str, Any]:
    """NV12 letterbox kernel vs the NumPy letterbox of the same NV12 converted on the host, and vs the software
    decoder's BGR (swscale): max abs difference over `count` frames, three specs."""
    gpu = open_source(SourceSpec(uri=str(path), hwaccel="nvdec", max_frames=count))
    cpu = open_source(SourceSpec(uri=str(path), max_frames=count))
    try:
        frames = [f.image for f in gpu.frames()]
        soft = [f.image for f in cpu.frames()]
        planes = [f.host_planes() for f in frames]
        specs = {"yolox": REGISTRY["yolox-nano"].preprocess,
                 "center-unit-rgb": LetterboxSpec(size=(320, 256), pad_value=0, center=True, normalize="unit",
                                                  color="rgb"),
                 "same-size": LetterboxSpec(size=(frames[0].width, frames[0].height))}
        result: dict[str, Any] = {}
        host = [nv12_to_rgb_numpy(y, uv, f.terms) for (y, uv), f in zip(planes, frames)]
        conv = np.asarray(frames[0]).astype(int)
        result["to_rgb_kernel_vs_numpy_max"] = int(np.abs(conv - host[0].astype(int)).max())
        result["numpy_nv12_vs_swscale_max"] = int(max(np.abs(h.astype(int) - s.astype(int)).max()
                                                     for h, s in zip(host, soft)))
        for name, spec in specs.items():
            got = letterbox_nv12_batch(frames, spec).get()
            ref = letterbox_batch(host, spec, ["bgr"] * len(host))
            sw = letterbox_batch(soft, spec, ["bgr"] * len(soft))
            scale = 255.0 if spec.normalize == "unit" else 1.0
            result[name] = {"vs_numpy_nv12_max": float(np.abs(got - ref).max() * scale),
                            "vs_software_decode_max": float(np.abs(got - sw).max() * scale),
                            "vs_software_decode_share_gt1": float((np.abs(got - sw) * scale > 1.001).mean())}
        return result
    finally:
        gpu.close()
        cpu.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,8,16,32")
    ap.add_argument("--frames", type=int, default=600, help="frames per decoder")
    ap.add_argument("--clips", default=os.path.join(tempfile.gettempdir(), "graphflow_clips"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    frames = 150 if args.quick else args.frames
    path = make_clip(Path(args.clips), 1920, 1080, 30, 10.0)
    result: dict[str, Any] = {"clip": path.name}
    try:
        result["letterbox"] = letterbox_check(path)
    except Exception:
        result["letterbox_error"] = traceback.format_exc(limit=4)
    print(json.dumps(result.get("letterbox") or result.get("letterbox_error"), indent=1), flush=True)
    rows = []
    counts = [int(x) for x in args.threads.split(",")]
    for name, worker, sizes in (("pyav-hwaccel", pyav_worker, counts), ("pynvvideocodec", nvc_worker, counts),
                                ("cuvid-host-bgr", cuvid_worker, [8])):
        for n in sizes:
            try:
                row = {"library": name, **run_threads(worker, path, n, frames)}
            except Exception:
                row = {"library": name, "threads": n, "error": traceback.format_exc(limit=3)}
            rows.append(row)
            print(row, flush=True)
    result["decode"] = rows
    print(f"{'library':16} {'decoders':>8} {'fps':>8} {'CPU ms/frame':>12} {'GPU MB/decoder':>14}")
    for r in rows:
        if "fps" in r:
            print(f"{r['library']:16} {r['threads']:>8} {r['fps']:>8} {r['cpu_ms_per_frame']:>12} "
                  f"{r['gpu_mb_per_decoder']:>14}")
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
