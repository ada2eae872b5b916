"""NVDEC decoding that keeps frames on the GPU, and the NV12 letterbox that feeds them to the detector.

A source with `"hwaccel": "nvdec"` decodes through PyAV's CUDA hwaccel in the process's primary CUDA context (the
one PyTorch and CuPy use, so every decoder of a process shares it) and hands each frame on as a `GpuFrame`: the
decoder's NV12 surface, never copied to the host. Infer letterboxes a batch of them in one kernel launch straight
from NV12 (`letterbox_nv12_batch`); pixels reach the host only when a consumer converts a frame (`np.asarray`).
CuPy is imported on first use, so this module imports on machines without a GPU.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any

import av
import numpy as np

from graphflow.media.video import AVSource, SourceError
from graphflow.vision.letterbox import LetterboxSpec, letterbox_geometry, normalize_terms, require_cupy

# YUV → RGB terms per (matrix, full range): Y offset, Y gain, then V→R, U→G, V→G, U→B gains
_YUV_TERMS = {
    ("bt601", False): (16.0, 255 / 219, 1.596027, 0.391762, 0.812968, 2.017232),
    ("bt709", False): (16.0, 255 / 219, 1.792741, 0.213249, 0.532909, 2.112402),
    ("bt601", True): (0.0, 1.0, 1.402, 0.344136, 0.714136, 1.772),
    ("bt709", True): (0.0, 1.0, 1.5748, 0.187324, 0.468124, 1.8556),
}
_AV_ITU709 = 1  # AVColorSpace of BT.709; anything else (unspecified included) is read as BT.601, as swscale does
_AV_RANGE_FULL = 2  # AVColorRange JPEG


def yuv_terms(colorspace: int = 0, color_range: int = 0) -> tuple[float, ...]:
    """The YUV → RGB terms of a frame tagged with FFmpeg's `colorspace` and `color_range` numbers."""
    matrix = "bt709" if colorspace == _AV_ITU709 else "bt601"
    return _YUV_TERMS[(matrix, color_range == _AV_RANGE_FULL)]


