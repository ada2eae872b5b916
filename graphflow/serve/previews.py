"""Live previews for the dashboard: annotated JPEGs of the streams somebody is watching, capped in rate and size.

The service's tap offers every frame. A frame is copied only when its stream has a viewer and its last preview is
older than its interval (half that for a frame with events, so most events get their picture); a worker thread
scales, annotates (the OSD's Overlay) and JPEG-encodes it, so the pipeline never waits for an encoder and an
unwatched stream costs a dict lookup. The work is bounded whatever the number of viewers: a stream's interval is
1/max_fps, or longer when the watched streams together would pass `total_fps`, and no frame is copied while
`max_queued` wait for the worker (each waiting copy is a full frame)."""
from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from graphflow.message import Message
from graphflow.vision.osd import Overlay

log = logging.getLogger(__name__)

EVENT_PICTURES = 32  # JPEGs of frames with events kept per stream, for the dashboard's event list


@dataclass(frozen=True)
class Preview:
    """One encoded preview: `n` counts a stream's previews (1, 2, …), `frame` is the frame's seq."""

    n: int
    frame: int
    time: float
    jpeg: bytes
    width: int
    height: int


@dataclass
class _Job:
    frame: int
    image: np.ndarray
    color: str
    objects: list[dict[str, Any]]
    rules: list[dict[str, Any]]
    events: list[dict[str, Any]]


@dataclass
class _Stream:
    """What the previews hold for one stream."""

    viewers: int = 0
    ended: bool = False  # the stream ended while watched: dropped when its last viewer leaves
    hold_until: float = 0.0  # a snapshot reader counts as a viewer until then (Previews.clock)
    overlay: Overlay = field(default_factory=Overlay)
    job: _Job | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # of frames not rendered, flashed at the next one
    offered_at: float = 0.0
    latest: Preview | None = None
    count: int = 0
    pictures: OrderedDict[int, Preview] = field(default_factory=OrderedDict)
    info: dict[str, Any] = field(default_factory=dict)


