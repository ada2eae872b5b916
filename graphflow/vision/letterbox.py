"""Letterbox resize and normalisation: an HxWx3 uint8 frame to a 3xHxW float32 model input.

The letterbox info dict `{"scale", "pad", "input"}` lets detections be mapped back: x = (x' - pad_x) / scale.
`letterbox` runs in NumPy; `letterbox_cupy` does the same in one CUDA kernel with CuPy, with equal results.
`letterbox_batch` / `letterbox_batch_cupy` fill a whole [N, 3, H, W] batch (the infer engine's own preprocessing);
on the GPU, frames of one size go up in a single copy through pinned memory.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("none", "unit", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LetterboxSpec:
    """How to turn a frame into a model input; `size` is (width, height) of the model input."""

    size: tuple[int, int] = (416, 416)
    pad_value: int = 114
    center: bool = False
    normalize: str = "none"
    color: str = "bgr"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"letterbox size: must be [width, height] with both >= 1 (got {list(self.size)})")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"letterbox normalize: must be one of {NORMALIZE_MODES} (got {self.normalize!r})")
        if self.color not in ("bgr", "rgb"):
            raise ValueError(f"letterbox color: must be 'bgr' or 'rgb' (got {self.color!r})")


def letterbox_geometry(width: int, height: int, spec: LetterboxSpec) -> tuple[float, int, int, int, int]:
    """Scale, resized (w, h) and padding (x, y) that fit a width x height frame into `spec.size`."""
    in_w, in_h = spec.size
    scale = min(in_w / width, in_h / height)
    new_w = max(1, min(in_w, round(width * scale)))
    new_h = max(1, min(in_h, round(height * scale)))
    pad_x, pad_y = ((in_w - new_w) // 2, (in_h - new_h) // 2) if spec.center else (0, 0)
    return scale, new_w, new_h, pad_x, pad_y


def _resize_indices(src: int, dst: int) -> np.ndarray:
    """Fractional source coordinate of each destination pixel, with pixel centres aligned."""
    pos = (np.arange(dst, dtype=np.float32) + 0.5) * (src / dst) - 0.5
    return np.clip(pos, 0, src - 1)


def resize_bilinear(image: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """Bilinear resize of an HxWxC array to new_h x new_w x C, vectorised (pixel-centre aligned), all in float32:
    a + (b - a) * w along x, then along y — the same operations, in the same order, as the CUDA kernel below."""
    h, w = image.shape[:2]
    ys, xs = _resize_indices(h, new_h), _resize_indices(w, new_w)
    y0 = np.floor(ys).astype(np.intp)
    x0 = np.floor(xs).astype(np.intp)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0).astype(np.float32)[:, None, None]  # exact: a float32 minus its floor
    wx = (xs - x0).astype(np.float32)[None, :, None]
    row0, row1 = image[y0], image[y1]
    a, b = row0[:, x0].astype(np.float32), row0[:, x1].astype(np.float32)
    top = a + (b - a) * wx
    a, b = row1[:, x0].astype(np.float32), row1[:, x1].astype(np.float32)
    bottom = a + (b - a) * wx
    return top + (bottom - top) * wy


def normalize_terms(mode: str) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Per-channel (sub, div) float32 arrays and a multiplier: normalised v = (v - sub) / div * mul."""
    sub, div, mul = np.zeros(3, np.float32), np.ones(3, np.float32), np.float32(1.0)
    if mode == "unit":
        mul = np.float32(1.0 / 255.0)
    elif mode == "imagenet":
        sub = np.asarray(IMAGENET_MEAN, dtype=np.float32) * np.float32(255.0)
        div = np.asarray(IMAGENET_STD, dtype=np.float32) * np.float32(255.0)
    return sub, div, mul


def _normalize(chw: np.ndarray, mode: str) -> np.ndarray:
    """Normalise a 3xHxW float32 array in place (channels already in model order)."""
    if mode != "none":
        sub, div, mul = normalize_terms(mode)
        chw -= sub[:, None, None]
        chw /= div[:, None, None]
        chw *= mul
    return chw


