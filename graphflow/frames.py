"""Which messages the built-in vision engines treat as frames, and how they pass the others on.

A message is a frame when it carries a picture, arrays["image"] (or the model input made from one,
arrays["tensor"]), or a frame's detections, data["detections"] (detfile sends frames without pictures). Each
built-in engine consumes one field (preprocess: the image; infer: the tensor; track:
data["detections"]; rule: data["tracks"]). A message without that field that is not a frame — a per-stream total
or an event a user's engine sends — is passed on unchanged and counted (metric `passed_through`); a frame
without it is an error, as the engine is then in the wrong place in the graph.
"""
from __future__ import annotations

from typing import Any

from graphflow.engine import Engine
from graphflow.message import Message

FRAME_ARRAYS = ("image", "tensor")
FRAME_DATA = ("detections",)


def is_frame(msg: Message) -> bool:
    """Whether `msg` is a frame: it carries a picture (arrays["image"], or the tensor made from one) or a frame's
    detections; anything else (a total, an event) is passed on by the built-in engines."""
    return any(key in msg.arrays for key in FRAME_ARRAYS) or any(key in msg.data for key in FRAME_DATA)


class FrameEngine(Engine):
    """Base of the built-in engines that take frames: `takes` decides per message whether to process it or pass it
    on, and `metrics` reports how many were passed on."""

    passed_through = 0

    def takes(self, msg: Message, has: bool, needs: str, hint: str) -> bool:
        """True when `msg` is for the engine (`has`: it carries `needs`). Otherwise a message that is not a frame is
        passed on (`pass_on`) and False returned; a frame raises ValueError naming the engine, the message and
        `hint` (what to put where)."""
        if has:
            return True
        if is_frame(msg):
            raise ValueError(f"{self.id}: frame {msg.stream}#{msg.seq} has no {needs} ({hint})")
        self.passed_through += 1
        self.pass_on(msg)
        return False

    def pass_on(self, msg: Message) -> None:
        """Send a message the engine does not process, unchanged."""
        self.send(msg)

    def metrics(self) -> dict[str, Any]:
        return {"passed_through": self.passed_through}
