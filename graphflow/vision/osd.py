"""On-screen display: boxes, labels, track ids and trails, rule zones/lines with their counts and event flashes
drawn on a frame copy, and an H.264 mp4 writer (PyAV) to save the annotated frames."""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
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
ZONE_COLOR = (0, 255, 255)
FLASH_COLOR = (255, 0, 64)
FLASH_ALPHA = 0.35


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


def _text(pen: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: tuple[int, ...], w: int, h: int) -> None:
    """`text` on a filled box of colour `fill` with its top-left at `xy`, kept inside the frame."""
    x0, y0, x1, y1 = pen.textbbox((0, 0), text, font=_FONT)
    x = min(max(xy[0], 0), max(w - (x1 - x0) - 2, 0))
    y = min(max(xy[1], 0), max(h - (y1 - y0) - 2, 0))
    pen.rectangle((x, y, x + x1 - x0 + 2, y + y1 - y0 + 2), fill=fill)
    pen.text((x + 1 - x0, y + 1 - y0), text, fill=(0, 0, 0), font=_FONT)


def _tint(image: np.ndarray, polygon: list[tuple[float, float]], rgb: tuple[int, ...]) -> None:
    """Blend `rgb` into the pixels inside `polygon`, in place (a flashing zone)."""
    mask = Image.new("L", (image.shape[1], image.shape[0]))
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    inside = np.asarray(mask, bool)
    image[inside] = (image[inside] * (1 - FLASH_ALPHA) + np.array(rgb) * FLASH_ALPHA).astype(np.uint8)


def _draw_rule(pen: ImageDraw.ImageDraw, rule: Mapping[str, Any], flash: bool, order: slice, width: int,
               w: int, h: int) -> None:
    """One rule of data['rules']: a zone polygon with its occupancy, or a line with its A/B sides and counts."""
    if "line" in rule:
        (x1, y1), (x2, y2) = rule["line"]
        color = (FLASH_COLOR if flash else LINE_COLOR)[order]
        pen.line([(x1, y1), (x2, y2)], fill=color, width=width * 2 if flash else width)
        length = max(float(np.hypot(x2 - x1, y2 - y1)), 1e-9)
        nx, ny = (y2 - y1) / length * 12, -(x2 - x1) / length * 12  # points to side A (left of p1 -> p2 on screen)
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        _text(pen, (mx + nx - 4, my + ny - 6), "A", color, w, h)
        _text(pen, (mx - nx - 4, my - ny - 6), "B", color, w, h)
        counts = rule.get("counts")
        if counts is not None:
            text = f"{rule['id']}  A>B {counts.get('A->B', 0)}  B>A {counts.get('B->A', 0)}"
            _text(pen, (min(x1, x2) + 4, min(y1, y2) + 4), text, color, w, h)
    elif "polygon" in rule:
        pts = [tuple(p) for p in rule["polygon"]]
        color = (FLASH_COLOR if flash else ZONE_COLOR)[order]
        pen.line(pts + pts[:1], fill=color, width=width * 2 if flash else width)
        text = str(rule["id"]) + (f": {rule['inside']}" if "inside" in rule else "")
        _text(pen, pts[0], text, color, w, h)


def draw(frame: np.ndarray, objects: Sequence[dict[str, Any]] = (), lines: Sequence[Sequence[Sequence[float]]] = (),
         color: str = "bgr", normalized_lines: bool = False, width: int = 2, *,
         rules: Sequence[Mapping[str, Any]] = (), trails: Mapping[int, np.ndarray] | None = None,
         flash_tracks: Collection[int] = (), flash_rules: Collection[str] = ()) -> np.ndarray:
    """A copy of `frame` (HxWx3 uint8, channels in `color` order) with boxes, labels, trails and rules drawn on it.

    `objects` are detection or track dicts (`box`, optional `label`, `score`, `track_id`); `lines` are
    point lists in pixels, or in 0..1 frame fractions when `normalized_lines`; `rules` are the rule engine's
    data['rules'] (zones and lines in pixels, with counts); `trails` maps track ids to past points (K,2).
    Tracks in `flash_tracks` and rules in `flash_rules` are highlighted (an event just happened). Colours keyed
    by track id, else class id.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"osd draw: frame must be HxWx3 uint8 (got {frame.shape} {frame.dtype})")
    h, w = frame.shape[:2]
    order = slice(None, None, -1 if color == "bgr" else 1)
    flashing = [r for r in rules if r.get("id") in flash_rules and "polygon" in r]
    if flashing:
        frame = frame.copy()
        for rule in flashing:
            _tint(frame, [tuple(p) for p in rule["polygon"]], FLASH_COLOR[order])
    image = Image.fromarray(frame)
    pen = ImageDraw.Draw(image)
    for rule in rules:
        _draw_rule(pen, rule, rule.get("id") in flash_rules, order, width, w, h)
    for points in lines:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if normalized_lines:
            pts = pts * (w, h)
        pen.line([tuple(p) for p in pts.tolist()], fill=LINE_COLOR[order], width=width)
    for tid, points in (trails or {}).items():
        if len(points) > 1:
            pen.line([tuple(p) for p in np.asarray(points).tolist()], fill=color_for(int(tid))[order], width=width)
    for obj in objects:
        x1, y1, x2, y2 = (float(v) for v in obj["box"])
        flash = obj.get("track_id") in flash_tracks
        rgb = (FLASH_COLOR if flash else color_for(int(obj.get("track_id", obj.get("class_id", 0)))))[order]
        pen.rectangle((x1, y1, x2, y2), outline=rgb, width=width * 2 if flash else width)
        text = _label(obj)
        if text:
            tx0, ty0, tx1, ty1 = pen.textbbox((0, 0), text, font=_FONT)
            _text(pen, (x1, y1 - (ty1 - ty0) - 2), text, rgb, w, h)
    return np.array(image)


@dataclass
class Overlay:
    """What the OSD remembers of one stream between frames: recent track positions (trails) and the events
    still flashing; `render` draws a frame with them."""

    trail: int = 30
    flash: int = 10
    trails: dict[int, deque] = field(default_factory=dict)
    last_seen: dict[int, int] = field(default_factory=dict)
    flashing: dict[tuple[str, int | None], int] = field(default_factory=dict)

    def render(self, frame: np.ndarray, seq: int, objects: Sequence[dict[str, Any]] = (),
               rules: Sequence[Mapping[str, Any]] = (), events: Sequence[Mapping[str, Any]] = (),
               color: str = "bgr") -> np.ndarray:
        """`frame` annotated with boxes, trails (bottom-centre points of the last `trail` frames), rules and the
        events of the last `flash` frames highlighted."""
        for event in events:
            self.flashing[(str(event.get("rule")), event.get("track_id"))] = seq + self.flash - 1
        self.flashing = {k: until for k, until in self.flashing.items() if until >= seq}
        if self.trail:
            for obj in objects:
                if "track_id" in obj:
                    x1, _, x2, y2 = obj["box"]
                    tid = int(obj["track_id"])
                    self.trails.setdefault(tid, deque(maxlen=self.trail)).append(((x1 + x2) / 2, y2))
                    self.last_seen[tid] = seq
            for tid in [t for t, last in self.last_seen.items() if seq - last >= self.trail]:
                del self.trails[tid], self.last_seen[tid]
        return draw(frame, objects, color=color, rules=rules, trails=self.trails,
                    flash_tracks={t for _, t in self.flashing if t is not None},
                    flash_rules={r for r, _ in self.flashing})


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