def letterbox(image: np.ndarray, spec: LetterboxSpec, image_color: str = "bgr",
              out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Letterbox an HxWx3 uint8 frame into a 3xHxW float32 tensor (into `out` if given); returns (tensor, info)."""
    image = np.asarray(image)
    height, width = _check_image(image)
    scale, new_w, new_h, pad_x, pad_y = letterbox_geometry(width, height, spec)
    same_size = (new_w, new_h) == (width, height)
    resized = image.astype(np.float32) if same_size else resize_bilinear(image, new_w, new_h)
    if image_color != spec.color:
        resized = resized[:, :, ::-1]
    chw = _target(out, spec, np)
    chw.fill(float(spec.pad_value))
    chw[:, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = np.round(resized).transpose(2, 0, 1)
    return _normalize(chw, spec.normalize), _info(scale, pad_x, pad_y, spec)


def letterbox_info(width: int, height: int, spec: LetterboxSpec) -> dict:
    """The info dict `letterbox` returns for a width x height frame, without touching any pixels."""
    scale, _, _, pad_x, pad_y = letterbox_geometry(width, height, spec)
    return _info(scale, pad_x, pad_y, spec)


def letterbox_batch(frames: Sequence[np.ndarray], spec: LetterboxSpec, colors: Sequence[str]) -> np.ndarray:
    """`letterbox` of each frame (HxWx3 uint8, any sizes) into one new [N, 3, H, W] float32 batch."""
    in_w, in_h = spec.size
    batch = np.empty((len(frames), 3, in_h, in_w), np.float32)
    for i, (frame, color) in enumerate(zip(frames, colors)):
        letterbox(frame, spec, color, out=batch[i])
    return batch


def _check_image(image: Any) -> tuple[int, int]:
    """(height, width) of an HxWx3 image; ValueError for any other shape."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"letterbox: image must be HxWx3 (got shape {tuple(image.shape)})")
    return image.shape[0], image.shape[1]


def _target(out: Any, spec: LetterboxSpec, xp: Any) -> Any:
    """`out` checked against the model input shape, or a new float32 3xHxW array of module `xp`."""
    in_w, in_h = spec.size
    if out is None:
        return xp.empty((3, in_h, in_w), dtype=xp.float32)
    if out.shape != (3, in_h, in_w) or out.dtype != xp.float32:
        raise ValueError(f"letterbox: out must be float32 {(3, in_h, in_w)} (got {out.dtype} {tuple(out.shape)})")
    return out


def _info(scale: float, pad_x: int, pad_y: int, spec: LetterboxSpec) -> dict:
    return {"scale": float(scale), "pad": [int(pad_x), int(pad_y)], "input": [int(spec.size[0]), int(spec.size[1])]}


# One thread per model-input pixel: bilinear sample of the uint8 HWC frame, round half to even, normalise, and
# write all 3 CHW planes. The arithmetic is resize_bilinear's (float32 throughout, same operation order) with FMA
# contraction off, so the result equals `letterbox`'s.
_LETTERBOX_CUDA = r"""
__device__ void letterbox_pixel(
        const unsigned char* src, int src_h, int src_w, float* dst, int dst_h, int dst_w, int i,
        int pad_x, int pad_y, int new_w, int new_h, float sy, float sx, int swap, float pad,
        float sub0, float sub1, float sub2, float div0, float div1, float div2, float mul) {
    int x = i % dst_w - pad_x, y = i / dst_w - pad_y;
    float v[3] = {pad, pad, pad};
    if (x >= 0 && x < new_w && y >= 0 && y < new_h) {
        float fy = fminf(fmaxf(((float)y + 0.5f) * sy - 0.5f, 0.0f), (float)(src_h - 1));
        float fx = fminf(fmaxf(((float)x + 0.5f) * sx - 0.5f, 0.0f), (float)(src_w - 1));
        int y0 = (int)floorf(fy), x0 = (int)floorf(fx);
        int y1 = min(y0 + 1, src_h - 1), x1 = min(x0 + 1, src_w - 1);
        float wy = fy - (float)y0, wx = fx - (float)x0;
        const unsigned char* r0 = src + (size_t)y0 * src_w * 3;
        const unsigned char* r1 = src + (size_t)y1 * src_w * 3;
        for (int c = 0; c < 3; ++c) {
            float a = r0[x0 * 3 + c], b = r0[x1 * 3 + c];
            float top = a + (b - a) * wx;
            a = r1[x0 * 3 + c];
            b = r1[x1 * 3 + c];
            float bottom = a + (b - a) * wx;
            v[swap ? 2 - c : c] = rintf(top + (bottom - top) * wy);
        }
    }
    const float sub[3] = {sub0, sub1, sub2}, div[3] = {div0, div1, div2};
    for (int c = 0; c < 3; ++c)
        dst[(size_t)c * dst_h * dst_w + i] = (v[c] - sub[c]) / div[c] * mul;
}

// Frame n = blockIdx.y of src [N, H, W, 3] into dst [N, 3, dst_h, dst_w] (one frame: a grid of one row).
extern "C" __global__ void letterbox(
        const unsigned char* src, int src_h, int src_w, float* dst, int dst_h, int dst_w,
        int pad_x, int pad_y, int new_w, int new_h, float sy, float sx, int swap, float pad,
        float sub0, float sub1, float sub2, float div0, float div1, float div2, float mul) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= dst_h * dst_w) return;
    size_t n = blockIdx.y;
    letterbox_pixel(src + n * src_h * src_w * 3, src_h, src_w, dst + n * 3 * dst_h * dst_w, dst_h, dst_w, i,
                    pad_x, pad_y, new_w, new_h, sy, sx, swap, pad, sub0, sub1, sub2, div0, div1, div2, mul);
}
"""
_THREADS = 256


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise ValueError("device cuda: CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x)") from None
    return cupy


def require_cupy() -> Any:
    """The cupy module when CuPy is installed and sees a CUDA GPU; else ValueError saying what is missing."""
    cupy = _import_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise ValueError(f"device cuda: CuPy cannot reach a CUDA GPU ({exc})") from None
    if count < 1:
        raise ValueError("device cuda: CuPy sees no CUDA GPU")
    return cupy


@functools.cache
def _cuda_kernel() -> Any:
    """The letterbox kernel, compiled by NVRTC once per process."""
    import cupy

    return cupy.RawKernel(_LETTERBOX_CUDA, "letterbox", options=("--fmad=false",))


def _kernel_args(src: Any, height: int, width: int, chw: Any, spec: LetterboxSpec, swap: bool) -> tuple[tuple, dict]:
    scale, new_w, new_h, pad_x, pad_y = letterbox_geometry(width, height, spec)
    in_w, in_h = spec.size
    sub, div, mul = normalize_terms(spec.normalize)
    i32, f32 = np.int32, np.float32
    args = (src, i32(height), i32(width), chw, i32(in_h), i32(in_w), i32(pad_x), i32(pad_y), i32(new_w), i32(new_h),
            f32(height / new_h), f32(width / new_w), i32(swap), f32(spec.pad_value), *sub, *div, mul)
    return args, _info(scale, pad_x, pad_y, spec)


def letterbox_cupy(image: Any, spec: LetterboxSpec, image_color: str = "bgr", out: Any = None) -> tuple[Any, dict]:
    """`letterbox` on the GPU in one CUDA kernel: a NumPy or CuPy uint8 frame (uploaded once) to a CuPy 3xHxW
    float32 tensor (into `out` if given), equal to `letterbox`'s output; runs on CuPy's current stream."""
    cupy = _import_cupy()
    height, width = _check_image(image)
    src = cupy.ascontiguousarray(cupy.asarray(image, dtype=cupy.uint8))
    chw = _target(out, spec, cupy)
    args, info = _kernel_args(src, height, width, chw, spec, image_color != spec.color)
    in_w, in_h = spec.size
    _cuda_kernel()(((in_w * in_h + _THREADS - 1) // _THREADS,), (_THREADS,), args)
    return chw, info


@functools.cache
def _torch() -> Any:
    """PyTorch if installed (quietly wrapping read-only frames: it only reads them), else None."""
    try:
        import torch
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return torch


class PinnedStaging:
    """A reusable page-locked host buffer through which a batch of frames goes to the GPU in one asynchronous copy
    (pageable memory would be copied twice, and synchronously)."""

    def __init__(self) -> None:
        self.memory: Any = None
        self.nbytes = 0
        self.done: Any = None  # CUDA event of the last copy out of the buffer

    def upload(self, frames: Sequence[np.ndarray]) -> Any:
        """The frames (one shape, uint8) stacked into a CuPy [N, H, W, 3] array, on CuPy's current stream. With
        PyTorch installed the frames are stacked into the buffer by one torch call, which lets go of the GIL while it
        copies (NumPy holds it: other engine threads would wait for a whole batch's copy)."""
        cupy = _import_cupy()
        shape = (len(frames), *frames[0].shape)
        size = frames[0].nbytes
        nbytes = size * len(frames)
        if self.done is not None:
            self.done.synchronize()  # the previous batch has left the buffer (waits without the GIL)
        if nbytes > self.nbytes:
            self.memory, self.nbytes = cupy.cuda.alloc_pinned_memory(nbytes), nbytes
        host = np.frombuffer(self.memory, np.uint8, nbytes).reshape(shape)
        torch = _torch()
        if torch is not None:  # one call that copies every frame with the GIL let go (and on several threads)
            torch.stack([torch.from_numpy(np.ascontiguousarray(f)) for f in frames], out=torch.from_numpy(host))
        else:
            np.stack(frames, out=host)
        device = cupy.empty(shape, cupy.uint8)
        device.set(host)
        self.done = cupy.cuda.Event()
        self.done.record()
        return device


def letterbox_batch_cupy(frames: Sequence[Any], spec: LetterboxSpec, colors: Sequence[str],
                         staging: PinnedStaging | None = None) -> Any:
    """`letterbox_batch` on the GPU: a CuPy [N, 3, H, W] float32 batch equal to the NumPy one. Host frames of one
    shape are uploaded together (through `staging` if given) and, in one colour order, letterboxed by one kernel
    launch; otherwise one launch per frame."""
    cupy = _import_cupy()
    in_w, in_h = spec.size
    batch = cupy.empty((len(frames), 3, in_h, in_w), cupy.float32)
    on_host = all(not hasattr(f, "__cuda_array_interface__") for f in frames)
    if on_host and len({(f.shape, f.dtype) for f in frames}) == 1 and frames[0].dtype == np.uint8:
        height, width = _check_image(frames[0])
        uploaded = (staging or PinnedStaging()).upload(frames)
        if len(set(colors)) == 1:
            args, _ = _kernel_args(uploaded, height, width, batch, spec, colors[0] != spec.color)
            _cuda_kernel()(((in_w * in_h + _THREADS - 1) // _THREADS, len(frames)), (_THREADS,), args)
            return batch
        frames = uploaded
    for i, (frame, color) in enumerate(zip(frames, colors)):
        letterbox_cupy(frame, spec, color, out=batch[i])
    return batch


def unletterbox_boxes(boxes: np.ndarray, info: dict, width: int, height: int) -> np.ndarray:
    """Map Nx4 [x1, y1, x2, y2] boxes from model-input pixels back to the original frame, clipped to it."""
    pad_x, pad_y = info["pad"]
    out = (np.asarray(boxes, dtype=np.float32) - np.array([pad_x, pad_y, pad_x, pad_y], np.float32)) / info["scale"]
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    return out
