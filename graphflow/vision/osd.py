"""On-screen display: boxes, labels, track ids and trails, rule zones/lines with their counts and event flashes
drawn on a frame copy, and an H.264 mp4 writer (PyAV) to save the annotated frames."""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from graphflow.detections import Detections

log = logging.getLogger(__name__)

PALETTE = np.array([(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (52, 69, 147),
                    (255, 178, 29), (132, 56, 255), (26, 147, 52), (203, 56, 255)], dtype=np.uint8)
_FONT = ImageFont.load_default()
LINE_COLOR = (255, 255, 0)
ZONE_COLOR = (0, 255, 255)
FLASH_COLOR = (255, 0, 64)
FLASH_ALPHA = 0.35
# mp4 muxer options of a recording that stays playable when the process is killed: fragments of about a second,
# each packet handed to the file at once
FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": "1000000",
              "flush_packets": "1"}


def color_for(key: int) -> tuple[int, int, int]:
    """A stable RGB colour for a class or track id."""
    return tuple(int(c) for c in PALETTE[key % len(PALETTE)])


def _label(label: str | None, class_id: int, track_id: int, score: float) -> str:
    """An object's tag: `#track label score`, each part only when the object has it (the class id for no label)."""
    text = str(label if label is not None else class_id if class_id >= 0 else "")
    if track_id >= 0:
        text = f"#{track_id} {text}"
    if not math.isnan(score):
        text = f"{text} {score:.2f}"
    return text


Rect = tuple[float, float, float, float]


def ink_for(fill: tuple[int, ...]) -> tuple[int, int, int]:
    """Black text on a light tag, white on a dark one; the weights are symmetric, so RGB and BGR agree."""
    return (0, 0, 0) if 0.2 * fill[0] + 0.6 * fill[1] + 0.2 * fill[2] > 100 else (255, 255, 255)


def overlaps(a: Rect, b: Rect) -> bool:
    """Whether two (x0, y0, x1, y1) rectangles share more than an edge."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@dataclass
class Label:
    """A text tag placed on the frame: its rectangle, colour and, when placement moved it away from what it names,
    the point a thin leader line joins it to."""

    text: str
    rect: Rect
    fill: tuple[int, ...]
    leader: tuple[float, float] | None = None


class LabelLayout:
    """Greedy label placement for one frame. Each label has candidate spots in order of preference; it takes the
    spot, slid down or up past labels placed before it, that moves it least, so no two labels overlap while the
    frame has room (when it has none, the first spot is used as is). Place the labels that matter most first."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.labels: list[Label] = []

    @staticmethod
    def size(text: str) -> tuple[int, int]:
        """Width and height of `text`'s tag: the text's ink plus a pixel of margin on each side."""
        x0, y0, x1, y1 = _FONT.getbbox(text)
        return x1 - x0 + 2, y1 - y0 + 2

    def _inside(self, x: float, y: float, w: int, h: int) -> tuple[float, float]:
        return min(max(x, 0), max(self.width - w, 0)), min(max(y, 0), max(self.height - h, 0))

    def fits(self, rect: Rect) -> bool:
        """Whether `rect` lies in the frame and overlaps no placed label."""
        return (rect[0] >= 0 and rect[1] >= 0 and rect[2] <= self.width and rect[3] <= self.height
                and not any(overlaps(rect, label.rect) for label in self.labels))

    def place_together(self, options: Sequence[Sequence[tuple[str, tuple[float, float]]]],
                       fill: tuple[int, ...]) -> None:
        """Place a group of tags (a line's A and B) at the first option where every one fits where asked; when no
        option does, each tag of the first goes where `place` puts it."""
        for option in options:
            rects = [(x, y, x + w, y + h) for text, (x, y) in option for w, h in [self.size(text)]]
            if all(self.fits(r) for r in rects) and not any(overlaps(a, b) for a in rects for b in rects if a is not b):
                self.labels += [Label(text, rect, fill) for (text, _), rect in zip(option, rects)]
                return
        for text, spot in options[0]:
            self.place(text, [spot], fill)

    def _slide(self, x: float, y: float, w: int, h: int, down: bool) -> float | None:
        """The nearest y from `y`, going down or up, where a w×h tag at x overlaps no placed label; None if none."""
        while 0 <= y <= self.height - h:
            hits = [r for r in (lab.rect for lab in self.labels) if overlaps((x, y, x + w, y + h), r)]
            if not hits:
                return y
            y = max(r[3] for r in hits) if down else min(r[1] for r in hits) - h
        return None

    def place(self, text: str, spots: Sequence[tuple[float, float]], fill: tuple[int, ...],
              anchor: tuple[float, float] | None = None) -> Label:
        """Place `text` at the best of `spots` (top-left corners, preferred first); `anchor` is the point it names,
        joined by a leader line when the tag had to move more than its own height from its spot."""
        w, h = self.size(text)
        best: tuple[float, int, float, float] | None = None  # (distance moved, spot rank, x, y)
        for rank, spot in enumerate(spots):
            x, y0 = self._inside(*spot, w, h)
            for down in (True, False):
                y = self._slide(x, y0, w, h, down)
                if y is not None and (best is None or (abs(y - y0), rank) < best[:2]):
                    best = (abs(y - y0), rank, x, y)
        if best is None:  # no room anywhere in reach: the first spot, overlapping
            moved, (x, y) = 0.0, self._inside(*spots[0], w, h)
        else:
            moved, _, x, y = best
        label = Label(text, (x, y, x + w, y + h), fill, anchor if anchor is not None and moved > h else None)
        self.labels.append(label)
        return label

    def draw(self, pen: ImageDraw.ImageDraw) -> None:
        """Draw every placed label (after the shapes, so none is cut by a box or line), leaders first."""
        for label in self.labels:
            if label.leader is not None:
                x0, y0, x1, y1 = label.rect
                near = (min(max(label.leader[0], x0), x1), y1 if label.leader[1] > y1 else y0)
                pen.line([near, label.leader], fill=label.fill, width=1)
        for label in self.labels:
            x0, y0, x1, y1 = label.rect
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=label.fill)
            bx, by, _, _ = _FONT.getbbox(label.text)
            pen.text((x0 + 1 - bx, y0 + 1 - by), label.text, fill=ink_for(label.fill), font=_FONT)


