"""The batching knobs, declared once: `Batched` gives them, as Params, to every engine that batches frames across
streams (infer, secondary); `BatchSettings` is a checked set of the same knobs for the scheduler. A knob added or
changed here is one in every such engine, its docs and `graphflow engines` listing."""
from __future__ import annotations

import copy
from typing import Any, ClassVar

from graphflow.engine import Param
from graphflow.errors import ParamError
from graphflow.runtime.queues import DROP_POLICIES


class Batched:
    """Mixin of the engines that batch frames across streams: the batching knobs as Params, with the same names,
    units and defaults in each. An engine whose work wants another default names it in `batch_defaults`
    (`{"max_batch": 4}`): the knob stays this declaration, with that default for that engine (and listed so)."""

    batch_defaults: ClassVar[dict[str, Any]] = {}

    max_batch = Param(int, 1, ge=1, doc="most frames run together, taken in rounds from all streams (longest-waiting "
                                         "first)")
    max_wait_ms = Param(float, 10.0, ge=0.0, doc="longest a frame waits for its batch to fill")
    queue = Param(int, 8, ge=1, doc="frames held per stream before the drop policy applies")
    drop = Param(str, "block", choices=DROP_POLICIES,
                 doc="full stream queue: block (back-pressure upstream), drop_oldest, or latest (keep only each "
                     "stream's newest frame, so none is processed stale)")
    target_latency_ms = Param(float, 0.0, ge=0.0, doc="adapt batch size and wait to hold per-stream p95 latency "
                                                      "under this (0: off)")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, default in cls.__dict__.get("batch_defaults", {}).items():
            if name not in KNOBS:
                raise TypeError(f"{cls.__name__}.batch_defaults: {name!r} is not a batching knob "
                                f"(known: {', '.join(KNOBS)})")
            own = copy.copy(KNOBS[name])
            own.default = KNOBS[name].coerce(default)
            setattr(cls, name, own)

    def batch_settings(self) -> BatchSettings:
        """This engine's knobs, for its Scheduler."""
        return BatchSettings(**{name: getattr(self, name) for name in KNOBS})


KNOBS: dict[str, Param] = {name: p for name, p in vars(Batched).items() if isinstance(p, Param)}


class BatchSettings(Batched):
    """A checked, unchangeable set of the batching knobs: each given value checked by its Param (ParamError naming
    the knob), the others at their defaults. Engines make theirs with `batch_settings()`; tests build them."""

    def __init__(self, **knobs: Any) -> None:
        for name, value in knobs.items():
            if name not in KNOBS:
                raise ParamError(name, f"unknown batching knob (known: {', '.join(KNOBS)})")
            self.__dict__[name] = KNOBS[name].coerce(value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"BatchSettings are fixed once made (set {name} when making them)")

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in KNOBS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchSettings) and self.values() == other.values()

    def __hash__(self) -> int:
        return hash(tuple(self.values().items()))

    def __repr__(self) -> str:
        return f"BatchSettings({', '.join(f'{k}={v!r}' for k, v in self.values().items())})"
