"""`detfile`: replays MOTChallenge detection files as per-frame detections, so trackers run without video."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphflow import Detections, Engine, Message, Param, ParamError
from graphflow.detections import BOX_DECIMALS
from graphflow.vision.mot import MotFormatError, MotTable, read_mot

log = logging.getLogger(__name__)

SOURCE_KEYS = ("id", "path", "fps", "width", "height")
LABEL, CLASS_ID = "person", 0


@dataclass
class _Sequence:
    """One detection file: its stream id, rows, frame rate and (optional) frame size."""

    stream: str
    table: MotTable
    fps: float
    size: dict[str, int]


def detections(table: MotTable, rows: slice) -> Detections:
    """The data-contract detections of one frame's rows (label "person", class 0)."""
    n = rows.stop - rows.start
    return Detections(np.round(table.boxes[rows], BOX_DECIMALS), table.conf[rows], np.full(n, CLASS_ID, np.int32),
                      [LABEL] * n)


class DetFile(Engine):
    """MOTChallenge detection files (`frame,id,x,y,w,h,conf,...`) as one message per frame, one stream per file.

    Every frame from 1 to the file's last is sent (seq = frame - 1), with no detections where the file has none.
    """

    inputs = ()
    outputs = ("out",)
    path_fields = {"path": "read", "sources[].path": "read"}  # relative to the graph file
    sources = Param(list, [], doc='list of {"id", "path", "fps", "width", "height"} (id defaults to the index)')
    path = Param(str, "", doc="one detection file (stream id '0'), instead of sources")
    min_conf = Param(float, -math.inf, doc="rows with a lower conf are skipped")
    fps = Param(float, 30.0, ge=0.001, doc="frame rate for pts, unless a source gives its own")

    @classmethod
    def declared_classes(cls, params: dict[str, Any]) -> dict[int, str]:
        """The one class its detections carry, for checks of engines downstream."""
        return {CLASS_ID: LABEL}

    def check(self) -> None:
        if bool(self.sources) == bool(self.path):
            raise ParamError("sources", "give either sources or path (exactly one)")
        entries = self.sources or [{"id": "0", "path": self.path}]
        where = "sources[{}]" if self.sources else "path"
        self._sequences: list[_Sequence] = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            seq = self._sequence(where.format(i), i, entry)
            if seq.stream in seen:
                raise ParamError(f"{where.format(i)}.id", f"duplicate stream id {seq.stream!r}")
            seen.add(seq.stream)
            self._sequences.append(seq)

    def _sequence(self, where: str, index: int, entry: Any) -> _Sequence:
        """Read and check one `sources[i]` entry; ParamError names the entry field (and file line)."""
        if not isinstance(entry, dict):
            raise ParamError(where, f"must be an object with a 'path' (got {entry!r})")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ParamError(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(SOURCE_KEYS)})")
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise ParamError(f"{where}.path" if self.sources else where, f"required, a MOTChallenge file (got {path!r})")
        for key in ("fps", "width", "height"):
            value = entry.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ParamError(f"{where}.{key}", f"must be a number > 0 (got {value!r})")
        stream = entry.get("id", index)
        if isinstance(stream, bool) or not isinstance(stream, (str, int)) or stream == "":
            raise ParamError(f"{where}.id", f"must be a non-empty string or an integer (got {stream!r})")
        try:
            table = read_mot(path, self.min_conf)
        except MotFormatError as exc:
            raise ParamError(f"{where}.path" if self.sources else where, str(exc)) from None
        size = {k: int(entry[k]) for k in ("width", "height") if k in entry}
        return _Sequence(str(stream), table, float(entry.get("fps", self.fps)), size)

    def generate(self) -> Iterator[Message | None]:
        if not hasattr(self, "_sequences"):
            self.check()
        active = [(seq, seq.table.per_frame()) for seq in self._sequences]
        while active and not self.stopping.is_set():
            for pair in list(active):
                seq, frames = pair
                step = next(frames, None)
                if step is None:
                    active.remove(pair)
                    continue
                frame, rows = step
                yield Message(stream=seq.stream, seq=frame - 1, pts=(frame - 1) / seq.fps,
                              data={"detections": detections(seq.table, rows), **seq.size})

    def metrics(self) -> dict[str, Any]:
        return {"rows": sum(len(s.table) for s in self._sequences)}
