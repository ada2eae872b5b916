"""The Engine base class users subclass: ports and params first, then setup/process/flush/teardown."""
from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from .errors import ParamError
from .message import Message

REQUIRED = object()
_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "an object"}


class Param:
    """A declared engine parameter: type, default (or required), range and choices, checked before start."""

    def __init__(self, type: type, default: Any = REQUIRED, *, ge: float | None = None, le: float | None = None,
                 choices: tuple | list | None = None, doc: str = "") -> None:
        self.type, self.default, self.ge, self.le, self.choices, self.doc = type, default, ge, le, choices, doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name, None if self.default is REQUIRED else self.default)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Return `value` checked against this declaration, or raise ParamError naming the param."""
        t = self.type
        ok = isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if t is list and isinstance(value, tuple):
            value, ok = list(value), True
        if not ok:
            raise ParamError(self.name, f"must be {_TYPES.get(t, t.__name__)} (got {value!r})")
        if self.ge is not None and value < self.ge:
            raise ParamError(self.name, f"must be ≥ {self.ge} (got {value!r})")
        if self.le is not None and value > self.le:
            raise ParamError(self.name, f"must be ≤ {self.le} (got {value!r})")
        if self.choices is not None and value not in self.choices:
            raise ParamError(self.name, f"must be one of {', '.join(map(str, self.choices))} (got {value!r})")
        return value

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        rng = "".join(f", {k} {v}" for k, v in (("≥", self.ge), ("≤", self.le)) if v is not None)
        choices = f", one of {list(self.choices)}" if self.choices else ""
        return f"{self.type.__name__} ({default}{rng}{choices}){' — ' + self.doc if self.doc else ''}"


class Engine:
    """A node of the graph. Subclasses declare `inputs`, `outputs` and `Param`s, then implement `process`
    (or `generate` for a source). The runtime calls check → setup → process… → flush → teardown."""

    inputs: ClassVar[tuple[str, ...]] = ("in",)
    outputs: ClassVar[tuple[str, ...]] = ("out",)

    def __init__(self, engine_id: str = "", params: dict[str, Any] | None = None) -> None:
        self.id = engine_id or type(self).__name__.lower()
        self.log = logging.getLogger(f"graphflow.engine.{self.id}")
        self.stopping = threading.Event()
        self._send: Callable[[Message, str], None] | None = None
        self._alloc: Callable[[tuple, Any, str], np.ndarray] | None = None
        declared = self.declared_params()
        for name, value in (params or {}).items():
            if name not in declared:
                known = ", ".join(declared) or "none"
                raise ParamError(name, f"unknown parameter (known: {known})")
            self.__dict__[name] = declared[name].coerce(value)
        for name, p in declared.items():
            if p.required and name not in self.__dict__:
                raise ParamError(name, f"required parameter missing ({p.describe()})")

    @classmethod
    def declared_params(cls) -> dict[str, Param]:
        """Every Param of this class and its bases, by name."""
        found: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            found.update({k: v for k, v in vars(klass).items() if isinstance(v, Param)})
        return found

    @classmethod
    def is_source(cls) -> bool:
        return not cls.inputs

    @classmethod
    def summary(cls) -> str:
        """First docstring line, for `graphflow engines` and `inspect`."""
        return (inspect.getdoc(cls) or "").split("\n")[0]

    def check(self) -> None:
        """Deep validation of params before anything starts; raise ParamError(field, message)."""

    def setup(self) -> None:
        """Open what `process` needs (models, files, sockets)."""

    def process(self, msg: Message) -> Any:
        """Handle one input message; may send zero, one or many messages. May be `async def`."""
        raise NotImplementedError(f"{type(self).__name__} must implement process() (or generate() for a source)")

    def generate(self) -> Iterator[Message | None]:
        """A source's messages, each sent to `out`; yield None as a heartbeat while nothing is ready."""
        raise NotImplementedError(f"{type(self).__name__} has no inputs, so it must implement generate()")

    def flush(self) -> Any:
        """End of stream on every input: send what is still held back."""

    def teardown(self) -> None:
        """Release what `setup` opened; always called once."""

    def metrics(self) -> dict[str, Any]:
        """Engine-specific figures (JSON-able) for progress, the launch summary and `--stats FILE`."""
        return {}

    def send(self, msg: Message, port: str = "out") -> None:
        """Send `msg` on an output port (from any thread of the engine). Do not modify `msg` or its
        arrays after sending it."""
        if self._send is None:
            raise RuntimeError(f"engine {self.id!r} is not running, it cannot send")
        self._send(msg, port)

    def alloc(self, shape: tuple[int, ...], dtype: Any = np.uint8, port: str = "out") -> np.ndarray:
        """A writable array that `send` passes on without a copy (a shared-memory slot across processes)."""
        if self._alloc is None:
            return np.empty(shape, dtype)
        return self._alloc(tuple(shape), np.dtype(dtype), port)
