"""The unit that flows along graph edges: plain metadata plus named ndarray payloads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from graphflow.detections import Detections


@dataclass
class Message:
    """One frame (or event) of one stream; `data` holds plain msgpack-able values and Detections (packed by `pack`),
    so it can cross processes."""

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


EXT_DETECTIONS = 1  # msgpack extension type of a packed Detections


def _to_ext(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, Detections):
        return msgpack.ExtType(EXT_DETECTIONS, obj.pack())
    raise TypeError(f"cannot send a {type(obj).__name__} in a message's data (plain values, lists, dicts and "
                    "Detections go; put arrays in msg.arrays)")


def _from_ext(code: int, body: bytes) -> Any:
    return Detections.unpack(body) if code == EXT_DETECTIONS else msgpack.ExtType(code, body)


def pack(obj: Any) -> bytes:
    """msgpack of message metadata, Detections included (as one extension value each)."""
    return msgpack.packb(obj, default=_to_ext)


def unpack(buf: Any) -> Any:
    """Inverse of `pack`."""
    return msgpack.unpackb(buf, ext_hook=_from_ext)
