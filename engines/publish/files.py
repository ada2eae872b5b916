"""Text file sinks: `jsonl` (JSON lines, one file for all streams; the `sink` engine is its preset) and `mot`
(MOTChallenge results, one file per stream)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any

from graphflow.engines.publish.base import (
    WHAT,
    at,
    check_folder,
    dump,
    message_record,
    record_count,
    records,
    stream_path,
)
from graphflow.engines.publish.segments import FileSink, PerStreamSink

from graphflow import Detections, Engine, Message, Param, ParamError
from graphflow.vision.mot import track_lines


class JsonlSink(FileSink):
    """One JSON line per message (stream, seq, pts, data, times) or per event, to a file or stdout. Each record is
    written whole; a write that fails (disk full) is cut back to the last whole line, so no line is ever torn."""

    kind = "jsonl"
    path = Param(str, doc="output file ('-' = stdout), one for all streams")
    what = Param(str, "frames", choices=WHAT, doc="'frames': one line per message; 'events': one line per event")
    arrays = Param(bool, False, doc="with 'frames': the shapes and dtypes of the message's arrays in each line")
    times = Param(bool, True, doc="with 'frames': the per-engine wall-clock timestamps in each line")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        if spec["path"] != "-":
            check_folder(at(field, "path"), Path(spec["path"]).parent)

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.fd: int | None = None
        self.size = 0  # bytes of whole lines in the current file
        if self.path != "-":
            self.segs = self.segments(self.path)
            try:
                self.open()
            except OSError as exc:
                raise ParamError(self.field("path"), f"cannot open {self.path!r} ({exc.strerror})") from None

    def open(self) -> None:
        self.fd = os.open(self.segs.begin(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        self.size = 0

    def units(self, msg: Message) -> int:
        return record_count(msg, self.what)

    def lines(self, msg: Message) -> list[str]:
        if self.what == "frames":
            return [dump(message_record(msg, self.arrays, self.times)) + "\n"]
        return [dump(r) + "\n" for r in records(msg, self.what)]

    def write(self, msg: Message) -> None:
        lines = self.lines(msg)
        if not lines:
            return
        if self.fd is None:
            sys.stdout.write("".join(lines))
        else:
            data = "".join(lines).encode()
            rest = memoryview(data)
            try:
                while rest:
                    rest = rest[os.write(self.fd, rest):]
            except OSError:
                os.ftruncate(self.fd, self.size)  # back to the last whole line
                raise
            self.size += len(data)
        self.written += len(lines)
        if self.fd is not None and self.segs.due(self.size):
            os.close(self.fd)
            self.fd = None
            self.open()

    def close(self) -> None:
        if self.path == "-":
            sys.stdout.flush()
        elif self.fd is not None:
            os.close(self.fd)
            self.fd = None


class MotSink(PerStreamSink):
    """MOTChallenge results per stream from data['tracks']: `frame,id,x,y,w,h,conf,-1,-1,-1` with frame = seq + 1.
    Messages that are not frames (no image, detections or tracks) are skipped."""

    kind = "mot"
    path = Param(str, doc="result file per stream: `{stream}` is replaced by the stream id, else name.<stream>.txt")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        check_folder(at(field, "path"), Path(spec["path"]).parent)

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.files: dict[str, tuple[IO[str], Any]] = {}  # stream → (open file, its Segments)

    def units(self, msg: Message) -> int:
        return int("tracks" in msg.data)

    def held(self) -> set[str]:
        return set(self.files)

    def write(self, msg: Message) -> None:
        tracks = msg.data.get("tracks")
        if tracks is None:
            if msg.image is None and "detections" not in msg.data:
                return  # not a frame: a total, a user's event
            raise ValueError(f"message {msg.stream}#{msg.seq} has no data['tracks'] (put track before publish)")
        lines = track_lines(msg.seq + 1, Detections.of(tracks, "data['tracks']")) if tracks else ""
        self.per_stream(msg, lambda: self.write_lines(msg.stream, lines))

    def write_lines(self, stream: str, lines: str) -> None:
        if stream not in self.files:
            segs = self.segments(stream_path(self.path, stream))
            self.files[stream] = (open(segs.begin(), "w"), segs)
        file, segs = self.files[stream]
        file.write(lines)
        self.written += 1
        if segs.due(file.tell()):
            file.close()
            self.files[stream] = (open(segs.begin(), "w"), segs)

    def end(self, stream: str) -> None:
        file, _ = self.files.pop(stream, (None, None))
        if file is not None:
            file.close()

    def flush(self) -> None:
        for stream, (file, _) in list(self.files.items()):
            try:
                file.flush()
            except OSError as exc:
                self.stream_failed(stream, exc)

    def close(self) -> None:
        for stream in list(self.files):
            self.end(stream)
