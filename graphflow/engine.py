"""The Engine base class users subclass: ports and params first, then setup/process/flush/teardown."""
from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import numpy as np

from graphflow.errors import GraphflowError, ParamError, did_you_mean
from graphflow.message import Message, StreamEnd

REQUIRED = object()
_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "an object"}


class Param:
    """A declared engine parameter: type, default (or required), range and choices, checked before start.

    `path="read"`, `"write"` or `"state"` (a folder the engine keeps and reuses) marks a file path: a relative one
    is resolved against the graph file's folder before the engine is built, and restricted mode checks it against
    its roots; values in `names` (e.g. built-in model names) are names, not paths. `module=True` marks a
    `package.module:name` reference that is imported."""

    def __init__(self, type: type, default: Any = REQUIRED, *, ge: float | None = None, le: float | None = None,
                 choices: tuple | list | None = None, doc: str = "", path: str | None = None,
                 names: tuple[str, ...] = (), module: bool = False) -> None:
        if path not in (None, "read", "write", "state"):
            raise ValueError(f"Param path must be 'read', 'write', 'state' or None (got {path!r})")
        self.type, self.default, self.ge, self.le, self.choices, self.doc = type, default, ge, le, choices, doc
        self.path, self.names, self.module = path, tuple(names), module
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
        kind = f", a path to {self.path}" if self.path else ", a module:name reference" if self.module else ""
        return f"{self.type.__name__} ({default}{rng}{choices}{kind}){' — ' + self.doc if self.doc else ''}"


