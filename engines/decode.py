"""Decode: the source engine that turns video files, rtsp:// streams and image folders into frame messages.

One decoding thread per source (PyAV releases the GIL while decoding) fills a bounded queue that
`generate()` drains, so sources progress in parallel and a slow consumer back-pressures them. A network
stream that drops is reopened with capped exponential back-off; its seq and pts carry on across the gap.
A source that fails for any reason ends alone, with a one-line error naming its stream; the others go on.
Each source's state (`metrics()["sources"][stream]["state"]`) is connecting (before its first frame), running,
reconnecting (after a loss), then ended, failed or stopped. After a restart the runtime's `resume` says where each
stream was: a file seeks past what was delivered, a live stream's seq carries on. `realtime` paces a file like a
camera. Sources can be added and removed while the engine runs (`add_source`, `remove_source`).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow import Engine, Message, Param, ParamError, StreamEnd
from graphflow.media.clips import ClipRequest
from graphflow.media.sources import open_source
from graphflow.media.video import MAX_PIXELS, Frame, Source, SourceError, SourceSpec, SourceStats, local_path
from graphflow.runtime.backoff import backoff
from graphflow.runtime.memory import release_free_memory

SOURCE_FIELDS = {"id"} | set(SourceSpec.__dataclass_fields__) - {"color", "max_pixels"}  # engine-wide, not per source
HEARTBEAT_S = 0.1
JOIN_S = 2.0  # how long shutdown waits for a thread stuck in a network read (it ends at its read_timeout)
COUNTERS = ("decoded", "fps_dropped", "kept", "discarded", "corrupt", "disconnects", "reconnects", "failed_attempts")


@dataclass
class _Done:
    """Queue marker: the source `stream` has ended (its feed says whether it failed or was removed)."""

    stream: str
    feed: _Feed


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
    state: str = "connecting"  # then running, reconnecting (after a loss); at the end ended, failed or stopped
    expected: int | None = None  # about how many frames it will give (Source.length), None when unknown
    error: str = ""
    removed: bool = False  # by `Decode.remove_source`: forgotten once its end has gone downstream
    finished: bool = False  # its thread's end was taken from the queue
    stop: threading.Event = field(default_factory=threading.Event)  # ends this source's thread
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, source: Source) -> None:
        with self.lock:
            self.source = source
            if self.expected is None:
                self.expected = source.length()

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
                    "failed_attempts": self.failed_attempts, "state": self.state, "error": self.error,
                    "expected": self.expected}


class _Pace:
    """Releases a file's frames at their pts in wall time from the first one on, as a camera would. A late frame
    (slow consumer) goes at once, none is skipped to catch up; each frame's capture time is when it was due."""

    def __init__(self) -> None:
        self.origin: tuple[float, float, float] | None = None  # pts, monotonic and wall time of the first frame

    def release(self, frame: Frame, halt: threading.Event) -> bool:
        """Wait until `frame` is due and stamp it; False if `halt` came first."""
        if self.origin is None:
            self.origin = frame.pts, time.monotonic(), time.time()
        pts0, mono0, wall0 = self.origin
        frame.capture = wall0 + frame.pts - pts0
        delay = mono0 + frame.pts - pts0 - time.monotonic()
        return delay <= 0 or not halt.wait(delay)


@dataclass
class _Playback:
    """Where one source's playback stands across its sessions: what to skip and add to seq, the retry counts, the
    last frame passed on and when frames stopped or last came (monotonic)."""

    skip: int  # frames of a file already delivered before a restart
    base: int  # added to each frame's index, so seq numbers carry on across sessions
    tries: int = 0  # waits since the last frame
    failures: int = 0  # failed attempts in a row
    last: tuple[float, float] | None = None  # (pts, capture) of the last frame passed on
    lost_at: float = 0.0
    last_frame_at: float = 0.0