def _tint(image: np.ndarray, polygon: list[tuple[float, float]], rgb: tuple[int, ...]) -> None:
    """Blend `rgb` into the pixels inside `polygon`, in place (a flashing zone)."""
    mask = Image.new("L", (image.shape[1], image.shape[0]))
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    inside = np.asarray(mask, bool)
    image[inside] = (image[inside] * (1 - FLASH_ALPHA) + np.array(rgb) * FLASH_ALPHA).astype(np.uint8)


SIDE_SPOTS = (0.5, 0.35, 0.65, 0.2, 0.8, 0.1, 0.9)  # where along a line its A/B tags may sit, preferred first


def _draw_rule(pen: ImageDraw.ImageDraw, layout: LabelLayout, rule: Mapping[str, Any], flash: bool, order: slice,
               width: int) -> list[tuple[list[list[tuple[str, tuple[float, float]]]], tuple[int, ...]]]:
    """One rule of data['rules']: a zone polygon with its occupancy, or a line with its counts, captions placed in
    `layout` now; returns the line's A/B side tags (options, colour), placed after the box labels as they can move
    along the line."""
    if "line" in rule:
        (x1, y1), (x2, y2) = rule["line"]
        color = (FLASH_COLOR if flash else LINE_COLOR)[order]
        pen.line([(x1, y1), (x2, y2)], fill=color, width=width * 2 if flash else width)
        length = max(float(np.hypot(x2 - x1, y2 - y1)), 1e-9)
        nx, ny = (y2 - y1) / length * 12, -(x2 - x1) / length * 12  # points to side A (left of p1 -> p2 on screen)
        counts = rule.get("counts")
        if counts is not None:
            text = f"{rule['id']}  A>B {counts.get('A->B', 0)}  B>A {counts.get('B->A', 0)}"
            w, h = layout.size(text)
            top, bottom = sorted([(x1, y1), (x2, y2)], key=lambda p: p[1])
            layout.place(text, [(min(x1, x2) + 4, min(y1, y2) + 4), (top[0] - w - 4, top[1] + 4),
                                (bottom[0] + 4, bottom[1] - h - 4), (bottom[0] - w - 4, bottom[1] - h - 4)], color)
        options = [[(side, (x1 + (x2 - x1) * t + sign * nx - 4, y1 + (y2 - y1) * t + sign * ny - 6))
                    for side, sign in (("A", 1), ("B", -1))] for t in SIDE_SPOTS]
        return [(options, color)]
    if "polygon" in rule:
        pts = [tuple(p) for p in rule["polygon"]]
        color = (FLASH_COLOR if flash else ZONE_COLOR)[order]
        pen.line(pts + pts[:1], fill=color, width=width * 2 if flash else width)
        text = str(rule["id"]) + (f": {rule['inside']}" if "inside" in rule else "")
        layout.place(text, pts, color)
    return []


