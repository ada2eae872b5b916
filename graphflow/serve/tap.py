"""The tap engine the service adds at the end of its graph, so results reach the controller."""
from __future__ import annotations

from graphflow.engine import Engine
from graphflow.message import Message

TAP = "_service"


class Tap(Engine):
    """The service's own engine at the end of the graph: per-stream counts and latency, events to the store."""

    outputs = ()

    def setup(self) -> None:
        self.service = self.context.service(TAP)

    def process(self, msg: Message) -> None:
        self.service.observe(msg)

    def on_stream_end(self, stream: str) -> None:
        self.service.stream_ended(stream)
