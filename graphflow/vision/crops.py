"""Second-stage inputs and outputs: objects cut out of frames into a classifier's or recogniser's input, the scores
turned back into attributes, and per-track reuse so a tracked object is not inferred on every frame.

No graphflow runtime here: the secondary engine drives it, and tests drive it directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphflow.vision.letterbox import NORMALIZE_MODES as LETTERBOX_MODES
from graphflow.vision.letterbox import normalize_terms, resize_bilinear

NORMALIZE_MODES = (*LETTERBOX_MODES, "signed")  # signed: 0..255 to -1..1, as PP-OCR's models take
RESIZE_MODES = ("stretch", "fit")
LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class CropSpec:
    """How an object becomes a model input: `size` (width, height); `padding` grows the box by that share of its
    size on each side; `resize` stretches to the size or fits the height keeping the aspect ratio (text lines),
    zero-padded on the right after normalisation; channels in `color` order and `layout`."""

    size: tuple[int, int]
    padding: float = 0.0
    resize: str = "stretch"
    normalize: str = "unit"
    color: str = "rgb"
    layout: str = "nchw"

    def __post_init__(self) -> None:
        checks = (("size", len(self.size) == 2 and min(self.size) >= 1, "[width, height], both ≥ 1"),
                  ("padding", self.padding >= 0, "≥ 0"), ("resize", self.resize in RESIZE_MODES, str(RESIZE_MODES)),
                  ("normalize", self.normalize in NORMALIZE_MODES, str(NORMALIZE_MODES)),
                  ("color", self.color in ("bgr", "rgb"), "'bgr' or 'rgb'"), ("layout", self.layout in LAYOUTS,
                                                                               str(LAYOUTS)))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"crop {name}: must be {rule} (got {getattr(self, name)!r})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """One crop's tensor shape in `layout`."""
        w, h = self.size
        return (3, h, w) if self.layout == "nchw" else (h, w, 3)


def crop_region(box: list[float], width: int, height: int, padding: float) -> tuple[int, int, int, int]:
    """Integer pixel region (x1, y1, x2, y2) of an [x1, y1, x2, y2] box grown by `padding` of its size on each side,
    clipped to a width x height frame; empty (x2 <= x1 or y2 <= y1) when the box lies outside it."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * padding, (y2 - y1) * padding
    left, top = max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy)))
    right, bottom = min(width, int(np.ceil(x2 + dx))), min(height, int(np.ceil(y2 + dy)))
    return left, top, right, bottom


def crop_tensor(image: np.ndarray, box: list[float], spec: CropSpec, image_color: str = "bgr",
                out: np.ndarray | None = None) -> np.ndarray:
    """One object of an HxWx3 uint8 frame as a float32 model input of `spec.shape` (into `out` if given)."""
    x1, y1, x2, y2 = crop_region(box, image.shape[1], image.shape[0], spec.padding)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"crop: box {list(box)} lies outside the {image.shape[1]}x{image.shape[0]} frame")
    patch = image[y1:y2, x1:x2]
    w, h = spec.size
    new_w = w if spec.resize == "stretch" else max(1, min(w, round(patch.shape[1] * h / patch.shape[0])))
    pixels = np.round(resize_bilinear(patch, new_w, h))
    if image_color != spec.color:
        pixels = pixels[:, :, ::-1]
    if spec.normalize == "signed":
        pixels = pixels / np.float32(127.5) - np.float32(1.0)
    else:
        sub, div, mul = normalize_terms(spec.normalize)
        pixels = (pixels - sub) / div * mul
    target = np.zeros((h, w, 3), np.float32)
    target[:, :new_w] = pixels
    tensor = target.transpose(2, 0, 1) if spec.layout == "nchw" else target
    if out is None:
        return np.ascontiguousarray(tensor)
    out[...] = tensor
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; rows that already are probabilities (in 0..1, summing to 1) are kept as they are."""
    if scores.size and scores.min() >= 0 and np.allclose(scores.sum(axis=-1), 1.0, atol=1e-3):
        return scores
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def classify(scores: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """A classifier's output row to the attribute {"label", "score"} of its best class."""
    probs = softmax(np.asarray(scores, np.float32).reshape(-1))
    best = int(probs.argmax())
    return {"label": labels[best] if best < len(labels) else str(best), "score": round(float(probs[best]), 4)}


@dataclass
class TrackState:
    """What reuse keeps per track: the frame and box area of its last inference, and its latest result."""

    seq: int = -1
    area: float = 0.0
    seen: int = -1
    result: dict[str, Any] | None = None


@dataclass
class Reuse:
    """Per-track reuse of second-stage results, per stream: a track is inferred again only every `interval` frames
    or when its box area grew by `grow` since its last inference (0 turns either rule off; interval 0 infers every
    frame); in between it carries its last result. Tracks unseen for `forget` frames are dropped."""

    interval: int = 0
    grow: float = 0.0
    forget: int = 100
    tracks: dict[str, dict[Any, TrackState]] = field(default_factory=dict)

    def due(self, stream: str, track_id: Any, seq: int, box: list[float]) -> bool:
        """Whether the track needs an inference on frame `seq`; when it does, that inference is recorded."""
        area = max(0.0, (box[2] - box[0]) * (box[3] - box[1]))
        state = self.tracks.setdefault(stream, {}).setdefault(track_id, TrackState())
        state.seen = seq
        infer = (self.interval == 0 or state.seq < 0 or seq - state.seq >= self.interval
                 or (self.grow > 0 and area >= state.area * self.grow))
        if infer:
            state.seq, state.area = seq, area
        return infer

    def carried(self, stream: str, track_id: Any) -> dict[str, Any] | None:
        """The track's latest result (None before its first)."""
        state = self.tracks.get(stream, {}).get(track_id)
        return state.result if state is not None else None

    def store(self, stream: str, track_id: Any, result: dict[str, Any]) -> None:
        state = self.tracks.setdefault(stream, {}).setdefault(track_id, TrackState())
        state.result = result

    def forget_old(self, stream: str, seq: int) -> None:
        """Drop the stream's tracks unseen since `forget` frames before `seq`."""
        tracks = self.tracks.get(stream, {})
        for track_id in [t for t, s in tracks.items() if seq - s.seen > self.forget]:
            del tracks[track_id]

    def end(self, stream: str) -> None:
        """Forget a stream that ended."""
        self.tracks.pop(stream, None)
