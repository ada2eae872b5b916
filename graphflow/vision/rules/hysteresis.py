"""Hysteresis for per-track states (inside a zone, a side of a line): a track's state changes only once it has
been seen in the new state on `min_frames` of its frames in a row, so a track jittering across an edge does not
flicker between enter and exit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphflow.engine import Param

MIN_FRAMES = Param(int, 1, ge=1, doc="frames in a row a track must be seen on the new side before it counts as "
                                     "inside/outside (or across); 1 counts at once")


@dataclass
class Change:
    """A confirmed change: the time of the first frame of the run that made it, and what that frame noted."""

    since: float
    note: Any = None


@dataclass
class _State:
    value: Any  # the confirmed state
    pending: Any = None  # the other state the track is seen in lately, for `run` frames since `since`
    run: int = 0
    since: float = 0.0
    note: Any = None


class Debounce:
    """Each track's confirmed state. `initial` is the state of a track not seen before (None: its first frame's
    state, without a change)."""

    def __init__(self, min_frames: int, initial: Any = None) -> None:
        self.min_frames = min_frames
        self.initial = initial
        self.states: dict[int, _State] = {}

    def confirmed(self, track: int) -> Any:
        """The track's confirmed state (`initial` for a track not seen)."""
        state = self.states.get(track)
        return self.initial if state is None else state.value

    def observe(self, track: int, value: Any, time: float, note: Any = None) -> Change | None:
        """The track seen in state `value` at `time`: the Change when that confirms a new state, else None. `note`
        is kept from the first frame of a run (a line rule notes whether that step crossed the line)."""
        state = self.states.get(track)
        if state is None:
            if self.initial is None:
                self.states[track] = _State(value)
                return None
            state = self.states[track] = _State(self.initial)
        if value == state.value:
            state.pending, state.run = None, 0  # back in the confirmed state: the run does not count
            return None
        if state.run == 0 or value != state.pending:
            state.pending, state.run, state.since, state.note = value, 0, time, note
        state.run += 1
        if state.run < self.min_frames:
            return None
        self.states[track] = _State(value)
        return Change(state.since, state.note)

    def forget(self, tracks: set[int]) -> None:
        for track in tracks:
            self.states.pop(track, None)
