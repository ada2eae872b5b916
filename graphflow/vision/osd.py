"""On-screen display: boxes, labels, track ids and zone/line polylines drawn on a frame copy, and an
H.264 mp4 writer (PyAV) to save the annotated frames."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

PALETTE = np.array([(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (52, 69, 147),
                    (255, 178, 29), (132, 56, 255), (26, 147, 52), (203, 56, 255)], dtype=np.uint8)
_FONT = ImageFont.load_default()
LINE_COLOR = (255, 255, 0)


def color_for(key: int) -> tuple[int, int, int]:
    """A stable RGB colour for a class or track id."""
    return tuple(int(c) for c in PALETTE[key % len(PALETTE)])


def _label(obj: dict[str, Any]) -> str:
    text = str(obj.get("label", obj.get("class_id", "")))
    if "track_id" in obj:
        text = f"#{obj['track_id']} {text}"
    if "score" in obj:
        text = f"{text} {obj['score']:.2f}"
    return text


def draw(frame: np.ndarray, objects: Sequence[dict[str, Any]] = (), lines: Sequence[Sequence[Sequence[float]]] = (),
         color: str = "bgr", normalized_lines: bool = False, width: int = 2) -> np.ndarray:
    """A copy of `frame` (HxWx3 uint8, channels in `color` order) with boxes, labels and polylines drawn on it.

    `objects` are detection or track dicts (`box`, optional `label`, `score`, `track_id`); `lines` are
    point lists in pixels, or in 0..1 frame fractions when `normalized_lines`. Colours keyed by track id,
    else class id.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"osd draw: frame must be HxWx3 uint8 (got {frame.shape} {frame.dtype})")
    h, w = frame.shape[:2]
    order = slice(None, None, -1 if color == "bgr" else 1)
    image = Image.fromarray(frame)
    pen = ImageDraw.Draw(image)
    for points in lines:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if normalized_lines:
            pts = pts * (w, h)
        pen.line([tuple(p) for p in pts.tolist()], fill=LINE_COLOR[order], width=width)
    for obj in objects:
        x1, y1, x2, y2 = (float(v) for v in obj["box"])
        rgb = color_for(int(obj.get("track_id", obj.get("class_id", 0))))[order]
        pen.rectangle((x1, y1, x2, y2), outline=rgb, width=width)
        text = _label(obj)
        if text:
            tx0, ty0, tx1, ty1 = pen.textbbox((x1, y1), text, font=_FONT)
            top = max(y1 - (ty1 - ty0) - 2, 0)
            pen.rectangle((x1, top, x1 + tx1 - tx0 + 2, top + ty1 - ty0 + 2), fill=rgb)
            pen.text((x1 + 1, top + 1 - (ty0 - y1)), text, fill=(0, 0, 0), font=_FONT)
    return np.array(image)


class VideoWriter:
    """Writes BGR frames to an H.264 mp4 (PyAV/libx264, yuv420p, index first so a cut file still plays)."""

    def __init__(self) -> None:
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def open(self, path: str | Path, fps: float, size: tuple[int, int], crf: int = 23,
             preset: str = "veryfast") -> None:
        """Create `path` for frames of `size` = (width, height) at `fps`; even sizes are required by yuv420p."""
        width, height = size
        if width % 2 or height % 2 or width < 2 or height < 2:
            raise ValueError(f"video writer {path}: size must be even and positive for H.264 (got {width}x{height})")
        try:
            self._container = av.open(str(path), mode="w", options={"movflags": "faststart"})
        except (OSError, av.FFmpegError) as exc:
            raise ValueError(f"video writer {path}: cannot create file ({exc})") from None
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": preset}
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Encode one HxWx3 uint8 BGR frame of the size given to `open`."""
        if self._stream is None:
            raise RuntimeError("video writer: write() before open()")
        expected = (self._stream.height, self._stream.width, 3)
        if frame.shape != expected:
            raise ValueError(f"video writer: frame shape {frame.shape} differs from the opened size {expected}")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
        video_frame.pts = self.frames
        self._container.mux(self._stream.encode(video_frame))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file; safe to call twice."""
        if self._container is None:
            return
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
            self._container = self._stream = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