def nv12_to_rgb_numpy(y: np.ndarray, uv: np.ndarray, terms: Sequence[float] = _YUV_TERMS[("bt601", False)],
                      color: str = "bgr") -> np.ndarray:
    """An NV12 frame (`y` [H, W], `uv` [H/2, W] interleaved U, V) as HxWx3 uint8 in `color` order, each chroma
    sample serving its 2×2 pixels; float32 in the same operation order as the CUDA kernel, so both give equal bytes."""
    height, width = y.shape
    f32 = np.float32
    yoff, gain, rv, gu, gv, bu = (f32(t) for t in terms)
    chroma = uv.reshape(height // 2, width // 2, 2).astype(f32) - f32(128)
    chroma = np.repeat(np.repeat(chroma, 2, axis=0), 2, axis=1)[:height, :width]
    u, v = chroma[..., 0], chroma[..., 1]
    luma = (y.astype(f32) - yoff) * gain
    b, g, r = luma + bu * u, (luma - gu * u) - gv * v, luma + rv * v
    planes = (b, g, r) if color == "bgr" else (r, g, b)
    return np.rint(np.clip(np.stack(planes, axis=-1), 0, 255)).astype(np.uint8)


class _Writable:
    """`flags` of a GpuFrame: the in-process channel marks arrays read-only; a GpuFrame is never written anyway."""

    writeable = False


class GpuFrame:
    """One decoded NV12 frame in GPU memory: device pointers and pitches of its Y and interleaved UV planes, kept
    valid by `owner` (the decoder's frame). To code that reads `shape`, `dtype` and `ndim` it is an HxWx3 uint8
    image; `np.asarray(frame)` converts it on the GPU and downloads it, for the consumers that need pixels."""

    ndim = 3
    dtype = np.dtype(np.uint8)
    flags = _Writable()

    def __init__(self, y_ptr: int, y_pitch: int, uv_ptr: int, uv_pitch: int, width: int, height: int,
                 terms: Sequence[float], color: str = "bgr", owner: Any = None, device: int = 0) -> None:
        self.y_ptr, self.y_pitch, self.uv_ptr, self.uv_pitch = y_ptr, y_pitch, uv_ptr, uv_pitch
        self.width, self.height = width, height
        self.shape = (height, width, 3)
        self.terms = tuple(terms)
        self.color = color
        self.owner = owner
        self.device = device

    @property
    def nbytes(self) -> int:
        return self.width * self.height * 3 // 2

    @classmethod
    def from_av(cls, frame: av.VideoFrame, color: str = "bgr") -> GpuFrame:
        """Wrap a PyAV frame decoded into CUDA memory (format `cuda`, NV12 surface); ValueError for any other."""
        if frame.format.name != "cuda":
            raise ValueError(f"frame in {frame.format.name}, not in CUDA memory")
        sw = frame.sw_format.name if getattr(frame, "sw_format", None) is not None else "nv12"
        if sw != "nv12":
            raise ValueError(f"GPU frame of {sw}, only nv12 is supported (8-bit 4:2:0)")
        luma, chroma = frame.planes[0], frame.planes[1]
        return cls(luma.buffer_ptr, luma.line_size, chroma.buffer_ptr, chroma.line_size, frame.width, frame.height,
                   yuv_terms(int(frame.colorspace or 0), int(frame.color_range or 0)), color, owner=frame,
                   device=getattr(frame, "device_id", 0) or 0)

    def host_planes(self) -> tuple[np.ndarray, np.ndarray]:
        """The Y [H, W] and UV [H/2, W] planes copied to the host (for checks against the CPU path)."""
        cupy = require_cupy()

        def plane(ptr: int, pitch: int, rows: int) -> np.ndarray:
            memory = cupy.cuda.UnownedMemory(ptr, pitch * rows, self.owner, self.device)
            full = cupy.ndarray((rows, pitch), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))
            return full[:, :self.width].get()

        return plane(self.y_ptr, self.y_pitch, self.height), plane(self.uv_ptr, self.uv_pitch, self.height // 2)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        image = nv12_to_rgb_cupy(self, self.color).get()
        return image if dtype is None else image.astype(dtype)

    def __repr__(self) -> str:
        return f"GpuFrame({self.width}x{self.height} nv12 on cuda:{self.device})"


def is_gpu_frame(image: Any) -> bool:
    """True for a frame that `letterbox_nv12_batch` takes."""
    return isinstance(image, GpuFrame)


# One thread per output pixel. nv12_rgb converts one source pixel with the terms of its frame and rounds it, so a
# letterboxed value is the bilinear mix of four such pixels exactly as `letterbox` computes it on a converted frame
# (float32, the same operation order, FMA contraction off).
_NV12_CUDA = r"""
__device__ __forceinline__ float to_level(float v) { return rintf(fminf(fmaxf(v, 0.0f), 255.0f)); }

__device__ void nv12_rgb(const unsigned char* y, const unsigned char* uv, int pitch_y, int pitch_uv,
                         int row, int col, const float* t, float* bgr) {
    float luma = ((float)y[(size_t)row * pitch_y + col] - t[0]) * t[1];
    const unsigned char* c = uv + (size_t)(row >> 1) * pitch_uv + (col & ~1);
    float u = (float)c[0] - 128.0f, v = (float)c[1] - 128.0f;
    bgr[0] = to_level(luma + t[5] * u);
    bgr[1] = to_level((luma - t[3] * u) - t[4] * v);
    bgr[2] = to_level(luma + t[2] * v);
}

// frame n = blockIdx.y: planes[2n], planes[2n+1] its Y and UV pointers; ints[8n..]: pitch_y, pitch_uv, src_h, src_w,
// new_w, new_h, pad_x, pad_y; floats[8n..]: sy, sx, then the 6 YUV terms. dst [N, 3, dst_h, dst_w] float32.
extern "C" __global__ void nv12_letterbox(
        const unsigned long long* planes, const int* ints, const float* floats, float* dst, int dst_h, int dst_w,
        int swap, float pad, float sub0, float sub1, float sub2, float div0, float div1, float div2, float mul) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= dst_h * dst_w) return;
    size_t n = blockIdx.y;
    const int* p = ints + 8 * n;
    const float* f = floats + 8 * n;
    const unsigned char* y = (const unsigned char*)planes[2 * n];
    const unsigned char* uv = (const unsigned char*)planes[2 * n + 1];
    int src_h = p[2], src_w = p[3], new_w = p[4], new_h = p[5];
    int x = i % dst_w - p[6], row = i / dst_w - p[7];
    float v[3] = {pad, pad, pad};
    if (x >= 0 && x < new_w && row >= 0 && row < new_h) {
        float fy = fminf(fmaxf(((float)row + 0.5f) * f[0] - 0.5f, 0.0f), (float)(src_h - 1));
        float fx = fminf(fmaxf(((float)x + 0.5f) * f[1] - 0.5f, 0.0f), (float)(src_w - 1));
        int y0 = (int)floorf(fy), x0 = (int)floorf(fx);
        int y1 = min(y0 + 1, src_h - 1), x1 = min(x0 + 1, src_w - 1);
        float wy = fy - (float)y0, wx = fx - (float)x0;
        float a[3], b[3], c[3], d[3];
        nv12_rgb(y, uv, p[0], p[1], y0, x0, f + 2, a);
        nv12_rgb(y, uv, p[0], p[1], y0, x1, f + 2, b);
        nv12_rgb(y, uv, p[0], p[1], y1, x0, f + 2, c);
        nv12_rgb(y, uv, p[0], p[1], y1, x1, f + 2, d);
        for (int ch = 0; ch < 3; ++ch) {
            float top = a[ch] + (b[ch] - a[ch]) * wx;
            float bottom = c[ch] + (d[ch] - c[ch]) * wx;
            v[swap ? 2 - ch : ch] = rintf(top + (bottom - top) * wy);
        }
    }
    const float sub[3] = {sub0, sub1, sub2}, div[3] = {div0, div1, div2};
    float* out = dst + n * 3 * dst_h * dst_w;
    for (int ch = 0; ch < 3; ++ch)
        out[(size_t)ch * dst_h * dst_w + i] = (v[ch] - sub[ch]) / div[ch] * mul;
}

// One frame to HxWx3 uint8 (B, G, R order, or R, G, B with swap).
extern "C" __global__ void nv12_to_rgb(
        const unsigned char* y, const unsigned char* uv, int pitch_y, int pitch_uv, int h, int w,
        float t0, float t1, float t2, float t3, float t4, float t5, int swap, unsigned char* dst) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= h * w) return;
    const float t[6] = {t0, t1, t2, t3, t4, t5};
    float bgr[3];
    nv12_rgb(y, uv, pitch_y, pitch_uv, i / w, i % w, t, bgr);
    for (int ch = 0; ch < 3; ++ch)
        dst[(size_t)i * 3 + (swap ? 2 - ch : ch)] = (unsigned char)bgr[ch];
}
"""
_THREADS = 256


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The NV12 letterbox and conversion kernels, compiled by NVRTC once per process."""
    cupy = require_cupy()
    module = cupy.RawModule(code=_NV12_CUDA, options=("--fmad=false",))
    return module.get_function("nv12_letterbox"), module.get_function("nv12_to_rgb")


def nv12_to_rgb_cupy(frame: GpuFrame, color: str = "bgr") -> Any:
    """A GpuFrame as a CuPy HxWx3 uint8 array in `color` order (equal to `nv12_to_rgb_numpy`)."""
    cupy = require_cupy()
    out = cupy.empty((frame.height, frame.width, 3), cupy.uint8)
    i32, f32 = np.int32, np.float32
    count = frame.width * frame.height
    _kernels()[1](((count + _THREADS - 1) // _THREADS,), (_THREADS,),
                  (np.uint64(frame.y_ptr), np.uint64(frame.uv_ptr), i32(frame.y_pitch), i32(frame.uv_pitch),
                   i32(frame.height), i32(frame.width), *(f32(t) for t in frame.terms), i32(color != "bgr"), out))
    return out


def letterbox_nv12_batch(frames: Sequence[GpuFrame], spec: LetterboxSpec) -> Any:
    """Letterbox GPU NV12 frames (any sizes, any colour matrices) into one CuPy [N, 3, H, W] float32 batch with one
    kernel launch; equal to `letterbox_batch` of the frames converted by `nv12_to_rgb_numpy`. It runs on CuPy's
    current stream (the legacy default one unless set), which orders it before FFmpeg reuses a released surface."""
    cupy = require_cupy()
    in_w, in_h = spec.size
    count = len(frames)
    planes = np.empty((count, 2), np.uint64)
    ints = np.empty((count, 8), np.int32)
    floats = np.empty((count, 8), np.float32)
    for n, frame in enumerate(frames):
        _, new_w, new_h, pad_x, pad_y = letterbox_geometry(frame.width, frame.height, spec)
        planes[n] = frame.y_ptr, frame.uv_ptr
        ints[n] = frame.y_pitch, frame.uv_pitch, frame.height, frame.width, new_w, new_h, pad_x, pad_y
        floats[n] = (frame.height / new_h, frame.width / new_w, *frame.terms)
    batch = cupy.empty((count, 3, in_h, in_w), cupy.float32)
    sub, div, mul = normalize_terms(spec.normalize)
    i32, f32 = np.int32, np.float32
    _kernels()[0](((in_w * in_h + _THREADS - 1) // _THREADS, count), (_THREADS,),
                  (cupy.asarray(planes), cupy.asarray(ints), cupy.asarray(floats), batch, i32(in_h), i32(in_w),
                   i32(spec.color != "bgr"), f32(spec.pad_value), *sub, *div, mul))
    return batch


DEVICE = 0  # the GPU every decoder of a process uses
CU_CTX_SCHED_BLOCKING_SYNC = 0x4  # the scheduling flag FFmpeg asks of a primary context it shares


@functools.cache
def _share_primary_context() -> None:
    """Give the device's primary context the flags FFmpeg's CUDA decoders require of it (they refuse one that
    PyTorch or CuPy created with others), so PyTorch, CuPy and every decoder of the process share that context.
    A blocking sync suits a host that many threads share. SourceError when the CUDA driver is missing."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise SourceError(f"hwaccel nvdec: no CUDA driver ({exc})", "hwaccel") from None
    device = ctypes.c_int()
    for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(device), DEVICE)),
                       ("cuDevicePrimaryCtxSetFlags_v2", (device, CU_CTX_SCHED_BLOCKING_SYNC))):
        code = getattr(libcuda, call)(*args)
        if code != 0:
            raise SourceError(f"hwaccel nvdec: {call} failed (CUDA error {code})", "hwaccel")


