"""Rule engine: turns data["tracks"] into data["events"] (zones, line crossing, dwell, crowding, speed)."""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from typing import Any

from graphflow import Message, Param
from graphflow.frames import FrameEngine
from graphflow.vision.rules import RULE_CLASSES, RuleSet, check_rules

log = logging.getLogger(__name__)
ENDED_KEEP = 256  # ended streams whose event counts stay in the metrics


class Rule(FrameEngine):
    """Evaluates event rules on each stream's tracks and adds data["events"] (times from pts, else seq/fps) and,
    for the osd, data["rules"] (geometry in pixels, line counts, tracks inside zones).

    Consumes data["tracks"]: a message without them that is not a frame (a total, an event) is passed on
    unchanged; a frame without them is an error (rule before track)."""

    inputs = ("in",)
    outputs = ("out",)
    rules = Param(list, doc=f'list of {{"kind": {"|".join(RULE_CLASSES)}, key: value...}}; the keys of each kind are '
                            'listed under its rule kinds; "attributes" counts only tracks whose second-stage results '
                            'match, e.g. {"text": {"regex": "^京A"}, "score": {"min": 0.5}}')
    fps = Param(float, 25.0, ge=0.001, doc="frame rate for event times when a message has no pts")
    forget_after = Param(float, 5.0, ge=0, doc="seconds after which an unseen track is dropped from rule state")
    overlay = Param(bool, True, doc="add data['rules']: each rule's geometry in pixels and counts, for the video sink's osd")

    def check(self) -> None:
        check_rules(self.rules)

    @staticmethod
    def upstream_classes(upstream: list[tuple[type, dict[str, Any]]]) -> dict[int, str] | None:
        """The class ids and labels the engines upstream (class, params) give, from those that declare them
        (`declared_classes`, as infer does for its model); None when none does: names cannot be checked."""
        known: dict[int, str] = {}
        declared = False
        for klass, upstream_params in upstream:
            classes = klass.declared_classes(upstream_params) if hasattr(klass, "declared_classes") else None
            if classes is not None:
                known.update(classes)
                declared = True
        return known if declared else None

    @classmethod
    def check_upstream(cls, params: dict[str, Any], upstream: list[tuple[type, dict[str, Any]]]) -> None:
        """The classes rules name must be ones the engines upstream give, when any of them declares its classes;
        with none declared, any name is accepted."""
        check_rules(params.get("rules", []), cls.upstream_classes(upstream))

    def setup(self) -> None:
        self.ruleset = RuleSet(self.rules, forget_after=self.forget_after)
        self.counts: dict[str, dict[str, int]] = {}  # stream → event name ("door cross A->B") → count
        self.ended: OrderedDict[str, dict[str, int]] = OrderedDict()  # the same, of streams that ended
        self.lock = threading.Lock()  # commands (another thread) change the rules between frames

    def on_stream_end(self, stream: str) -> None:
        """Free the stream's rule state; its event counts stay for the summary among the last ENDED_KEEP ended."""
        self.ruleset.forget(stream)
        counts = self.counts.pop(stream, None)
        if counts:
            self.ended[stream] = counts
            while len(self.ended) > ENDED_KEEP:
                self.ended.popitem(last=False)

    def on_command(self, op: str, args: dict[str, Any]) -> Any:
        """`set_rules` {"stream", "rules"}: that stream's own rules, applied live (None: the engine's again);
        `rules` {"stream"}: the rules the stream runs."""
        if op == "set_rules":
            with self.lock:
                self.ruleset.set_rules(args["stream"], args["rules"])
            return None
        if op == "rules":
            with self.lock:
                return [rule.spec for rule in self.ruleset.rules_of(args["stream"])]
        return super().on_command(op, args)

    def process(self, msg: Message) -> None:
        tracks = msg.data.get("tracks")
        if not self.takes(msg, tracks is not None, "data['tracks']", "put track before rule"):
            return
        time = msg.pts if msg.pts is not None else msg.seq / msg.data.get("fps", self.fps)
        with self.lock:
            events = self.ruleset.evaluate(msg.stream, msg.seq, time, tracks, msg.data.get("width"),
                                           msg.data.get("height"))
            overlay = self.ruleset.overlay(msg.stream) if self.overlay else None
        if events:
            counts = self.counts.setdefault(msg.stream, {})
            for ev in events:
                name = f"{ev['rule']} {ev['event']}" + (f" {ev['direction']}" if "direction" in ev else "")
                counts[name] = counts.get(name, 0) + 1
        data = {**msg.data, "events": events}
        if overlay is not None:
            data["rules"] = overlay
        self.send(dataclasses.replace(msg, data=data))

    def metrics(self) -> dict[str, Any]:
        """Events so far per stream ("door cross A->B": 3), for the run summary, and messages passed on."""
        counts = {**self.ended, **self.counts}
        return {**super().metrics(), "events": {s: dict(c) for s, c in counts.items()},
                "streams_held": len(self.ruleset.streams.keys() | self.ruleset.own.keys())}
