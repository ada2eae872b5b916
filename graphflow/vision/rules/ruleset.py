"""Lists of rules: parsed and checked from their JSON specs, and evaluated on each stream's tracks with state kept
per stream."""
from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphflow.detections import Detections
from graphflow.errors import ParamError
from graphflow.vision.rules.base import RULE_CLASSES, Frame, RuleKind, rule_field


def parse_rules(specs: list) -> list[RuleKind]:
    """Rule objects from their JSON specs; raises ParamError("rules[i].field", ...) on the first mistake."""
    rules, seen = [], set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ParamError(rule_field(i, ""), f"must be an object (got {spec!r})")
        kind = spec.get("kind")
        if not isinstance(kind, str) or kind not in RULE_CLASSES:
            raise ParamError(rule_field(i, "kind"), f"must be one of {', '.join(RULE_CLASSES)} (got {kind!r})")
        rule = RULE_CLASSES[kind](spec, i)
        if rule.id in seen:
            raise ParamError(rule_field(i, "id"), f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    return rules


def check_rules(specs: list, known_classes: Mapping[int, str] | None = None) -> list[RuleKind]:
    """The rules of `specs`, checked as a graph file's are: every key (`parse_rules`) and, when `known_classes`
    (class id → label of the detectors upstream) is given, every class a rule names — a misspelt class would match
    nothing, silently. Raises ParamError naming the first wrong field, with a "did you mean" for a close label."""
    rules = parse_rules(specs)
    if known_classes is None:
        return rules
    labels = list(dict.fromkeys(known_classes[i] for i in sorted(known_classes)))  # in class id order, once each
    for i, rule in enumerate(rules):
        for k, name in enumerate(specs[i].get("classes") or ()):
            if name in labels or (isinstance(name, int) and name in known_classes):
                continue
            if isinstance(name, int):
                ids = sorted(known_classes)
                shown = ", ".join(map(str, ids)) if len(ids) <= 8 else f"{ids[0]}-{ids[-1]}"
                why = f"class id {name} is not one the detectors upstream give (ids: {shown})"
            else:
                close = difflib.get_close_matches(name, labels, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else \
                    "known: " + ", ".join(labels[:8]) + (", …" if len(labels) > 8 else "")
                why = f"class {name!r} is not one the detectors upstream give ({hint})"
            raise ParamError(f"{rule_field(i, 'classes')}[{k}]", f"rule {rule.id!r}: {why}")
    return rules


@dataclass
class _StreamState:
    rules: list[RuleKind]
    last_seen: dict[int, float] = field(default_factory=dict)
    frame: Frame | None = None


def _carried_over(running: list[RuleKind], wanted: list[RuleKind]) -> list[RuleKind]:
    """The rules to run after a change: a running rule whose id and spec are unchanged goes on with its state
    (counts, tracks inside, dwell timers); a new or changed one starts afresh (a copy of `wanted`'s)."""
    by_id = {rule.id: rule for rule in running}
    out = []
    for rule in wanted:
        old = by_id.get(rule.id)
        out.append(old if old is not None and old.spec == rule.spec else copy.deepcopy(rule))
    return out


class RuleSet:
    """Evaluates a list of rules on each stream's tracks, with state kept per stream.

    A track unseen for `forget_after` seconds is dropped from every rule's state (no event).
    """

    def __init__(self, specs: list, forget_after: float = 5.0) -> None:
        self.prototype = parse_rules(specs)
        self.forget_after = forget_after
        self.streams: dict[str, _StreamState] = {}
        self.own: dict[str, list[RuleKind]] = {}  # streams with rules of their own instead of the prototype

    def set_rules(self, stream: str, specs: list | None) -> None:
        """Give `stream` its own rules (checked like the engine's; ParamError naming the field), applied from its
        next frame; `None` goes back to the engine's rules. Rules whose id and spec are unchanged keep their state,
        the others start afresh."""
        rules = None if specs is None else parse_rules(specs)
        if rules is None:
            self.own.pop(stream, None)
        else:
            self.own[stream] = rules
        state = self.streams.get(stream)
        if state is not None:
            state.rules = _carried_over(state.rules, self.rules_of(stream))

    def rules_of(self, stream: str) -> list[RuleKind]:
        return self.own.get(stream, self.prototype)

    def forget(self, stream: str) -> None:
        """`stream` ended: drop its state and its own rules."""
        self.streams.pop(stream, None)
        self.own.pop(stream, None)

    def evaluate(self, stream: str, index: int, time: float, tracks: Detections | list[dict],
                 width: int | None = None, height: int | None = None) -> list[dict]:
        """Events produced by one frame of `stream`; `tracks` (Detections, or dicts with box, track_id, class_id,
        label and, after a second stage, attributes) are read as arrays."""
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = _StreamState(copy.deepcopy(self.rules_of(stream)))
        tracks = Detections.of(tracks, "data['tracks']")
        labels = tracks.labels.tolist()
        frame = Frame(stream, index, float(time), width, height, ids=tracks.track_ids,
                      classes=tracks.class_ids.astype(np.int64),
                      labels=[label or "" for label in labels] if None in labels else labels,
                      boxes=tracks.rounded_boxes(),
                      attributes=[a or {} for a in tracks.attributes.tolist()])
        for tid in frame.ids.tolist():
            state.last_seen[tid] = frame.time
        stale = {t for t, seen in state.last_seen.items() if frame.time - seen > self.forget_after}
        events = []
        for rule in state.rules:
            if stale:
                rule.forget(stale)
            events += rule.evaluate(frame)
        for tid in stale:
            del state.last_seen[tid]
        state.frame = frame
        return events

    def overlay(self, stream: str) -> list[dict[str, Any]]:
        """Each rule's geometry (pixels) and live figures (line counts, tracks inside) after the stream's last
        `evaluate`, for an on-screen display; [] before the first."""
        state = self.streams.get(stream)
        if state is None or state.frame is None:
            return []
        return [rule.overlay(state.frame) for rule in state.rules]