class NvdecSource(AVSource):
    """A video file or network stream decoded on NVDEC by PyAV's CUDA hwaccel, in the process's primary CUDA
    context; its frames are `GpuFrame`s (NV12 in GPU memory). A stream NVDEC cannot decode fails with one line."""

    def _open_container(self) -> Any:
        _share_primary_context()
        try:
            _kernels()  # compiled while the source opens, not while its first batch waits
        except ValueError as exc:
            raise SourceError(f"hwaccel nvdec: {exc}", "hwaccel") from None
        spec = self.spec
        hwaccel = av.codec.hwaccel.HWAccel("cuda", device=str(DEVICE), allow_software_fallback=False,
                                           options={"primary_ctx": "1"}, is_hw_owned=True)
        try:
            return av.open(spec.uri, options=self._options(), timeout=(spec.open_timeout, spec.read_timeout),
                           hwaccel=hwaccel)
        except av.FFmpegError as exc:
            raise SourceError(f"source {spec.shown}: cannot open ({exc.strerror or exc})") from None

    def _select_decoder(self, stream: Any) -> Any:
        return stream.codec_context

    def _to_image(self, item: av.VideoFrame) -> GpuFrame:
        try:
            return GpuFrame.from_av(item, self.spec.color)
        except ValueError as exc:
            raise SourceError(f"source {self.spec.shown}: hwaccel nvdec: {exc}", "hwaccel") from None