def draw(frame: np.ndarray, objects: Detections | Sequence[Mapping[str, Any]] = (),
         lines: Sequence[Sequence[Sequence[float]]] = (), color: str = "bgr", normalized_lines: bool = False,
         width: int = 2, *, rules: Sequence[Mapping[str, Any]] = (), trails: Mapping[int, np.ndarray] | None = None,
         flash_tracks: Collection[int] = (), flash_rules: Collection[str] = (),
         layout: LabelLayout | None = None) -> np.ndarray:
    """A copy of `frame` (HxWx3 uint8, channels in `color` order) with boxes, labels, trails and rules drawn on it.

    `objects` are detections or tracks (Detections, or dicts with `box`, optional `label`, `score`, `track_id`);
    `lines` are point lists in pixels, or in 0..1 frame fractions when `normalized_lines`; `rules` are the rule engine's
    data['rules'] (zones and lines in pixels, with counts); `trails` maps track ids to past points (K,2).
    Tracks in `flash_tracks` and rules in `flash_rules` are highlighted (an event just happened). Colours keyed
    by track id, else class id. Texts are placed by a LabelLayout so none covers another: rule captions first (they
    hold the counts), then box labels, then the A/B tags of lines (which can move along their line); pass `layout`
    to see where they went.
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
    layout = layout if layout is not None else LabelLayout(w, h)
    sides = [tags for rule in rules for tags in _draw_rule(pen, layout, rule, rule.get("id") in flash_rules, order,
                                                           width)]
    for points in lines:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if normalized_lines:
            pts = pts * (w, h)
        pen.line([tuple(p) for p in pts.tolist()], fill=LINE_COLOR[order], width=width)
    for tid, points in (trails or {}).items():
        if len(points) > 1:
            pen.line([tuple(p) for p in np.asarray(points).tolist()], fill=color_for(int(tid))[order], width=width)
    objects = Detections.of(objects)
    for (x1, y1, x2, y2), label, class_id, track_id, score in zip(
            objects.rounded_boxes().tolist(), objects.labels.tolist(), objects.class_ids.tolist(),
            objects.track_ids.tolist(), objects.rounded_scores().tolist()):
        flash = track_id >= 0 and track_id in flash_tracks
        rgb = (FLASH_COLOR if flash else color_for(track_id if track_id >= 0 else max(class_id, 0)))[order]
        pen.rectangle((x1, y1, x2, y2), outline=rgb, width=width * 2 if flash else width)
        text = _label(label, class_id, track_id, score)
        if text:
            tw, th = layout.size(text)  # above the box, else inside its top, else below it
            layout.place(text, [(x1, y1 - th), (x1, y1), (x1, y2), (x2 - tw, y1 - th)], rgb, anchor=(x1, y1))
    for options, rgb in sides:
        layout.place_together(options, rgb)
    layout.draw(pen)
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

    def render(self, frame: np.ndarray, seq: int, objects: Detections | Sequence[Mapping[str, Any]] = (),
               rules: Sequence[Mapping[str, Any]] = (), events: Sequence[Mapping[str, Any]] = (),
               color: str = "bgr") -> np.ndarray:
        """`frame` annotated with boxes, trails (bottom-centre points of the last `trail` frames), rules and the
        events of the last `flash` frames highlighted. A trail is drawn with its track's box only: once a track is
        not in the frame (ended, or not reported), its trail leaves the screen; its points are kept `trail` frames,
        so a track that comes back goes on with its trail."""
        for event in events:
            self.flashing[(str(event.get("rule")), event.get("track_id"))] = seq + self.flash - 1
        self.flashing = {k: until for k, until in self.flashing.items() if until >= seq}
        objects = Detections.of(objects)
        if self.trail:
            tracked = objects.track_ids >= 0
            for tid, (x1, _, x2, y2) in zip(objects.track_ids[tracked].tolist(),
                                            objects.rounded_boxes()[tracked].tolist()):
                self.trails.setdefault(tid, deque(maxlen=self.trail)).append(((x1 + x2) / 2, y2))
                self.last_seen[tid] = seq
            for tid in [t for t, last in self.last_seen.items() if seq - last >= self.trail]:
                del self.trails[tid], self.last_seen[tid]
        shown = {tid: points for tid, points in self.trails.items() if self.last_seen[tid] == seq}
        return draw(frame, objects, color=color, rules=rules, trails=shown,
                    flash_tracks={t for _, t in self.flashing if t is not None},
                    flash_rules={r for r, _ in self.flashing})


class VideoWriter:
    """Writes BGR frames to an H.264 mp4 (PyAV/libx264, yuv420p, index first so a cut file still plays)."""

    def __init__(self) -> None:
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def open(self, path: str | Path, fps: float, size: tuple[int, int], crf: int = 23,
             preset: str = "veryfast", fragmented: bool = False) -> None:
        """Create `path` for frames of `size` = (width, height) at `fps`; even sizes are required by yuv420p.
        `fragmented`: fragmented MP4 written through at once by an encoder without look-ahead, so a process killed
        midway leaves a file that plays up to about its last second (recordings)."""
        width, height = size
        if width % 2 or height % 2 or width < 2 or height < 2:
            raise ValueError(f"video writer {path}: size must be even and positive for H.264 (got {width}x{height})")
        try:
            self._container = av.open(str(path), mode="w", options=FRAGMENTED if fragmented else {"movflags": "faststart"})
        except (OSError, av.FFmpegError) as exc:
            raise ValueError(f"video writer {path}: cannot create file ({exc})") from None
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": preset, **({"tune": "zerolatency"} if fragmented else {})}
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
