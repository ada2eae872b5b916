"""Decode: the source engine that turns video files, rtsp:// streams and image folders into frame messages.

One decoding thread per source (PyAV releases the GIL while decoding) fills a bounded queue that
`generate()` drains, so sources progress in parallel and a slow consumer back-pressures them.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphflow import Engine, Message, Param, ParamError
from graphflow.vision.video import Frame, Source, SourceError, SourceSpec, open_source

SOURCE_FIELDS = {"id", "uri", "fps", "start", "max_frames", "loop", "transport", "hwaccel"}
HEARTBEAT_S = 0.1
RECONNECT_MAX_S = 30.0


@dataclass
class _Done:
    """Queue marker: the source `stream` has ended, with `error` set if it failed."""

    stream: str
    error: str | None = None


class Decode(Engine):
    """Decodes video files, rtsp:// streams and image folders into BGR/RGB frame messages, one stream per source."""

    inputs = ()
    outputs = ("out",)
    sources = Param(list, doc='list of {"id", "uri", "fps", "start", "max_frames", "loop", "transport", "hwaccel"}')
    color = Param(str, "bgr", choices=("bgr", "rgb"), doc="channel order of arrays['image']")
    queue_size = Param(int, 8, ge=1, doc="decoded frames buffered per source before its thread waits")
    reconnect = Param(bool, True, doc="reopen a network stream that ends or fails, with back-off up to 30 s")

    def check(self) -> None:
        if not self.sources:
            raise ParamError("sources", "needs at least one source")
        self._specs: dict[str, SourceSpec] = {}
        for i, entry in enumerate(self.sources):
            stream, spec = self._spec(i, entry)
            if stream in self._specs:
                raise ParamError(f"sources[{i}].id", f"duplicate stream id {stream!r}")
            self._specs[stream] = spec

    def _spec(self, i: int, entry: Any) -> tuple[str, SourceSpec]:
        """The stream id and SourceSpec of `sources[i]`, or ParamError naming the wrong field."""
        where = f"sources[{i}]"
        if not isinstance(entry, dict):
            raise ParamError(where, f"must be an object with at least a 'uri' (got {entry!r})")
        unknown = set(entry) - SOURCE_FIELDS
        if unknown:
            known = ", ".join(sorted(SOURCE_FIELDS))
            raise ParamError(f"{where}.{sorted(unknown)[0]}", f"unknown field (known: {known})")
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri:
            raise ParamError(f"{where}.uri", f"required, a file, folder or rtsp:// address (got {uri!r})")
        fields = {k: v for k, v in entry.items() if k not in ("id", "uri") and v is not None}
        try:
            spec = SourceSpec(uri=uri, color=self.color, **fields)
        except SourceError as exc:
            why = str(exc).split(": ", 1)[-1].removeprefix(f"{exc.field} ")
            raise ParamError(f"{where}.{exc.field}" if exc.field else where, why) from None
        if not spec.is_stream and not Path(uri).exists():
            raise ParamError(f"{where}.uri", f"file not found: {uri}")
        return str(entry.get("id", i)), spec

    def generate(self) -> Iterator[Message | None]:
        if not hasattr(self, "_specs"):
            self.check()
        frames: queue.Queue[tuple[str, Frame] | _Done] = queue.Queue(self.queue_size * len(self._specs))
        halt = threading.Event()
        threads = [threading.Thread(target=self._read, args=(stream, spec, frames, halt), name=f"{self.id}:{stream}",
                                    daemon=True) for stream, spec in self._specs.items()]
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running and not self.stopping.is_set():
                try:
                    item = frames.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    yield None
                    continue
                if isinstance(item, _Done):
                    running -= 1
                    if item.error:
                        raise SourceError(item.error)
                    continue
                yield self._message(*item)
        finally:
            halt.set()
            while any(t.is_alive() for t in threads):
                self._drain(frames)
                for t in threads:
                    t.join(timeout=HEARTBEAT_S)

    def _message(self, stream: str, frame: Frame) -> Message:
        """A frame message around the decoder's own array (already a fresh buffer: no further copy)."""
        image = frame.image
        height, width = image.shape[:2]
        return Message(stream=stream, seq=frame.index, pts=frame.pts, arrays={"image": image},
                       data={"width": width, "height": height, "color": self.color}, times={"capture": frame.capture})

    def _read(self, stream: str, spec: SourceSpec, frames: queue.Queue, halt: threading.Event) -> None:
        """Thread body: decode one source into `frames` until it ends, fails or `halt` is set; a network
        stream is reopened with back-off and its seq numbers carry on."""
        error, delay, base = None, 1.0, 0
        while not halt.is_set():
            source: Source | None = None
            try:
                source = open_source(spec)
                for frame in source:
                    frame.index += base
                    if not self._put(frames, (stream, frame), halt):
                        return
                    delay = 1.0
                self.log.info("%s: %s", stream, source.stats)
                error = None
            except SourceError as exc:
                error = str(exc)
            finally:
                if source is not None:
                    base += source.stats.kept
                    source.close()
            if not (spec.is_stream and self.reconnect) or halt.wait(delay):
                break
            self.log.warning("%s: stream ended (%s); reconnecting in %.0f s", stream, error or "end of stream", delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        self._put(frames, _Done(stream, error), halt)

    @staticmethod
    def _put(frames: queue.Queue, item: Any, halt: threading.Event) -> bool:
        """Put `item`, waiting while the queue is full; False once `halt` is set."""
        while not halt.is_set():
            try:
                frames.put(item, timeout=HEARTBEAT_S)
                return True
            except queue.Full:
                continue
        return False

    @staticmethod
    def _drain(frames: queue.Queue) -> None:
        while True:
            try:
                frames.get_nowait()
            except queue.Empty:
                return
