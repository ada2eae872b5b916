"""Rule engine: turns data["tracks"] into data["events"] (zones, line crossing, dwell, crowding, speed)."""
from __future__ import annotations

import dataclasses
import logging

from graphflow import Engine, Message, Param
from graphflow.vision.rules import RuleSet

log = logging.getLogger(__name__)


class Rule(Engine):
    """Evaluates event rules on each stream's tracks and adds data["events"] (times from pts, else seq/fps) and,
    for the osd, data["rules"] (geometry in pixels, line counts, tracks inside zones)."""

    inputs = ("in",)
    outputs = ("out",)
    rules = Param(list, doc='list of {"id", "kind": zone|line_cross|dwell|crowding|speed, ...}')
    fps = Param(float, 25.0, ge=0.001, doc="frame rate for event times when a message has no pts")
    forget_after = Param(float, 5.0, ge=0, doc="seconds after which an unseen track is dropped from rule state")
    overlay = Param(bool, True, doc="add data['rules']: each rule's geometry in pixels and counts, for the video sink's osd")

    def check(self) -> None:
        RuleSet(self.rules)

    def setup(self) -> None:
        self.ruleset = RuleSet(self.rules, forget_after=self.forget_after)

    def process(self, msg: Message) -> None:
        tracks = msg.data.get("tracks")
        if tracks is None:
            raise ValueError(f"{self.id}: message {msg.stream}#{msg.seq} has no data['tracks'] (put track before rule)")
        time = msg.pts if msg.pts is not None else msg.seq / msg.data.get("fps", self.fps)
        events = self.ruleset.evaluate(msg.stream, msg.seq, time, tracks, msg.data.get("width"), msg.data.get("height"))
        data = {**msg.data, "events": events}
        if self.overlay:
            data["rules"] = self.ruleset.overlay(msg.stream)
        self.send(dataclasses.replace(msg, data=data))
