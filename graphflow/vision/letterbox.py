"""Letterbox resize and normalisation: an HxWx3 uint8 frame to a 3xHxW float32 model input.

The letterbox info dict `{"scale", "pad", "input"}` lets detections be mapped back: x = (x' - pad_x) / scale.
"""
from __future__ import annotations

import logging
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


def _resize_indices(src: int, dst: int, xp: Any = np) -> Any:
    """Fractional source coordinate of each destination pixel, with pixel centres aligned."""
    pos = (xp.arange(dst, dtype=xp.float32) + 0.5) * (src / dst) - 0.5
    return xp.clip(pos, 0, src - 1)


def resize_bilinear(image: Any, new_w: int, new_h: int, xp: Any = np) -> Any:
    """Bilinear resize of an HxWxC array to new_h x new_w x C float32, vectorised (pixel-centre aligned)."""
    h, w = image.shape[:2]
    ys, xs = _resize_indices(h, new_h, xp), _resize_indices(w, new_w, xp)
    y0 = xp.floor(ys).astype(xp.int64)
    x0 = xp.floor(xs).astype(xp.int64)
    y1 = xp.minimum(y0 + 1, h - 1)
    x1 = xp.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    row0, row1 = image[y0], image[y1]
    top = row0[:, x0].astype(xp.float32) * (1 - wx) + row0[:, x1].astype(xp.float32) * wx
    bottom = row1[:, x0].astype(xp.float32) * (1 - wx) + row1[:, x1].astype(xp.float32) * wx
    return top * (1 - wy) + bottom * wy


def _normalize(chw: Any, mode: str, xp: Any) -> Any:
    """Scale a 3xHxW float32 array in place by the normalisation mode (channels already in model order)."""
    if mode == "unit":
        chw *= 1.0 / 255.0
    elif mode == "imagenet":
        mean = xp.asarray(IMAGENET_MEAN, dtype=xp.float32)[:, None, None] * 255.0
        std = xp.asarray(IMAGENET_STD, dtype=xp.float32)[:, None, None] * 255.0
        chw -= mean
        chw /= std
    return chw


def _letterbox(image: Any, spec: LetterboxSpec, image_color: str, xp: Any, out: Any = None) -> tuple[Any, dict]:
    """Shared body of the NumPy and CuPy letterbox functions (`xp` is the array module; `out` an optional target)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"letterbox: image must be HxWx3 (got shape {tuple(image.shape)})")
    height, width = image.shape[:2]
    scale, new_w, new_h, pad_x, pad_y = letterbox_geometry(width, height, spec)
    same_size = (new_w, new_h) == (width, height)
    resized = image.astype(xp.float32) if same_size else resize_bilinear(image, new_w, new_h, xp)
    if image_color != spec.color:
        resized = resized[:, :, ::-1]
    in_w, in_h = spec.size
    if out is None:
        chw = xp.full((3, in_h, in_w), float(spec.pad_value), dtype=xp.float32)
    elif out.shape != (3, in_h, in_w) or out.dtype != xp.float32:
        raise ValueError(f"letterbox: out must be float32 {(3, in_h, in_w)} (got {out.dtype} {tuple(out.shape)})")
    else:
        chw = out
        chw.fill(float(spec.pad_value))
    chw[:, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = xp.round(resized).transpose(2, 0, 1)
    info = {"scale": float(scale), "pad": [int(pad_x), int(pad_y)], "input": [int(in_w), int(in_h)]}
    return _normalize(chw, spec.normalize, xp), info


def letterbox(image: np.ndarray, spec: LetterboxSpec, image_color: str = "bgr",
              out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Letterbox an HxWx3 uint8 frame into a 3xHxW float32 tensor (into `out` if given); returns (tensor, info)."""
    return _letterbox(np.asarray(image), spec, image_color, np, out)


def letterbox_cupy(image: Any, spec: LetterboxSpec, image_color: str = "bgr") -> tuple[Any, dict]:
    """CuPy version of `letterbox` (input and output on the GPU). Unverified: no GPU on the build machine."""
    try:
        import cupy
    except ImportError as exc:
        raise ValueError("letterbox_cupy: CuPy is not installed (pip install cupy-cuda12x)") from exc
    return _letterbox(cupy.asarray(image), spec, image_color, cupy)


def unletterbox_boxes(boxes: np.ndarray, info: dict, width: int, height: int) -> np.ndarray:
    """Map Nx4 [x1, y1, x2, y2] boxes from model-input pixels back to the original frame, clipped to it."""
    pad_x, pad_y = info["pad"]
    out = (np.asarray(boxes, dtype=np.float32) - np.array([pad_x, pad_y, pad_x, pad_y], np.float32)) / info["scale"]
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    return out
