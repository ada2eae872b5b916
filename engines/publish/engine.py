"""The `publish` engine: every message to each of its sinks, each sink failing alone (one error line, then its
messages counted as `lost` in `metrics()`); the sink kinds are the registered `Output` classes."""
from __future__ import annotations

from typing import Any

import graphflow.engines.publish.alarms  # noqa: F401,I001  (listed after the file and video kinds)
import graphflow.engines.publish.files  # noqa: F401  (defining the kinds registers them)
import graphflow.engines.publish.video  # noqa: F401
from graphflow.engines.publish.base import SINKS, Output, check_sink
from graphflow.engines.publish.brokers import BufferedSink

from graphflow import Engine, Message, Param, ParamError


class Publish(Engine):
    """Writes every message to each configured sink: JSON lines, ZeroMQ, Redis, annotated MP4, MOT results, JPEGs,
    webhooks, MQTT. A sink that fails stops alone with one error line; what it could not write is counted in
    `metrics()['lost']`."""

    inputs = ("in",)
    outputs = ()
    path_fields = {"sinks[].path": "write", "sinks[].spool": "state"}  # relative to the graph file
    bind_fields = ("sinks[].address",)
    sinks = Param(list, doc='list of {"kind": KIND, key: value...}; the kinds and their keys are listed under '
                            'sink kinds')
    buffer = Param(int, 1000, ge=1, doc="broker sink items kept in memory while a sink fails (oldest dropped, counted)")
    retry = Param(float, 0.5, ge=0, doc="first retry delay in seconds after a sink failure, doubled per failure")
    retry_max = Param(float, 30.0, ge=0, doc="cap on the retry delay in seconds")

    def check(self) -> None:
        if not self.sinks:
            raise ParamError("sinks", "needs at least one sink")
        self.specs = [check_sink(f"sinks[{i}]", spec) for i, spec in enumerate(self.sinks)]

    def setup(self) -> None:
        self.outs: list[Output] = []
        try:
            for i, spec in enumerate(self.specs):
                self.outs.append(SINKS[spec["kind"]](spec, self, i))
        except Exception:
            self._close(self.outs)  # the sinks already open (an open zmq socket would block interpreter exit)
            self.outs = []
            raise
        for out in self.outs:
            out.start()

    def _buffered(self) -> list[BufferedSink]:
        return [out for out in self.outs if isinstance(out, BufferedSink)]

    @property
    def failures(self) -> int:
        """Failed deliveries over all sinks (each retried later)."""
        return sum(out.failures for out in self._buffered())

    @property
    def dropped(self) -> int:
        """Items lost because a failing sink's queue was full."""
        return sum(out.dropped for out in self._buffered())

    @property
    def lost(self) -> int:
        """Items the sinks did not write: dropped, undelivered at shutdown, or refused by a failed sink."""
        return sum(out.lost for out in self.outs)

    def process(self, msg: Message) -> None:
        for out in self.outs:
            out.accept(msg)

    def flush(self) -> None:
        for out in self.outs:
            out.settle()

    def on_stream_end(self, stream: str) -> None:
        """A stream ended: its video and MOT files are finished now, not at the end of the run."""
        for out in self.outs:
            out.ended(stream)

    def metrics(self) -> dict[str, Any]:
        held = set().union(*(out.held() for out in self.outs))
        return {"lost": self.lost, "failures": self.failures, "dropped": self.dropped, "streams_held": len(held),
                "sinks": {f"{out.index}:{out.kind}": out.metrics() for out in self.outs}}

    def _close(self, outs: list[Output]) -> None:
        for out in outs:
            out.finish()

    def teardown(self) -> None:
        self._close(self.outs)
