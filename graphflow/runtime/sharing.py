"""Stages shared by the engines of several graphs in one process: e.g. one detector and its batching for every
task of a service that defines its infer engine alike, so their streams' frames are batched together."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

STAGES = "stages"  # the name a process's SharedStages goes by among the services an engine is handed


def stage_key(kind: str, params: dict[str, Any]) -> str:
    """What makes two engines' stages the same one: the engine kind and its whole definition (params)."""
    return kind + ":" + json.dumps(params, sort_keys=True, default=str)


class SharedStages:
    """One stage per key, made by the first engine that asks for it and dropped when the last one lets go; the
    stage object decides what sharing means (e.g. whose results go where)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[str, tuple[Any, int]] = {}  # key → (stage, engines using it)

    def acquire(self, key: str, make: Callable[[], Any]) -> Any:
        """The stage of `key`, made now (by `make`, under the lock: a second engine waits for the first's) if none
        exists; each acquire is matched by one `release`."""
        with self._lock:
            stage, users = self._stages.get(key, (None, 0))
            if stage is None:
                stage = make()
            self._stages[key] = (stage, users + 1)
            return stage

    def release(self, key: str) -> bool:
        """One engine lets go of the stage of `key`; True when it was the last (the caller then closes it)."""
        with self._lock:
            stage, users = self._stages[key]
            if users > 1:
                self._stages[key] = (stage, users - 1)
                return False
            del self._stages[key]
            return True

    def users(self, key: str) -> int:
        with self._lock:
            return self._stages.get(key, (None, 0))[1]
