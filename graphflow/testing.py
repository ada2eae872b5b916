"""Run one engine in the calling thread, without a graph: the quickest way to test an Engine."""
from __future__ import annotations

import inspect
from typing import Any

import anyio

from .engine import Engine
from .message import Message, StreamEnd


def call(fn: Any, *args: Any) -> Any:
    """Call a sync or async engine hook and return its result."""
    result = fn(*args)
    if inspect.isawaitable(result):
        async def wait() -> Any:
            return await result
        return anyio.run(wait)
    return result


def _start(cls: type[Engine] | Engine, params: dict[str, Any] | None) -> tuple[Engine, dict[str, list[Message]]]:
    engine = cls if isinstance(cls, Engine) else cls("test", params or {})
    out: dict[str, list[Message]] = {p: [] for p in engine.outputs}

    def send(msg: Message, port: str) -> None:
        if port not in out:
            raise ValueError(f"engine {engine.id!r} has no output port {port!r} (has: {', '.join(out)})")
        out[port].append(msg)

    engine._send = send
    engine.check()
    engine.setup()
    return engine, out


def run_engine(cls: type[Engine] | Engine, params: dict[str, Any] | None = None,
               messages: list[Message | StreamEnd] = (), port: str = "in") -> dict[str, list[Message]]:
    """Feed `messages` to a fresh engine's `port`, flush, tear down; return its outputs per port. A StreamEnd
    among them goes to `on_stream_end` and is passed on as the runtime does."""
    engine, out = _start(cls, params)
    try:
        for msg in messages:
            if isinstance(msg, StreamEnd):
                call(engine.on_stream_end, msg.stream)
                engine.pass_end(msg)
                continue
            msg.port = port
            call(engine.process, msg)
        call(engine.flush)
    finally:
        engine.teardown()
    return out


def run_source(cls: type[Engine] | Engine, params: dict[str, Any] | None = None, limit: int | None = None,
               ends: bool = False) -> list[Message]:
    """Drain a source engine's `generate()` (up to `limit` messages) and return what it produced; each stream's
    StreamEnd marker too with `ends`."""
    engine, out = _start(cls, params)
    try:
        gen = engine.generate()
        try:
            for msg in gen:
                if msg is not None and (ends or not isinstance(msg, StreamEnd)):
                    out["out"].append(msg)
                if limit is not None and len(out["out"]) >= limit:
                    break
        finally:
            gen.close()
        call(engine.flush)
    finally:
        engine.stopping.set()
        engine.teardown()
    return out["out"]