class Decode(Engine):
    """Decodes video files, rtsp:// streams and image folders into BGR/RGB frame messages, one stream per source."""

    inputs = ()
    outputs = ("out",)
    path_fields = {"sources[].uri": "read"}  # local files and folders, relative to the graph file
    sources = Param(list, doc='list of {"id", "uri", "fps", "start", "max_frames", "loop", "realtime", "transport", '
                               '"open_timeout", "read_timeout", "hwaccel", "threads"}; realtime: release each frame of '
                               'a file at its pts in wall time, as a camera would; threads: decoder threads (default '
                               '1; 0: one per core, for a single high-resolution file decoded as fast as it goes)')
    color = Param(str, "bgr", choices=("bgr", "rgb"), doc="channel order of arrays['image']")
    queue_size = Param(int, 8, ge=1, le=10_000, doc="decoded frames buffered per source before its thread waits")
    reconnect = Param(bool, True, doc="reopen a network stream that ends or fails, with capped exponential back-off")
    retry = Param(float, 1.0, ge=0.01, le=3600, doc="first reconnect delay in seconds, doubled per failed attempt")
    retry_max = Param(float, 30.0, ge=0.01, le=3600, doc="cap on the reconnect delay in seconds")
    attempts = Param(int, 10, ge=0, doc="failed connection attempts in a row before a stream is given up (0: never)")
    give_up_s = Param(float, 30.0, ge=0, le=1_000_000, doc="seconds without a frame (connecting or reconnecting) "
                                                               "before a network stream is declared failed (0: never)")
    wait_for_sources = Param(bool, False, doc="keep running while no source is left (service mode: sources come "
                                              "and go through add_source/remove_source); ends only when stopped")
    max_pixels = Param(int, MAX_PIXELS, ge=1, doc="largest frame (width × height): a bigger image in a folder is "
                                                  "skipped with an error, a bigger video fails its source")

    def __init__(self, engine_id: str = "", params: dict[str, Any] | None = None) -> None:
        super().__init__(engine_id, params)
        self._lock = threading.Lock()  # guards the sources, feeds and threads that add/remove_source change
        self._feeds: dict[str, _Feed] = {}
        self._failed_removed = 0  # sources that failed and were removed since: their error still counts
        self._threads: list[threading.Thread] = []
        self._running = 0  # decoding threads whose end has not been taken from the queue yet
        self._live: tuple[queue.Queue, threading.Event] | None = None  # while generate() runs: its queue and halt

    def check(self) -> None:
        if not self.sources and not self.wait_for_sources:
            raise ParamError("sources", "needs at least one source (or wait_for_sources: true)")
        if self.retry_max < self.retry:
            raise ParamError("retry_max", f"must be ≥ retry ({self.retry:g} s) (got {self.retry_max:g})")
        self._specs: dict[str, SourceSpec] = {}
        for i, entry in enumerate(self.sources):
            stream, spec = self._spec(f"sources[{i}]", entry, str(i))
            if stream in self._specs:
                raise ParamError(f"sources[{i}].id", f"duplicate stream id {stream!r}")
            self._specs[stream] = spec

    def _spec(self, where: str, entry: Any, default_id: str) -> tuple[str, SourceSpec]:
        """The stream id and SourceSpec of one source entry, or ParamError naming the wrong field under `where`
        (`sources[i]` in the graph; "" for an entry given alone, whose fields are the user's own: `uri`)."""
        def at(key: str) -> str:
            return f"{where}.{key}" if where else key
        if not isinstance(entry, dict):
            raise ParamError(where, f"must be an object with at least a 'uri' (got {entry!r})")
        unknown = set(entry) - SOURCE_FIELDS
        if unknown:
            known = ", ".join(sorted(SOURCE_FIELDS))
            raise ParamError(at(sorted(unknown)[0]), f"unknown field (known: {known})")
        stream = entry.get("id", default_id)
        if not isinstance(stream, (str, int)) or isinstance(stream, bool) or stream == "":
            raise ParamError(at("id"), f"must be a non-empty string or an integer (got {stream!r})")
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri:
            raise ParamError(at("uri"), f"required, a file, folder or rtsp:// address (got {uri!r})")
        fields = {k: v for k, v in entry.items() if k not in ("id", "uri") and v is not None}
        try:
            spec = SourceSpec(uri=uri, color=self.color, max_pixels=self.max_pixels, **fields)
        except SourceError as exc:
            why = str(exc).split(": ", 1)[-1].removeprefix(f"{exc.field} ")
            raise ParamError(at(exc.field) if exc.field else where, why) from None
        if not spec.is_stream and local_path(uri) is None:
            raise ParamError(at("uri"), f"file not found: {uri!r}")
        return str(stream), spec

    def generate(self) -> Iterator[Message | StreamEnd | None]:
        """Frames of every source as they are decoded (each source's StreamEnd after its last frame), until all
        sources ended (or were removed) or the engine stops. A source that failed ends alone: its error was logged
        once, and `metrics()` counts it (`errors`) and keeps its state and error; the others end as usual."""
        if not hasattr(self, "_specs"):
            self.check()
        frames: queue.Queue[tuple[str, Frame] | _Done] = queue.Queue(self.queue_size * max(len(self._specs), 1))
        halt = threading.Event()
        with self._lock:
            self._feeds, self._threads, self._running, self._live = {}, [], 0, (frames, halt)
            for stream, spec in self._specs.items():
                self._start(stream, spec)
        try:
            while not self.stopping.is_set():
                with self._lock:
                    if not self._running and not self.wait_for_sources:
                        self._live = None
                        break
                try:
                    item = frames.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    yield None
                    continue
                if isinstance(item, _Done):
                    with self._lock:
                        self._running -= 1
                        item.feed.finished = True
                        if item.feed.removed:  # nothing is kept of a removed source once its end goes out
                            item.feed.state = item.feed.state if item.feed.state in ("ended", "failed") else "stopped"
                            if self._feeds.get(item.stream) is item.feed:
                                del self._feeds[item.stream]
                                self._failed_removed += item.feed.state == "failed"
                    yield StreamEnd(item.stream)
                    continue
                yield self._message(*item)
        finally:
            with self._lock:
                self._live, threads = None, list(self._threads)
            halt.set()
            for feed in self._feeds.values():
                feed.stop.set()
            self._join(threads, frames)
            for feed in self._feeds.values():
                feed.state = feed.state if feed.state in ("ended", "failed") else "stopped"

    def add_source(self, entry: dict[str, Any]) -> str:
        """Add a source while the engine runs (service mode), from any thread: checked like a `sources` entry
        (ParamError naming the entry's own field, `uri`, not an index into `sources` the user never wrote),
        decoded at once if `generate()` runs (else from its start: `check()` resets the sources to the `sources`
        param); returns its stream id."""
        if not hasattr(self, "_specs"):
            self.check()
        with self._lock:
            stream, spec = self._spec("", entry, str(len(self._specs)))
            if stream in self._specs:
                raise ParamError("id", f"duplicate stream id {stream!r}")
            old = self._feeds.get(stream)
            if self._live is not None and old is not None and not old.finished:
                raise ParamError("id", f"stream {stream!r} is still stopping; add it again after its end")
            self._specs[stream] = spec
            if self._live is not None:
                self._start(stream, spec)
        return stream

    def on_command(self, op: str, args: dict[str, Any]) -> Any:
        """`add_source` {"entry": {...}} → the stream id; `remove_source` {"stream"} (the service's streams)."""
        if op == "add_source":
            return self.add_source(args["entry"])
        if op == "remove_source":
            return self.remove_source(args["stream"])
        if op == "clip":
            return self.clip(args["stream"], float(args["start"]), float(args["end"]), Path(args["path"]))
        return super().on_command(op, args)

    def clip(self, stream: str, start: float, end: float, path: Path) -> None:
        """Write the stream's packets from `start` to `end` (seconds of its timeline) to `path` as an MP4, without
        re-encoding, once packets past `end` have come (media.clips); needs the source's `keep_packets_s`."""
        with self._lock:
            feed = self._feeds.get(stream)
        source = feed.source if feed is not None else None
        keeper = getattr(source, "clips", None)
        if keeper is None:
            raise ParamError("sources", f"stream {stream!r} keeps no packets for clips (it needs keep_packets_s, "
                                        "and a video file or stream, decoded on the CPU)")
        keeper.request(ClipRequest(start, end, path))

    def remove_source(self, stream: str) -> None:
        """Stop one source while the engine runs, from any thread. Frames of it already decoded still go out,
        then its StreamEnd, so engines downstream free what they hold for it (a source that had already ended
        sent its end then). With no source left, `generate()` ends unless `wait_for_sources`."""
        with self._lock:
            if stream not in self._specs:
                known = ", ".join(self._specs) or "none"
                raise ParamError("sources", f"no source with id {stream!r} (sources: {known})")
            del self._specs[stream]
            feed = self._feeds.get(stream) if self._live is not None else None
            if feed is not None:
                feed.removed = True
                feed.stop.set()

    def _start(self, stream: str, spec: SourceSpec) -> None:
        """Start the decoding thread of one source; the caller holds the lock and generate() runs."""
        assert self._live is not None
        frames, halt = self._live
        if self._running >= frames.maxsize // self.queue_size:
            with frames.mutex:  # a Queue reads its bound on every put: room for the new source's frames too
                frames.maxsize += self.queue_size
                frames.not_full.notify_all()
        feed = self._feeds[stream] = _Feed(spec)
        self._threads = [t for t in self._threads if t.is_alive()]  # sources come and go: keep the live ones
        thread = threading.Thread(target=self._read, args=(stream, feed, frames, halt), name=f"{self.id}:{stream}",
                                  daemon=True)
        self._threads.append(thread)
        self._running += 1
        thread.start()

    def metrics(self) -> dict[str, Any]:
        """Totals over all sources (printed in the launch summary) and per-source counters and state; `errors`, the
        sources that failed, is counted by the runtime as this engine's errors."""
        with self._lock:
            feeds, removed = dict(self._feeds), self._failed_removed
        per = {stream: feed.snapshot() for stream, feed in feeds.items()}
        failed = sum(p["state"] == "failed" for p in per.values())
        return {**{k: sum(p[k] for p in per.values()) for k in COUNTERS}, "failed": failed,
                "errors": failed + removed, "sources": per}

    def _message(self, stream: str, frame: Frame) -> Message:
        """A frame message around the decoder's own array (already a fresh buffer: no further copy); an image
        source's frames also say which file they came from (`data["file"]`, its name within the folder)."""
        image = frame.image
        height, width = image.shape[:2]
        data = {"width": width, "height": height, "color": self.color} | ({"file": frame.file} if frame.file else {})
        return Message(stream=stream, seq=frame.index, pts=frame.pts, arrays={"image": image}, data=data,
                       times={"capture": frame.capture})

    def _read(self, stream: str, feed: _Feed, frames: queue.Queue, halt: threading.Event) -> None:
        """Thread body: play one source until it ends or `feed.stop`, then queue its end unless the engine halts.
        Any exception fails this source alone, with a one-line error naming the stream (the traceback goes to the
        debug log), so the graph never waits on a dead thread."""
        try:
            self._play(stream, feed, frames, feed.stop)
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            self._give_up(stream, feed, f"source {feed.spec.shown}: {type(exc).__name__}{': ' + text if text else ''}")
            self.log.debug("%s: decoding thread failed", stream, exc_info=True)
        finally:
            self._put(frames, _Done(stream, feed), halt)
            release_free_memory()

    def _give_up(self, stream: str, feed: _Feed, why: str) -> None:
        feed.state, feed.error = "failed", f"stream {stream!r}: {why}"
        self.log.error("%s", feed.error)

    def _play(self, stream: str, feed: _Feed, frames: queue.Queue, halt: threading.Event) -> None:
        """Decode one source into `frames` until it ends, fails or `halt` is set. A network stream is reopened
        after `retry` s, the delay doubling up to `retry_max` while attempts fail, until `attempts` failures in a
        row or `give_up_s` without a frame; seq numbers carry on and pts are shifted to follow on in wall-clock
        time. After a restart (`resume`), a file goes on after its last delivered frame and a live stream's seq
        carries on from it."""
        at = self._start_point(stream, feed.spec)
        pace = _Pace() if feed.spec.realtime else None
        while not halt.is_set():
            result = self._session(stream, feed, at, frames, halt, pace)
            if result is None or halt.is_set():
                return
            wait = self._retry_wait(stream, feed, at, *result)
            if wait is None:
                return
            feed.state = "reconnecting" if feed.disconnects else "connecting"
            if halt.wait(wait):
                return

    def _start_point(self, stream: str, spec: SourceSpec) -> _Playback:
        """Where playback starts: from the beginning, or after a restart past the frames already delivered."""
        delivered = self.resume.get(stream)
        skip = 0 if delivered is None or spec.is_stream else int(delivered) + 1
        base = int(delivered) + 1 if delivered is not None and spec.is_stream else 0
        now = time.monotonic()
        return _Playback(skip, base, lost_at=now, last_frame_at=now)

    def _session(self, stream: str, feed: _Feed, at: _Playback, frames: queue.Queue, halt: threading.Event,
                 pace: _Pace | None) -> tuple[int, str, str] | None:
        """Open the source once and pass its frames on (seq carried on, pts following the last frame passed on)
        until it ends or fails: (frames passed on, the error, what the source says it lost); None when `halt`
        came while a frame waited to go."""
        got, shift, error, lost = 0, 0.0, "", ""
        try:
            feed.begin(open_source(feed.spec))
            for frame in feed.source.frames(at.skip):
                if got == 0 and at.last is not None:
                    shift = at.last[0] + max(frame.capture - at.last[1], 1e-3) - frame.pts
                got += 1
                frame.index += at.base
                frame.pts += shift
                if (pace is not None and not pace.release(frame, halt)) or \
                        not self._put(frames, (stream, frame), halt):
                    feed.discarded += 1
                    return None
                at.last, at.last_frame_at = (frame.pts, frame.capture), time.monotonic()
                if got == 1:
                    feed.state = "running"
                if got == 1 and feed.disconnects:
                    feed.reconnects += 1
                    self.log.warning("%s: stream resumed after %.1f s (reconnect %d)", stream,
                                     time.monotonic() - at.lost_at, feed.reconnects)
        except SourceError as exc:
            error = str(exc)
        finally:
            ended = feed.end()
            at.base += ended.stats.kept if ended is not None else 0
            lost = ended.lost if ended is not None else ""
        return got, error, lost

    def _retry_wait(self, stream: str, feed: _Feed, at: _Playback, got: int, error: str, lost: str) -> float | None:
        """After a session: seconds to wait before reopening a network stream, or None when the source is done (a
        file ended or failed, reconnects are off, or `attempts` / `give_up_s` ran out)."""
        if not (feed.spec.is_stream and self.reconnect):
            if error:
                self._give_up(stream, feed, error)
            else:
                feed.state = "ended"
            return None
        why = error or lost or "end of stream"
        if got:
            feed.disconnects += 1
            at.lost_at, at.tries, at.failures = time.monotonic(), 1, 0
            wait = backoff(at.tries, self.retry, self.retry_max)
            self.log.warning("%s: stream lost (%s) after %d frames; reconnecting in %.3g s", stream, why, got, wait)
            return wait
        feed.failed_attempts += 1
        at.tries, at.failures = at.tries + 1, at.failures + 1
        silent = time.monotonic() - at.last_frame_at
        if self.attempts and at.failures >= self.attempts:
            self._give_up(stream, feed, f"{why}; gave up after {at.failures} failed attempts")
            return None
        if self.give_up_s and silent >= self.give_up_s:
            self._give_up(stream, feed, f"{why}; gave up after {silent:.1f} s without a frame "
                                        f"(give_up_s {self.give_up_s:g})")
            return None
        wait = backoff(at.tries, self.retry, self.retry_max)
        wait = min(wait, self.give_up_s - silent) if self.give_up_s else wait  # one last try at the limit
        self.log.warning("%s: %s; retry %d in %.3g s", stream, why, at.failures, wait)
        return wait

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
