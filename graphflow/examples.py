"""Small functions used by the example graphs' `map` engines."""
from __future__ import annotations

from graphflow.message import Message


def double_value(msg: Message) -> Message:
    """Doubles `data["value"]` and records the frame's mean brightness."""
    msg.data["value"] = msg.data.get("value", 0) * 2
    if msg.image is not None:
        msg.data["mean"] = round(float(msg.image.mean()), 3)
    return msg


def identity(msg: Message) -> Message:
    """Passes the message on unchanged (used to measure per-hop cost)."""
    return msg
