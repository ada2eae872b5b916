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