def scaled(objects: Sequence[Mapping[str, Any]], rules: Sequence[Mapping[str, Any]],
           factor: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Boxes and rule geometry (pixels) multiplied by `factor`, to draw them on a resized frame."""
    objs = [{**o, "box": [float(v) * factor for v in o["box"]]} for o in objects if "box" in o]
    out = []
    for rule in rules:
        rule = dict(rule)
        for key in ("line", "polygon"):
            if key in rule:
                rule[key] = [[float(x) * factor, float(y) * factor] for x, y in rule[key]]
        out.append(rule)
    return objs, out


class Previews:
    """Annotated JPEG previews per stream, encoded only while a viewer watches (`watch`), at most `max_fps` per
    stream and `max_width` pixels wide. `offer` is cheap and never blocks; `latest`, `wait` and `next` read.
    `clock` (seconds) paces the rate cap and snapshot holds; tests pass their own."""

    def __init__(self, max_fps: float = 5.0, max_width: int = 640, quality: int = 70, trail: int = 30,
                 flash: int = 10, clock: Callable[[], float] = time.monotonic, total_fps: float = 40.0,
                 max_queued: int = 4) -> None:
        if max_fps <= 0 or max_width < 16 or not 1 <= quality <= 95 or total_fps <= 0 or max_queued < 1:
            raise ValueError(f"previews: max_fps > 0, max_width ≥ 16, quality 1..95, total_fps > 0 and "
                             f"max_queued ≥ 1 (got {max_fps}, {max_width}, {quality}, {total_fps}, {max_queued})")
        self.max_fps, self.max_width, self.quality = max_fps, max_width, quality
        self.total_fps, self.max_queued = total_fps, max_queued
        self.skipped = 0  # frames not copied because max_queued were waiting for the worker
        self.trail, self.flash, self.clock = trail, flash, clock
        self.streams: dict[str, _Stream] = {}
        self.encoded = 0  # JPEGs made, all streams
        self.encode_s = 0.0  # seconds spent scaling, drawing and encoding them
        self._cond = threading.Condition()  # guards the state; notified when a preview is published
        self._work = threading.Condition(self._cond)  # same lock; notified when a job is queued for the worker
        self._ready: deque[str] = deque()  # streams with a job queued
        self._async_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self._watched = (float("-inf"), 0)  # (when counted, streams watched then)

    # the tap's side --------------------------------------------------------------------------------------------
    def offer(self, msg: Message) -> None:
        """Called with every frame message at the end of the graph; queues a copy for encoding when wanted."""
        state = self.streams.get(msg.stream)
        now = self.clock()
        if state is None or not (state.viewers or state.hold_until > now):
            return
        rules = msg.data.get("rules")
        if rules is not None:
            state.info = {"rules": rules, "width": msg.data.get("width"), "height": msg.data.get("height"),
                          "frame": msg.seq}
        image = msg.arrays.get("image")
        if image is None:
            return
        events = msg.data.get("events") or []
        if now - state.offered_at < (0.5 if events else 1.0) * self.interval(now):  # events may double the rate
            state.events.extend(events)
            return
        if state.job is None and len(self._ready) >= self.max_queued:  # the worker is behind: copy nothing more
            state.events.extend(events)
            self.skipped += 1
            return
        state.offered_at = now
        job = _Job(msg.seq, np.array(image, copy=True), msg.data.get("color", "bgr"),
                   list(msg.data.get("tracks", msg.data.get("detections", ())) or ()), list(rules or ()),
                   state.events + list(events))
        state.events = []
        with self._cond:
            pending = state.job
            state.job = job  # when the worker is behind, the newest frame wins; the replaced one's events flash on it
            if pending is not None:
                job.events = pending.events + job.events
            else:
                self._ready.append(msg.stream)
                self._work.notify()

    def interval(self, now: float) -> float:
        """Seconds between a watched stream's previews: 1/max_fps, longer when the watched streams together would
        pass total_fps. The watched streams are counted at most twice a second."""
        when, watched = self._watched
        if now - when > 0.5:
            watched = sum(1 for s in list(self.streams.values()) if s.viewers or s.hold_until > now)
            self._watched = (now, watched)
        return max(1.0 / self.max_fps, watched / self.total_fps)

    def forget(self, stream: str) -> None:
        """The stream ended: drop what is held for it (viewers still connected keep it known, with no picture)."""
        with self._cond:
            state = self.streams.get(stream)
            if state is None:
                return
            if state.viewers:
                self.streams[stream] = _Stream(viewers=state.viewers, ended=True,
                                               overlay=Overlay(self.trail, self.flash))
            else:
                del self.streams[stream]

    # the viewers' side ---------------------------------------------------------------------------------------
    @contextmanager
    def watch(self, stream: str) -> Iterator[None]:
        """Counts a viewer of `stream` for the duration of the block: previews are made only while one watches."""
        with self._cond:
            self._known(stream).viewers += 1
        try:
            yield
        finally:
            with self._cond:
                state = self.streams.get(stream)
                if state is not None:
                    state.viewers -= 1
                    if not state.viewers and state.ended:
                        del self.streams[stream]

    def hold(self, stream: str, seconds: float) -> None:
        """Count a viewer of `stream` for `seconds` more: a page that polls snapshots keeps its previews coming.
        Only for a stream being watched or watched before (`watch` makes it known)."""
        with self._cond:
            state = self.streams.get(stream)
            if state is not None and not state.ended:
                state.hold_until = max(state.hold_until, self.clock() + seconds)

    def _known(self, stream: str) -> _Stream:
        """The stream's state, made when missing; starts the worker. Call with the lock held."""
        if self._closed:
            raise RuntimeError("previews are closed")
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = _Stream(overlay=Overlay(self.trail, self.flash))
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="previews", daemon=True)
            self._worker.start()
        return state

    def viewers(self, stream: str) -> int:
        """Viewers of `stream` now (connections open; a snapshot hold counts as one)."""
        state = self.streams.get(stream)
        if state is None:
            return 0
        return state.viewers + int(state.hold_until > self.clock())

    def latest(self, stream: str) -> Preview | None:
        """The newest preview of `stream`, or None."""
        state = self.streams.get(stream)
        return state.latest if state is not None else None

    def picture(self, stream: str, frame: int) -> Preview | None:
        """The picture of the events of frame `frame` of `stream` (that frame's preview, or the next one drawn, which
        flashes them), if among the last EVENT_PICTURES kept; else None."""
        state = self.streams.get(stream)
        return state.pictures.get(frame) if state is not None else None

    def info(self, stream: str) -> dict[str, Any]:
        """The rule figures of the newest watched frame — {"rules" (pixels, counts), "width", "height", "frame"} —
        and "pictures": the frames with events whose picture is kept (`picture`)."""
        with self._cond:
            state = self.streams.get(stream)
            if state is None:
                return {"pictures": []}
            return {**state.info, "pictures": list(state.pictures)}

    def wait(self, stream: str, after: int = 0, timeout: float = 1.0) -> Preview | None:
        """Block until `stream` has a preview numbered above `after`; None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                latest = self.latest(stream)
                if latest is not None and latest.n > after:
                    return latest
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)

    async def next(self, stream: str, after: int = 0, timeout: float = 1.0) -> Preview | None:
        """As `wait`, for an asyncio task (the HTTP side): wakes on the worker's signal, holds no thread."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._async_waiters.setdefault(stream, set()).add(waiter)
        try:
            latest = self.latest(stream)
            if latest is not None and latest.n > after:
                return latest
            try:
                await asyncio.wait_for(waiter[1].wait(), timeout)
            except TimeoutError:
                return None
            latest = self.latest(stream)
            return latest if latest is not None and latest.n > after else None
        finally:
            with self._cond:
                waiters = self._async_waiters.get(stream)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._async_waiters[stream]

    def close(self) -> None:
        """Stop the worker; waiting readers return None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._work.notify_all()
        if self._worker is not None:
            self._worker.join(5)

    # the worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                stream = self._ready.popleft()
                state = self.streams.get(stream)
                job = state.job if state is not None else None
                if state is not None:
                    state.job = None
            if job is None:
                continue
            try:
                preview = self._encode(state, job)
            except Exception:  # a bad frame must not end previews for every stream
                log.exception("preview of stream %r frame %d failed", stream, job.frame)
                continue
            self._publish(stream, state, preview, job.events)

    def _encode(self, state: _Stream, job: _Job) -> Preview:
        started = time.perf_counter()
        image, objects, rules = job.image, job.objects, job.rules
        height, width = image.shape[:2]
        if width > self.max_width:
            factor = self.max_width / width
            size = (self.max_width, max(2, round(height * factor)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            objects, rules = scaled(objects, rules, factor)
        frame = state.overlay.render(image, job.frame, objects, rules, job.events, job.color)
        if job.color == "bgr":
            frame = frame[..., ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="JPEG", quality=self.quality)
        self.encode_s += time.perf_counter() - started
        self.encoded += 1
        return Preview(state.count + 1, job.frame, time.time(), buf.getvalue(), frame.shape[1], frame.shape[0])

    def _publish(self, stream: str, state: _Stream, preview: Preview, events: list[dict[str, Any]]) -> None:
        with self._cond:
            if self.streams.get(stream) is not state:  # forgotten meanwhile
                return
            state.count = preview.n
            state.latest = preview
            for frame in sorted({ev.get("frame", preview.frame) for ev in events}):  # of a frame not drawn, an
                state.pictures[frame] = preview  # event shows on the next one drawn, which flashes it
                while len(state.pictures) > EVENT_PICTURES:
                    state.pictures.popitem(last=False)
            self._cond.notify_all()
            waiters = list(self._async_waiters.get(stream, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                pass


def graph_png(graph: Any) -> bytes:
    """The `graphflow inspect` picture of a Graph as PNG bytes, for the dashboard's graph page."""
    import matplotlib.pyplot as plt

    from graphflow.graph.render import figure

    fig = figure(graph)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()
