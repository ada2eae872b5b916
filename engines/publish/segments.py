"""What file sinks share: the files one output path gets over time, and per-stream files that fail alone.

The current file is always at the sink's path (the stream's path for per-stream sinks). When it rotates (`rotate_mb`,
`rotate_s`, a video's frame size change, a stream that ended and comes back) or a run finds a file of a previous run
there, that file is kept beside it as an earlier segment, `<name>@<UTC time it ended><suffix>`
(`events@20261207T152600123Z.jsonl`), unless `overwrite` replaces a previous run's file. Retention (`keep_files`,
`keep_mb`, `keep_days`) deletes the oldest earlier segments each time a file starts. `@` never occurs in a stream's
safe name, so one stream's segments are never taken for another stream's files."""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphflow.engines.publish.base import Output, reason, shown

from graphflow import Engine, Message, Param

MB = 2**20
DAY = 86400.0


class FileSink(Output):
    """Base of the sinks that write files: rotation, retention, and what becomes of a previous run's file."""

    rotate_mb = Param(float, 0.0, ge=0, doc="start a new file once the current one reaches this many MiB (0 = never)")
    rotate_s = Param(float, 0.0, ge=0, doc="start a new file after this many seconds (0 = never)")
    keep_files = Param(int, 0, ge=0, doc="earlier files kept at most, the oldest deleted first (0 = no bound)")
    keep_mb = Param(float, 0.0, ge=0, doc="MiB of earlier files kept at most, the oldest deleted first (0 = no bound)")
    keep_days = Param(float, 0.0, ge=0, doc="earlier files older than this many days are deleted (0 = kept)")
    overwrite = Param(bool, False, doc="replace a previous run's file instead of keeping it as an earlier file")

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.since = time.time()  # a file last written before this is a previous run's

    def segments(self, path: str | Path) -> Segments:
        return Segments(Path(path), self)


class Segments:
    """The files of one output path: `begin()` before each new current file, `due(size)` after each write."""

    def __init__(self, path: Path, sink: FileSink) -> None:
        self.path, self.sink = path, sink
        self.started = 0.0  # monotonic time the current file began
        stem, suffix = path.stem, path.suffix
        self.pattern = re.compile(rf"{re.escape(stem)}@\d{{8}}T\d{{9}}Z(-\d+)?{re.escape(suffix)}")

    def begin(self) -> Path:
        """Make way for a new current file: its folder made, the file there kept as an earlier segment (replaced
        with `overwrite` if a previous run left it), the oldest earlier ones deleted per retention; returns the
        path to create."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            modified = self.path.stat().st_mtime
            previous = modified < self.sink.since  # not this run's (a stream that ended and came back is)
            if previous and self.sink.overwrite:
                self.path.unlink()
            else:
                kept = self.path.rename(self.stamped(modified))
                if previous:
                    self.sink.owner.log.info("%s: kept the previous run's %s as %s", self.sink.name, self.path.name,
                                             kept.name)
        self.prune()
        self.started = time.monotonic()
        return self.path

    def due(self, size: int) -> bool:
        """Whether the current file, `size` bytes now, should end and a new one begin."""
        sink = self.sink
        return (sink.rotate_mb > 0 and size >= sink.rotate_mb * MB) or (
            sink.rotate_s > 0 and time.monotonic() - self.started >= sink.rotate_s)

    def stamped(self, when: float) -> Path:
        """A free name for an earlier segment that ended at `when` (seconds since the epoch)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f"{int(when * 1000) % 1000:03d}Z"
        for n in range(1000):
            candidate = self.path.with_name(f"{self.path.stem}@{stamp}{f'-{n}' if n else ''}{self.path.suffix}")
            if not candidate.exists():
                return candidate
        raise FileExistsError(f"no free segment name for {self.path} at {stamp}")

    def earlier(self) -> list[tuple[float, int, Path]]:
        """The earlier segments as (modified, bytes, path), oldest first."""
        found = []
        for p in self.path.parent.iterdir():
            if self.pattern.fullmatch(p.name) and p.is_file():
                st = p.stat()
                found.append((st.st_mtime, st.st_size, p))
        return sorted(found)

    def prune(self) -> None:
        """Delete the oldest earlier segments beyond `keep_files`, `keep_mb` or `keep_days`."""
        sink = self.sink
        if not (sink.keep_files or sink.keep_mb or sink.keep_days):
            return
        segments = self.earlier()
        total = sum(size for _, size, _ in segments)
        now = time.time()
        for i, (modified, size, path) in enumerate(segments):
            left = len(segments) - i
            if not ((sink.keep_files and left > sink.keep_files) or (sink.keep_mb and total > sink.keep_mb * MB)
                    or (sink.keep_days and now - modified > sink.keep_days * DAY)):
                break
            path.unlink(missing_ok=True)
            total -= size


class PerStreamSink(FileSink):
    """Base of file sinks with one file per stream, each its own: a failure of one stream's file (its name, a frame
    size, a full disk) stops that stream only, with one error line; its messages are counted as lost until the
    stream ends, and a stream that comes back later tries again. The other streams go on."""

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.failed: dict[str, str] = {}  # stream → why its file stopped, until the stream ends
        self.last_failure: str | None = None

    def per_stream(self, msg: Message, work: Callable[[], None]) -> None:
        """Run `work`, which writes `msg` to its stream's file; a failure there is that stream's alone."""
        if msg.stream in self.failed:
            self.lost += self.units(msg)
            return
        try:
            work()
        except Exception as exc:
            self.lost += self.units(msg)
            self.stream_failed(msg.stream, exc)

    def stream_failed(self, stream: str, exc: BaseException) -> None:
        """Stop `stream`'s file: one error line, its file released; its next messages are counted as lost."""
        why = self.failed[stream] = reason(exc)
        self.last_failure = f"stream {shown(stream)}: {why}"
        self.owner.log.error("%s: stream %s failed: %s; its messages are counted as lost until it ends",
                             self.name, shown(stream), why)
        self.release(stream)

    def release(self, stream: str) -> None:
        """Close what this sink keeps for `stream`, quietly (after a failure of that stream)."""
        try:
            self.end(stream)
        except Exception:  # the stream already failed; its file may be unusable
            pass

    def ended(self, stream: str) -> None:
        self.failed.pop(stream, None)
        super().ended(stream)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "error": self.error or self.last_failure, "streams_failed": len(self.failed)}
