"""The base of every rule kind, its common keys and the registry of kinds: a kind is one subclass with a `kind`
name and its keys as Param attributes, registered by being defined.

A track's position is an anchor point of its box: bottom centre (feet) by default, or the centre.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphflow.engine import Param
from graphflow.graph.fields import check_keys
from graphflow.vision.rules.attributes import AttributeFilter
from graphflow.vision.rules.geometry import Points
from graphflow.vision.rules.keys import Classes, Converted, RuleId

ANCHORS = ("bottom_center", "center")
# Every rule kind by name, in name order (for listings and messages); filled as RuleKind subclasses are defined.
RULE_CLASSES: dict[str, type[RuleKind]] = {}


@dataclass
class Frame:
    """One stream's tracks at one instant, as arrays: ids (N,), classes (N,), labels, boxes (N,4) in pixels and
    attributes."""

    stream: str
    index: int
    time: float
    width: int | None
    height: int | None
    ids: np.ndarray
    classes: np.ndarray
    labels: list[str]
    boxes: np.ndarray
    attributes: list[Mapping[str, Any]]  # per track: the second stage's results ({} without)


def anchor_points(boxes: np.ndarray, anchor: str) -> np.ndarray:
    """Anchor point of each xyxy box: its bottom centre or its centre."""
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    y = boxes[:, 3] if anchor == "bottom_center" else (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([x, y], axis=1)


def rule_field(index: int, name: str) -> str:
    """The path of rule `index` or of one of its keys, for errors: `rules[0]`, `rules[0].polygon`."""
    return f"rules[{index}].{name}" if name else f"rules[{index}]"


class RuleKind:
    """Base of every rule kind: the common keys (id, kind, class and attribute filters, anchor, cool-down), the
    geometry scaling and the events. A subclass sets `kind`, declares its own keys as Params and implements `step`;
    defining it registers it in RULE_CLASSES. Its instance holds each key's checked value as an attribute."""

    params: ClassVar[dict[str, Param]] = {}  # the kind's own keys (all but the common ones), set at registration

    id = RuleId(str, None, doc="names the rule in events (a number is taken as its text), unique in the list; "
                               "default: kind and position, e.g. zone0")
    kind = Param(str, choices=RULE_CLASSES, doc="what the rule detects")  # a kind's class sets its name here
    classes = Classes()
    anchor = Param(str, "bottom_center", choices=ANCHORS,
                   doc="the point of a track's box that is its position: bottom centre (feet) or centre")
    attributes = AttributeFilter()
    cooldown_s = Param(float, 0.0, ge=0, doc="seconds within which an event of this rule, of the same name and "
                                             "track, is not repeated (0: every event)")
    alarm = Param(bool, True, doc="a service keeps evidence of this rule's events (snapshot, crop, clip); false: "
                                  "the events only")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not isinstance(kind, str) or not kind:
            return  # a shared base of kinds, not a kind
        if kind in RULE_CLASSES:
            raise TypeError(f"rule kind {kind!r} is defined twice ({RULE_CLASSES[kind].__name__} and {cls.__name__})")
        cls.params = {k: p for k, p in cls.keys().items() if k not in RuleKind.keys()}
        ordered = sorted([*RULE_CLASSES.items(), (kind, cls)])
        RULE_CLASSES.clear()
        RULE_CLASSES.update(ordered)

    @classmethod
    def keys(cls) -> dict[str, Param]:
        """Every key a rule of this kind takes: the common ones, then the kind's own, by name."""
        found: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            found.update({k: p for k, p in vars(klass).items() if isinstance(p, Param)})
        return found

    def __init__(self, spec: dict, index: int) -> None:
        self.spec = dict(spec)  # as given: what `GET /streams/{id}/rules` shows
        self.where = rule_field(index, "")
        keys = self.keys()
        given = {k: v for k, v in spec.items() if v is not None or k not in keys}  # a null key takes its default
        checked = check_keys(self.where, given, keys, f"key for a {self.kind} rule")  # with defaults
        rule_id = f"{self.kind}{index}" if checked["id"] is None else checked["id"]
        for name, p in keys.items():
            if isinstance(p, Converted) and checked[name] is not None:
                checked[name] = p.convert(checked[name], self.field(name), rule_id)
        self.__dict__.update(checked)
        self.id: str = rule_id
        self.attributes = checked["attributes"] or ()
        self.geometry = {name: checked[name] for name, p in keys.items() if isinstance(p, Points)}
        self._scaled: dict[str, np.ndarray] = {}
        self._scaled_for: tuple[int | None, int | None] | None = None
        self._last_event: dict[tuple[str, int | None], float] = {}  # (event, track) → time, for the cool-down

    def field(self, key: str) -> str:
        """The path of one of this rule's keys, for errors: `rules[0].polygon`."""
        return f"{self.where}.{key}"

    def pixels(self, name: str, frame: Frame) -> np.ndarray:
        """Geometry `name` in pixels: normalised geometry (all values ≤ 1) is scaled by the frame size."""
        if self._scaled_for != (frame.width, frame.height):
            self._scaled = {}
            self._scaled_for = (frame.width, frame.height)
        if name not in self._scaled:
            pts = self.geometry[name]
            if (pts <= 1).all():
                if not frame.width or not frame.height:
                    raise ValueError(f"rule {self.id!r}: normalised {name} needs data['width'] and data['height'] "
                                     f"(missing in stream {frame.stream!r})")
                pts = pts * np.array([frame.width, frame.height], np.float64)
            self._scaled[name] = pts
        return self._scaled[name]

    def selected(self, frame: Frame) -> np.ndarray:
        """Boolean mask of the frame's tracks that pass the class and attribute filters."""
        mask = np.ones(len(frame.ids), bool)
        if self.classes is not None:
            mask &= np.array([c in self.classes or lab in self.classes
                              for c, lab in zip(frame.classes.tolist(), frame.labels)], bool)
        if self.attributes:
            mask &= np.array([all(t.matches(a) for t in self.attributes) for a in frame.attributes], bool)
        return mask

    def event(self, frame: Frame, name: str, row: int | None, point: np.ndarray | None, **extra: Any) -> dict:
        """An event dict per the data contract; `row` indexes the frame's tracks (None for area events)."""
        ev = {"rule": self.id, "kind": self.kind, "event": name, "stream": frame.stream,
              "track_id": None if row is None else int(frame.ids[row]),
              "class_id": None if row is None else int(frame.classes[row]),
              "label": None if row is None else frame.labels[row],
              "frame": frame.index, "time": frame.time,
              "position": None if point is None else [round(float(point[0]), 2), round(float(point[1]), 2)]}
        if row is not None and frame.attributes[row]:
            ev["attributes"] = dict(frame.attributes[row])
        if not self.alarm:
            ev["alarm"] = False
        ev.update(extra)
        return ev

    def evaluate(self, frame: Frame) -> list[dict]:
        """This frame's events, less those the cool-down holds back."""
        mask = self.selected(frame)
        points = anchor_points(frame.boxes, self.anchor)
        events = self.step(frame, np.flatnonzero(mask), points)
        return self.cooled(events) if self.cooldown_s and events else events

    def cooled(self, events: list[dict]) -> list[dict]:
        """`events` without those of a name and track that this rule gave less than `cooldown_s` ago."""
        kept = []
        for ev in events:
            key = (ev["event"], ev["track_id"])
            last = self._last_event.get(key)
            if last is None or ev["time"] - last >= self.cooldown_s:
                self._last_event[key] = ev["time"]
                kept.append(ev)
        return kept

    def step(self, frame: Frame, rows: np.ndarray, points: np.ndarray) -> list[dict]:
        """The events of one frame from the tracks at `rows` (those passing the filters) and every track's anchor
        point in pixels; the kind's own state changes here."""
        raise NotImplementedError

    def forget(self, track_ids: set[int]) -> None:
        """Drop the state of tracks not seen for a while; a kind with per-track state extends it."""
        for key in [k for k in self._last_event if k[1] in track_ids]:
            del self._last_event[key]

    def overlay(self, frame: Frame) -> dict[str, Any]:
        """What an on-screen display draws for this rule: id, kind, geometry in pixels and live figures."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        for name in self.geometry:
            out[name] = np.round(self.pixels(name, frame), 1).tolist()
        return out


COMMON: dict[str, Param] = RuleKind.keys()  # the keys every kind takes
