"""Run one engine in the calling thread, without a graph: the quickest way to test an Engine."""
from __future__ import annotations

import inspect
import threading
import time
from types import TracebackType
from typing import Any

import anyio

from graphflow.engine import Engine, EngineContext
from graphflow.message import Message, StreamEnd


def call(fn: Any, *args: Any) -> Any:
    """Call a sync or async engine hook and return its result."""
    result = fn(*args)
    if inspect.isawaitable(result):
        async def wait() -> Any:
            return await result
        return anyio.run(wait)
    return result


class Harness:
    """One engine driven by a test as the runtime drives it: attached, checked and set up by `start()`; then fed with
    `feed`/`end`/`flush`; `close()` tears it down (only after a setup that returned). What the engine sends, from any
    of its threads, is kept per output port in `out`, with the `time.monotonic()` of each send in `sent_at`."""

    def __init__(self, cls: type[Engine] | Engine, params: dict[str, Any] | None = None) -> None:
        self.engine = cls if isinstance(cls, Engine) else cls("test", params or {})
        self.out: dict[str, list[Message | StreamEnd]] = {p: [] for p in self.engine.outputs}
        self.sent_at: dict[str, list[float]] = {p: [] for p in self.engine.outputs}
        self._sent = threading.Condition()
        self.context = EngineContext(self.engine.id, self._record, stopping=self.engine.stopping, log=self.engine.log)
        self.engine.attach(self.context)
        self.set_up = False

    def _record(self, msg: Message | StreamEnd, port: str) -> None:
        if port not in self.out:
            raise ValueError(f"engine {self.engine.id!r} has no output port {port!r} (has: {', '.join(self.out)})")
        with self._sent:
            self.out[port].append(msg)
            self.sent_at[port].append(time.monotonic())
            self._sent.notify_all()

    def start(self) -> Harness:
        """check() then setup(), as the runtime does before the first message."""
        self.engine.check()
        self.engine.setup()
        self.set_up = True
        return self

    def feed(self, msg: Message, port: str = "in") -> None:
        """Hand `msg` to `process()` as arriving on input `port`."""
        msg.port = port
        call(self.engine.process, msg)

    def end(self, end: StreamEnd) -> None:
        """A stream's end, as the runtime passes it: `on_stream_end`, then `pass_end`."""
        call(self.engine.on_stream_end, end.stream)
        self.engine.pass_end(end)

    def flush(self) -> None:
        call(self.engine.flush)

    def wait_sent(self, count: int, port: str = "out", timeout: float = 60.0) -> bool:
        """Wait until `count` messages were sent on `port` (by any thread of the engine); False after `timeout` s."""
        with self._sent:
            return self._sent.wait_for(lambda: len(self.out[port]) >= count, timeout)

    @property
    def busy_s(self) -> float:
        """Busy time the engine's own threads counted (`Engine.busy()`)."""
        return self.context.busy_s

    def close(self) -> None:
        """teardown(), once, if setup() returned."""
        if self.set_up:
            self.set_up = False
            self.engine.teardown()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def start_engine(cls: type[Engine] | Engine, params: dict[str, Any] | None = None) -> Harness:
    """A Harness for `cls` (a class, built with `params`, or an engine instance), checked and set up; use it as a
    context manager so the engine is torn down."""
    return Harness(cls, params).start()


def run_engine(cls: type[Engine] | Engine, params: dict[str, Any] | list[Message | StreamEnd] | None = None,
               messages: list[Message | StreamEnd] = (), port: str = "in") -> dict[str, list[Message]]:
    """Feed `messages` (a list, or an iterable read as it is fed) to a fresh engine's `port`, flush, tear down;
    return its outputs per port. A StreamEnd among them goes to `on_stream_end` and is passed on as the runtime
    does. `run_engine(engine, [msgs])`, the messages second, works too (an engine instance has its params already);
    anything else is a one-line TypeError."""
    if isinstance(params, (list, tuple)) and not messages:
        params, messages = None, params
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"run_engine: params must be a dict of param → value (got {type(params).__name__}); "
                        "give messages as messages=[...]")
    with start_engine(cls, params) as harness:
        for i, msg in enumerate(messages):  # messages may be a generator that waits on the engine: read lazily
            if not isinstance(msg, (Message, StreamEnd)):
                raise TypeError(f"run_engine: messages[{i}] is a {type(msg).__name__}, not a graphflow.Message "
                                "(Message(stream=..., data={...})) or StreamEnd")
            if isinstance(msg, StreamEnd):
                harness.end(msg)
            else:
                harness.feed(msg, port)
        harness.flush()
    return harness.out


def run_source(cls: type[Engine] | Engine, params: dict[str, Any] | None = None, limit: int | None = None,
               ends: bool = False) -> list[Message]:
    """Drain a source engine's `generate()` (up to `limit` messages) and return what it produced; each stream's
    StreamEnd marker too with `ends`."""
    with start_engine(cls, params) as harness:
        got = harness.out["out"]
        try:
            gen = harness.engine.generate()
            try:
                for msg in gen:
                    if msg is not None and (ends or not isinstance(msg, StreamEnd)):
                        got.append(msg)
                    if limit is not None and len(got) >= limit:
                        break
            finally:
                gen.close()
            harness.flush()
        finally:
            harness.engine.stopping.set()
    return got