class EngineContext:
    """An engine's one link to what runs it: `send` and `alloc` on its output ports, the `stopping` flag, its logger,
    and the busy time its own threads report. The runtime (or `graphflow.testing.Harness`) makes one per running
    engine and hands it over with `Engine.attach` before `setup()`; an engine not attached has one that cannot send."""

    def __init__(self, engine_id: str, send: Callable[[Message | StreamEnd, str], None] | None = None,
                 alloc: Callable[[tuple[int, ...], np.dtype, str], np.ndarray | None] | None = None,
                 stopping: threading.Event | None = None, log: logging.Logger | None = None,
                 services: Mapping[str, Any] | None = None) -> None:
        self.engine_id = engine_id
        self._services = services or {}  # collaborators its process was handed (e.g. the service's controller)
        self._deliver = send
        self._slot = alloc  # a writable array for a port (a shared-memory slot), or None: a plain array will do
        self.stopping = stopping if stopping is not None else threading.Event()
        self.log = log if log is not None else logging.getLogger(f"graphflow.engine.{engine_id}")
        self.busy_s = 0.0  # wall time inside `busy()` blocks
        self._busy_lock = threading.Lock()

    def send(self, msg: Message | StreamEnd, port: str = "out") -> None:
        """Deliver `msg` on an output port; raises Stopped once the graph shuts down."""
        if self._deliver is None:
            raise RuntimeError(f"engine {self.engine_id!r} is not running, it cannot send")
        self._deliver(msg, port)

    def alloc(self, shape: tuple[int, ...], dtype: Any = np.uint8, port: str = "out") -> np.ndarray:
        """A writable array that `send` passes on without a copy where the port crosses processes."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        arr = self._slot(shape, dtype, port) if self._slot is not None else None
        return arr if arr is not None else np.empty(shape, dtype)

    def service(self, name: str, default: Any = REQUIRED) -> Any:
        """A collaborator the process running this engine was handed by name (`Launcher(services=...)`): how an
        engine placed in a thread reaches the object that started the graph, without a global; `default` when
        there is none (without a default, a one-line error)."""
        if name not in self._services and default is not REQUIRED:
            return default
        if name not in self._services:
            raise GraphflowError(f"engine {self.engine_id!r} needs {name!r}, which only the process that starts this "
                                 f"graph with it can hand over (place the engine in a thread of that process)")
        return self._services[name]

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count the enclosed wall time as the engine's busy time (work on a thread the engine started)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._busy_lock:
                self.busy_s += time.perf_counter() - t0


class Engine:
    """A node of the graph. Subclasses declare `inputs`, `outputs` and `Param`s, then implement `process`
    (or `generate` for a source). The runtime calls check → setup → process… → flush → teardown; teardown only
    when setup returned, so a setup that raises releases what it opened itself."""

    inputs: ClassVar[tuple[str, ...]] = ("in",)
    outputs: ClassVar[tuple[str, ...]] = ("out",)
    # params holding paths (read/write/state) or listen addresses: {"sinks[].path": "write"}, ("sinks[].address",)
    path_fields: ClassVar[dict[str, str]] = {}
    bind_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, engine_id: str = "", params: dict[str, Any] | None = None) -> None:
        self.id = engine_id or type(self).__name__.lower()
        self._context = EngineContext(self.id)
        # set by the runtime before setup(): stream → seq of the last frame already delivered downstream; a
        # restarted source skips frames up to it instead of replaying them (empty on a first start)
        self.resume: dict[str, int] = {}
        declared = self.declared_params()
        for name, value in (params or {}).items():
            if name not in declared:
                known = ", ".join(declared) or "none"
                raise ParamError(name, f"unknown parameter ({did_you_mean(name, declared)}known: {known})")
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

    def param_values(self) -> dict[str, Any]:
        """Every declared param's value (as given, else its default), by name: what this engine was defined as."""
        return {name: getattr(self, name) for name in self.declared_params()}

    @classmethod
    def is_source(cls) -> bool:
        return not cls.inputs

    @classmethod
    def summary(cls) -> str:
        """First docstring line, for `graphflow engines` and `inspect`."""
        return (inspect.getdoc(cls) or "").split("\n")[0]

    def check(self) -> None:
        """Deep validation of params before anything starts; raise ParamError(field, message)."""

    def attach(self, context: EngineContext) -> None:
        """Connect the engine to what runs it (the runtime, or a test harness); called before `setup()`."""
        self._context = context

    @property
    def context(self) -> EngineContext:
        """The link to what runs this engine: hand it to helper objects that send or count busy time."""
        return self._context

    @property
    def stopping(self) -> threading.Event:
        """Set when the engine should stop: a source ends its `generate()`, worker threads stop waiting."""
        return self._context.stopping

    @property
    def log(self) -> logging.Logger:
        """This engine's logger (`graphflow.engine.<id>`)."""
        return self._context.log

    def setup(self) -> None:
        """Open what `process` needs (models, files, sockets). If it raises, it must release what it opened:
        `teardown()` runs only after a `setup()` that returned."""

    def process(self, msg: Message) -> Any:
        """Handle one input message; may send zero, one or many messages. May be `async def`."""
        raise NotImplementedError(f"{type(self).__name__} must implement process() (or generate() for a source)")

    def generate(self) -> Iterator[Message | None]:
        """A source's messages, each sent to `out`; yield None as a heartbeat while nothing is ready."""
        raise NotImplementedError(f"{type(self).__name__} has no inputs, so it must implement generate()")

    def flush(self) -> Any:
        """End of stream on every input: send what is still held back."""

    def teardown(self) -> None:
        """Release what `setup` opened; called once, after a `setup()` that returned."""

    def metrics(self) -> dict[str, Any]:
        """Engine-specific figures (JSON-able) for progress, the launch summary and `--stats FILE`; called only
        after a `setup()` that returned."""
        return {}

    def on_stream_end(self, stream: str) -> None:
        """Stream `stream` has ended (its source finished it, or it was removed from a running service): free what
        the engine holds for it. Called after the stream's last message; the runtime then passes the end on
        downstream, so an engine that still holds frames of the stream must send them before returning."""

    def pass_end(self, end: StreamEnd) -> None:
        """Pass a stream's end on, after `on_stream_end`: by default at once, on every output port. An engine whose
        frames of the stream may still be in its own threads (infer) sends it once they have left."""
        for port in self.outputs:
            self.send(end, port)

    def on_command(self, op: str, args: dict[str, Any]) -> Any:
        """A command from the launcher (the service adding a stream, changing rules…), run in a control thread:
        keep it thread-safe. Returns a JSON-able result; unknown commands are errors."""
        raise ValueError(f"engine {self.id!r} ({type(self).__name__}) has no command {op!r}")

    def send(self, msg: Message, port: str = "out") -> None:
        """Send `msg` on an output port (from any thread of the engine). Do not modify `msg` or its
        arrays after sending it. Raises `graphflow.Stopped` when the graph is shutting down."""
        self._context.send(msg, port)

    def busy(self) -> AbstractContextManager[None]:
        """Count the enclosed work, done in a thread the engine started (e.g. a model run), as this engine's busy
        time; work in `process`/`generate` is counted already. Keep sends outside the block."""
        return self._context.busy()

    def alloc(self, shape: tuple[int, ...], dtype: Any = np.uint8, port: str = "out") -> np.ndarray:
        """A writable array that `send` passes on without a copy (a shared-memory slot across processes)."""
        return self._context.alloc(shape, dtype, port)
