"""The unit that flows along graph edges: plain metadata plus named ndarray payloads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Message:
    """One frame (or event) of one stream; `data` stays msgpack-able so it can cross processes."""

    stream: str = "0"
    seq: int = 0
    pts: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    port: str = ""

    @property
    def image(self) -> np.ndarray | None:
        """The frame, if the message carries one."""
        return self.arrays.get("image")


class EndOfStream:
    """Marker that closes a connection; the runtime turns it into an engine's `flush()`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EOS"


EOS = EndOfStream()


@dataclass(frozen=True)
class StreamEnd:
    """Marker: stream `stream` has ended (its source finished it, or it was removed). It flows along every edge
    after that stream's last message; each engine's `on_stream_end(stream)` frees what it holds for the stream
    before the runtime passes the marker on. It is never dropped by a drop policy. `source` is the engine that
    ended the stream (set by the runtime): an engine with several inputs acts on the end once it has come on
    every input that engine feeds."""

    stream: str
    source: str = ""
