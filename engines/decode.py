"""Decode: the source engine that turns video files, rtsp:// streams and image folders into frame messages.

One decoding thread per source (PyAV releases the GIL while decoding) fills a bounded queue that
`generate()` drains, so sources progress in parallel and a slow consumer back-pressures them. A network
stream that drops is reopened with capped exponential back-off; its seq and pts carry on across the gap.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from graphflow import Engine, Message, Param, ParamError
from graphflow.vision.video import Frame, Source, SourceError, SourceSpec, SourceStats, local_path, open_source

SOURCE_FIELDS = {"id"} | set(SourceSpec.__dataclass_fields__) - {"color"}  # color is the engine's, for all sources
HEARTBEAT_S = 0.1
JOIN_S = 2.0  # how long shutdown waits for a thread stuck in a network read (it ends at its read_timeout)
COUNTERS = ("decoded", "fps_dropped", "kept", "discarded", "corrupt", "disconnects", "reconnects", "failed_attempts")


@dataclass
class _Done:
    """Queue marker: the source `stream` has ended (its feed says whether it failed)."""

    stream: str


@dataclass
class _Feed:
    """One source across its sessions (a session = one open connection or file pass): counters and state."""

    spec: SourceSpec
    totals: SourceStats = field(default_factory=SourceStats)
    source: Source | None = None
    discarded: int = 0  # frames decoded but not passed on because the graph stopped
    disconnects: int = 0  # a stream that was delivering frames ended or failed
    reconnects: int = 0  # a stream delivered frames again after a disconnect
    failed_attempts: int = 0  # connections that failed or gave no frame
    state: str = "starting"
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, source: Source) -> None:
        with self.lock:
            self.source, self.state = source, "running"

    def end(self) -> Source | None:
        """Close the session's source and fold its counters into the totals; return it (None if none opened)."""
        with self.lock:
            source, self.source = self.source, None
            if source is None:
                return None
            for f in dataclasses.fields(SourceStats):
                setattr(self.totals, f.name, getattr(self.totals, f.name) + getattr(source.stats, f.name))
        source.close()
        return source

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            live = self.source.stats if self.source is not None else SourceStats()
            t = self.totals
            return {"decoded": t.decoded + live.decoded, "fps_dropped": t.dropped + live.dropped,
                    "kept": t.kept + live.kept, "discarded": self.discarded, "corrupt": t.corrupt + live.corrupt,
                    "disconnects": self.disconnects, "reconnects": self.reconnects,
                    "failed_attempts": self.failed_attempts, "state": self.state, "error": self.error}


