"""`sink`: each message's metadata as one JSON line, to a file or stdout — a preset of publish's `jsonl` sink."""
from __future__ import annotations

from typing import Any

from graphflow.engines.publish.files import JsonlSink

from graphflow import Engine, Message, Param


class Sink(Engine):
    """Appends one JSON line per message to `path` ("-" = stdout): publish's `jsonl` sink with `what: frames`, so
    a full disk leaves whole lines only and counts the rest as lost; a previous run's file is kept beside it.

    Messages that are not frames (totals, events) are written too, each as its own line."""

    outputs = ()
    path = Param(str, "-", path="write", doc="output file (relative to the graph file), or '-' for stdout")
    arrays = Param(bool, False, doc="include array shapes/dtypes in each line")
    times = Param(bool, True, doc="include per-engine wall-clock timestamps")

    def check(self) -> None:
        self.spec = JsonlSink.check_spec("", {"path": self.path, "arrays": self.arrays, "times": self.times})

    def setup(self) -> None:
        self.out = JsonlSink(self.spec, self, 0, where="")

    def process(self, msg: Message) -> None:
        self.out.accept(msg)

    def metrics(self) -> dict[str, Any]:
        return {"lost": self.out.lost, "written": self.out.written, "error": self.out.error}

    def teardown(self) -> None:
        self.out.finish()
