"""`map`: apply a user's `module:function` to each message."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from graphflow import Engine, Message, Param, ParamError


def load_function(ref: str) -> Callable[..., Any]:
    """`package.module:function` → the function; ValueError with one line if it cannot be had."""
    module_name, _, name = ref.partition(":")
    if not module_name or not name:
        raise ValueError(f"expected 'module:function' (got {ref!r})")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {ref!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{ref!r} is not callable")
    return fn


class Map(Engine):
    """Calls `function(msg)` per message: it returns a Message, None (drop it) or a list of Messages.

    Every message reaches the function, frames or not (totals, events): it decides what to pass on."""

    function = Param(str, module=True, doc="'package.module:function' taking and returning a Message")

    def check(self) -> None:
        try:
            load_function(self.function)
        except ValueError as exc:
            raise ParamError("function", str(exc)) from None

    def setup(self) -> None:
        self.fn = load_function(self.function)

    def process(self, msg: Message) -> None:
        result = self.fn(msg)
        for out in result if isinstance(result, list) else [result]:
            if out is not None:
                self.send(out)
