"""What the service knows of a stream: its id and source checks, and its latency meter."""
from __future__ import annotations

import bisect
import ipaddress
import logging
import re
import stat
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.latency import StreamRecord
from graphflow.media.urls import redact

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0)
ID_MAX = 64
# A stream id names files (`{stream}` in sink paths), URL paths and metric labels: letters, digits, '_', '-' and '.',
# starting with a letter or digit (as a task id), so it is never a path step ('..'), an option, markup or a
# header-breaking character.
ID_RULE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{ID_MAX - 1}}}")
ID_FORM = f"1 to {ID_MAX} of A-Z a-z 0-9 _ - . (starting with a letter or digit)"
LAG_WINDOW_S = 5.0  # a stream lags while frames of it were dropped within this window, or while ...
LAG_LATENCY_S = 5.0  # ... the median latency of its frames of this window is above this


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_stream_uri(spec: dict[str, Any], media_roots: list[Path]) -> None:
    """A stream's `uri` must be an rtsp:// address or a file under a media root; a file's is made absolute in
    `spec`, so a restored (or moved) stream opens the same file whatever the current folder."""
    uri = spec.get("uri")
    if not isinstance(uri, str) or not uri:
        raise GraphflowError("streams: 'uri' must be a file under a media root or an rtsp:// address")
    if "://" in uri:
        if not uri.startswith(("rtsp://", "rtsps://")):
            raise GraphflowError(f"streams.uri: scheme not allowed (rtsp:// or a file under a media root; got {uri!r})")
        return
    path = Path(uri).expanduser().resolve()
    if not any(path.is_relative_to(root) for root in media_roots):
        roots = ", ".join(map(str, media_roots)) or "none configured (--media)"
        raise GraphflowError(f"streams.uri: {uri!r} is not under a media root ({roots})")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None  # missing: the decode engine says so
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a fifo or device would block decode
        raise GraphflowError(f"streams.uri: {uri!r} is not a regular file or a folder of images")
    spec["uri"] = str(path)


def stream_id(spec: dict[str, Any]) -> str:
    """A new stream's `id`, checked against ID_RULE."""
    stream = spec.get("id")
    if not isinstance(stream, str) or not ID_RULE.fullmatch(stream):
        shown = repr(stream if not isinstance(stream, str) or len(stream) <= 40 else stream[:40] + "…")
        raise GraphflowError(f"streams.id: must be {ID_FORM} (got {shown})")
    return stream


def clashing(stream: str, ids: Iterable[str]) -> str | None:
    """The id among `ids` that `stream` is, or would share file names with on a case-blind file system; else None."""
    folded = stream.casefold()
    return next((other for other in ids if other.casefold() == folded), None)


class RedactCredentials(logging.Filter):
    """A logging filter that hides URL credentials in every record it passes (message and arguments merged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), None
        return True


def each_stream(ids: list[str], one: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """`one(stream)` for each of `ids`, leaving out a stream removed meanwhile (`one` raised KeyError)."""
    out = []
    for stream in ids:
        try:
            out.append(one(stream))
        except KeyError:
            pass
    return out


class StreamMeter:
    """Frames, fps (over the last 5 s), events and capture→tap latency of one stream, as the tap sees them: the
    latency percentiles from a StreamRecord (graphflow.latency, as a batching stage keeps per stream), plus cumulative buckets for Prometheus."""

    def __init__(self) -> None:
        self.frames = 0
        self.events = 0
        self.recent: deque[float] = deque(maxlen=512)  # arrival times (monotonic)
        self.latency = StreamRecord()
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # counts per bucket for Prometheus (last: +Inf)
        self.latency_sum = 0.0
        self.recent_latency: deque[tuple[float, float]] = deque(maxlen=512)  # (arrival, latency)
        self.lagging = False
        self.drops = 0  # frames of it dropped on the way, as last seen
        self.dropped_at = -LAG_WINDOW_S  # when its drops last grew (monotonic)

    def add(self, now: float, latency: float | None) -> None:
        self.frames += 1
        self.recent.append(now)
        if latency is not None:
            self.recent_latency.append((now, latency))
            self.latency.add(latency)
            self.latency_sum += latency
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1

    def fps(self, now: float) -> float:
        window = [t for t in self.recent if now - t <= 5.0]
        if len(window) < 2:
            return 0.0
        return (len(window) - 1) / max(window[-1] - window[0], 1e-6)

    def watch(self, now: float, drops: int) -> bool | None:
        """Update the lag state from the stream's drops so far: True when it starts lagging, False when it keeps up
        again, None when nothing changed."""
        if drops > self.drops:
            self.dropped_at = now
        self.drops = drops
        late = sorted(lat for t, lat in self.recent_latency if now - t <= LAG_WINDOW_S)
        lagging = now - self.dropped_at <= LAG_WINDOW_S or bool(late) and late[len(late) // 2] > LAG_LATENCY_S
        if lagging == self.lagging:
            return None
        self.lagging = lagging
        return lagging

    def percentiles(self) -> dict[str, float | None]:
        p50, p95 = self.latency.percentiles_ms()
        return {"p50": p50, "p95": p95}
