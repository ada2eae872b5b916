"""`sink`: write each message's metadata as one JSON line, to a file or stdout."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from graphflow import Engine, Message, Param, ParamError
from graphflow.detections import plain


def message_record(msg: Message, arrays: bool = False) -> dict[str, Any]:
    """A message as a JSON-ready dict: stream, seq, pts, data, times (and array shapes if asked)."""
    record: dict[str, Any] = {"stream": msg.stream, "seq": msg.seq, "pts": msg.pts, **plain(msg.data)}
    if arrays:
        record["arrays"] = {k: [list(a.shape), a.dtype.str] for k, a in msg.arrays.items()}
    record["times"] = msg.times
    return record


class Sink(Engine):
    """Appends one JSON line per message to `path` ("-" = stdout), flushed so nothing is lost on stop.

    Messages that are not frames (totals, events) are written too, each as its own line."""

    outputs = ()
    path = Param(str, "-", path="write", doc="output file (relative to the graph file), or '-' for stdout")
    arrays = Param(bool, False, doc="include array shapes/dtypes in each line")
    times = Param(bool, True, doc="include per-engine wall-clock timestamps")

    def check(self) -> None:
        if self.path != "-" and not Path(self.path).resolve().parent.is_dir():
            raise ParamError("path", f"directory of {self.path!r} does not exist")

    def setup(self) -> None:
        self.file: IO[str] = sys.stdout if self.path == "-" else open(self.path, "w", buffering=1)

    def process(self, msg: Message) -> None:
        record = message_record(msg, self.arrays)
        if not self.times:
            del record["times"]
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def teardown(self) -> None:
        if self.file is sys.stdout:
            sys.stdout.flush()
        else:
            self.file.close()
