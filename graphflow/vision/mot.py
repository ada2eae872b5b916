"""MOTChallenge text files: `frame,id,x,y,w,h,conf,...` rows read into arrays, and tracks written back.

Frames are 1-based; boxes are top-left x, y, width and height in pixels in the file and x1, y1, x2, y2 here.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphflow.detections import Detections

log = logging.getLogger(__name__)

FIELDS = ("frame", "id", "x", "y", "w", "h", "conf")
_SPLIT = re.compile(r"\s*,\s*|\s+")


class MotFormatError(ValueError):
    """A MOTChallenge file cannot be read; the message is one line `path:line: what is wrong`."""


@dataclass
class MotTable:
    """Rows of a MOTChallenge file as parallel arrays sorted by frame: frames, ids, xyxy boxes, confidences."""

    frames: np.ndarray
    ids: np.ndarray
    boxes: np.ndarray
    conf: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def last_frame(self) -> int:
        """The highest frame number (0 for an empty file)."""
        return int(self.frames[-1]) if len(self.frames) else 0

    def select(self, rows: np.ndarray) -> MotTable:
        """The rows picked by a boolean mask or index array, still sorted by frame."""
        return MotTable(self.frames[rows], self.ids[rows], self.boxes[rows], self.conf[rows])

    def per_frame(self, last: int | None = None) -> Iterator[tuple[int, slice]]:
        """(frame, row slice) for every frame from 1 to `last` (default: the last one in the file), empty ones included."""
        last = self.last_frame if last is None else last
        bounds = np.searchsorted(self.frames, np.arange(1, last + 2)).tolist()
        for frame in range(1, last + 1):
            yield frame, slice(bounds[frame - 1], bounds[frame])


def parse_mot(text: str, source: str = "<text>", min_conf: float = -math.inf) -> MotTable:
    """A MotTable from MOTChallenge text (comma- or space-separated); rows with conf < min_conf are skipped.

    Raises MotFormatError naming `source` and the line number on the first malformed row.
    """
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = _SPLIT.split(line)
        if len(parts) < len(FIELDS):
            raise MotFormatError(f"{source}:{lineno}: expected at least {len(FIELDS)} fields "
                                 f"({','.join(FIELDS)}), got {len(parts)}: {line[:60]!r}")
        values = []
        for name, part in zip(FIELDS, parts):
            try:
                values.append(float(part))
            except ValueError:
                raise MotFormatError(f"{source}:{lineno}: field {name} is not a number ({part!r})") from None
        frame, _, _, _, w, h, _ = values
        if frame < 1 or frame != int(frame):
            raise MotFormatError(f"{source}:{lineno}: frame must be an integer ≥ 1 (got {parts[0]!r})")
        if not (math.isfinite(w) and math.isfinite(h) and w >= 0 and h >= 0) or not all(map(math.isfinite, values[2:4])):
            raise MotFormatError(f"{source}:{lineno}: box must be finite with w, h ≥ 0 (got {','.join(parts[2:6])})")
        rows.append(values)
    arr = np.array(rows, np.float64).reshape(-1, len(FIELDS))
    arr = arr[arr[:, 6] >= min_conf]
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    boxes = arr[:, 2:6].copy()
    boxes[:, 2:] += boxes[:, :2]
    return MotTable(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), boxes, arr[:, 6].copy())


def read_mot(path: str | Path, min_conf: float = -math.inf) -> MotTable:
    """Parse the MOTChallenge file at `path`; MotFormatError (one line) if it is missing or malformed."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise MotFormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MotFormatError(f"{path}: cannot read ({exc})") from None
    return parse_mot(text, str(path), min_conf)


def mot_lines(frame: int, ids: np.ndarray, boxes: np.ndarray, conf: np.ndarray) -> str:
    """MOTChallenge result rows `frame,id,x,y,w,h,conf,-1,-1,-1` (one per track) for xyxy `boxes`."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return "".join(f"{frame},{int(i)},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{float(c):.4g},-1,-1,-1\n"
                   for i, (x1, y1, x2, y2), c in zip(np.asarray(ids).tolist(), boxes.tolist(), np.asarray(conf).tolist()))


def track_lines(frame: int, tracks: Detections) -> str:
    """MOTChallenge result rows of one frame's tracks (an object without a score gets conf 1)."""
    scores = tracks.rounded_scores()
    return mot_lines(frame, tracks.track_ids, tracks.rounded_boxes(), np.where(np.isnan(scores), 1.0, scores))


def write_mot(path: str | Path, table: MotTable) -> None:
    """Write a MotTable as a MOTChallenge results file."""
    with open(path, "w") as f:
        for frame, rows in table.per_frame():
            f.write(mot_lines(frame, table.ids[rows], table.boxes[rows], table.conf[rows]))