class Decode(Engine):
    """Decodes video files, rtsp:// streams and image folders into BGR/RGB frame messages, one stream per source."""

    inputs = ()
    outputs = ("out",)
    sources = Param(list, doc='list of {"id", "uri", "fps", "start", "max_frames", "loop", "transport", '
                               '"open_timeout", "read_timeout", "hwaccel"}')
    color = Param(str, "bgr", choices=("bgr", "rgb"), doc="channel order of arrays['image']")
    queue_size = Param(int, 8, ge=1, doc="decoded frames buffered per source before its thread waits")
    reconnect = Param(bool, True, doc="reopen a network stream that ends or fails, with capped exponential back-off")
    retry = Param(float, 1.0, ge=0.01, doc="first reconnect delay in seconds, doubled per failed attempt")
    retry_max = Param(float, 30.0, ge=0.01, doc="cap on the reconnect delay in seconds")
    attempts = Param(int, 10, ge=0, doc="failed connection attempts in a row before a stream is given up (0: never)")

    def check(self) -> None:
        if not self.sources:
            raise ParamError("sources", "needs at least one source")
        if self.retry_max < self.retry:
            raise ParamError("retry_max", f"must be ≥ retry ({self.retry:g} s) (got {self.retry_max:g})")
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
        stream = entry.get("id", str(i))
        if not isinstance(stream, (str, int)) or isinstance(stream, bool) or stream == "":
            raise ParamError(f"{where}.id", f"must be a non-empty string or an integer (got {stream!r})")
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri:
            raise ParamError(f"{where}.uri", f"required, a file, folder or rtsp:// address (got {uri!r})")
        fields = {k: v for k, v in entry.items() if k not in ("id", "uri") and v is not None}
        try:
            spec = SourceSpec(uri=uri, color=self.color, **fields)
        except SourceError as exc:
            why = str(exc).split(": ", 1)[-1].removeprefix(f"{exc.field} ")
            raise ParamError(f"{where}.{exc.field}" if exc.field else where, why) from None
        if not spec.is_stream and local_path(uri) is None:
            raise ParamError(f"{where}.uri", f"file not found: {uri!r}")
        return str(stream), spec

    def generate(self) -> Iterator[Message | None]:
        if not hasattr(self, "_specs"):
            self.check()
        self._feeds = {stream: _Feed(spec) for stream, spec in self._specs.items()}
        frames: queue.Queue[tuple[str, Frame] | _Done] = queue.Queue(self.queue_size * len(self._specs))
        halt = threading.Event()
        threads = [threading.Thread(target=self._read, args=(stream, feed, frames, halt), name=f"{self.id}:{stream}",
                                    daemon=True) for stream, feed in self._feeds.items()]
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
                    continue
                yield self._message(*item)
        finally:
            halt.set()
            self._join(threads, frames)
            for feed in self._feeds.values():
                feed.state = feed.state if feed.state in ("ended", "failed") else "stopped"
        failed = [f.error for f in self._feeds.values() if f.error]
        if failed:
            raise SourceError(failed[0] if len(failed) == 1 else f"{len(failed)} sources failed: {'; '.join(failed)}")

    def metrics(self) -> dict[str, Any]:
        """Totals over all sources (printed in the launch summary) and per-source counters and state."""
        feeds = getattr(self, "_feeds", {})
        per = {stream: feed.snapshot() for stream, feed in feeds.items()}
        return {**{k: sum(p[k] for p in per.values()) for k in COUNTERS}, "sources": per}

    def _message(self, stream: str, frame: Frame) -> Message:
        """A frame message around the decoder's own array (already a fresh buffer: no further copy)."""
        image = frame.image
        height, width = image.shape[:2]
        return Message(stream=stream, seq=frame.index, pts=frame.pts, arrays={"image": image},
                       data={"width": width, "height": height, "color": self.color}, times={"capture": frame.capture})

    def _read(self, stream: str, feed: _Feed, frames: queue.Queue, halt: threading.Event) -> None:
        """Thread body: decode one source into `frames` until it ends, fails or `halt` is set. A network stream
        is reopened after `retry` s, the delay doubling up to `retry_max` while attempts fail, until `attempts`
        failures in a row; seq numbers carry on and pts are shifted to follow on in wall-clock time."""
        spec = feed.spec
        delay, failures, base = self.retry, 0, 0
        last: tuple[float, float] | None = None  # (pts, capture) of the last frame passed on
        lost_at = 0.0
        while not halt.is_set():
            got, shift, error = 0, 0.0, ""
            try:
                feed.begin(open_source(spec))
                for frame in feed.source:
                    if got == 0 and last is not None:
                        shift = last[0] + max(frame.capture - last[1], 1e-3) - frame.pts
                    got += 1
                    frame.index += base
                    frame.pts += shift
                    if not self._put(frames, (stream, frame), halt):
                        feed.discarded += 1
                        return
                    last = frame.pts, frame.capture
                    if got == 1 and feed.disconnects:
                        feed.reconnects += 1
                        self.log.warning("%s: stream resumed after %.1f s (reconnect %d)", stream,
                                         time.monotonic() - lost_at, feed.reconnects)
            except SourceError as exc:
                error = str(exc)
            finally:
                ended = feed.end()
                base += ended.stats.kept if ended is not None else 0
            if halt.is_set():
                break
            if not (spec.is_stream and self.reconnect):
                feed.state, feed.error = ("failed", error) if error else ("ended", "")
                if error:
                    self.log.error("%s: %s", stream, error)
                break
            why = error or (ended.lost if ended is not None else "") or "end of stream"
            if got:
                feed.disconnects += 1
                lost_at, delay, failures = time.monotonic(), self.retry, 0
                self.log.warning("%s: stream lost (%s) after %d frames; reconnecting in %.3g s",
                                 stream, why, got, delay)
            else:
                feed.failed_attempts += 1
                failures += 1
                if self.attempts and failures >= self.attempts:
                    feed.state, feed.error = "failed", f"{why}; gave up after {failures} failed attempts"
                    self.log.error("%s: %s", stream, feed.error)
                    break
                self.log.warning("%s: %s; retry %d in %.3g s", stream, why, failures, delay)
            feed.state = "reconnecting"
            if halt.wait(delay):
                break
            delay = min(delay * 2, self.retry_max)
        self._put(frames, _Done(stream), halt)

    def _join(self, threads: list[threading.Thread], frames: queue.Queue) -> None:
        """Wait for the decoding threads, discarding (and counting) frames they still queue; a thread blocked
        in a network read past JOIN_S is left to end at its read timeout (it is a daemon)."""
        deadline = time.monotonic() + JOIN_S
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            self._drain(frames)
            for t in threads:
                t.join(timeout=HEARTBEAT_S)
        self._drain(frames)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.log.warning("decoding thread(s) %s still blocked in a read; left to time out", ", ".join(stuck))

    def _drain(self, frames: queue.Queue) -> None:
        while True:
            try:
                item = frames.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, _Done):
                self._feeds[item[0]].discarded += 1

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
