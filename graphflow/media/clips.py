"""Evidence clips without re-encoding: a stream's recent compressed packets kept in a ring, and a clip cut from
them remuxed into an MP4 — the packets copied as the camera sent them, from the key frame at or before the clip's
start, so a clip costs a file write, not a decode and an encode."""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

log = logging.getLogger(__name__)
MAX_PENDING = 64  # clips a source waits to finish at once; more are refused (counted by the caller)


@dataclass(frozen=True)
class KeptPacket:
    """One compressed packet: its bytes, timestamps (in the stream's time base), key flag and time in seconds."""

    data: bytes
    pts: int | None
    dts: int | None
    key: bool
    t: float


@dataclass
class ClipRequest:
    """A clip from `start` to `end` (seconds of the stream's timeline) to write at `path`; `done(path or None, why)`
    is called once it is written or given up."""

    start: float
    end: float
    path: Path
    done: Callable[[Path | None, str], None] | None = None


class PacketRing:
    """The last `keep_s` seconds of a stream's packets, always starting at a key frame (a clip must start at one)."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self.packets: deque[KeptPacket] = deque()
        self.bytes = 0

    def add(self, packet: KeptPacket) -> None:
        if self.packets and packet.t < self.packets[-1].t - 1.0:
            self.clear()  # the timeline went back (a file looped or was sought): older packets belong to another pass
        self.packets.append(packet)
        self.bytes += len(packet.data)
        cutoff = packet.t - self.keep_s
        while self._second_key_before(cutoff):
            while True:  # drop whole GOPs: up to (not including) the next key frame
                gone = self.packets.popleft()
                self.bytes -= len(gone.data)
                if self.packets[0].key:
                    break

    def _second_key_before(self, cutoff: float) -> bool:
        """Whether the GOP after the first one also starts before `cutoff` (then the first is not needed)."""
        for i, p in enumerate(self.packets):
            if i and p.key:
                return p.t <= cutoff
        return False

    def clear(self) -> None:
        self.packets.clear()
        self.bytes = 0

    def newest(self) -> float | None:
        return self.packets[-1].t if self.packets else None

    def between(self, start: float, end: float) -> list[KeptPacket]:
        """The packets from the last key frame at or before `start` (else the first kept) to `end`, in order."""
        kept = list(self.packets)
        first = 0
        for i, p in enumerate(kept):
            if p.key and p.t <= start + 1e-6:
                first = i
        while first < len(kept) and not kept[first].key:
            first += 1
        return [p for p in kept[first:] if p.t <= end + 1e-6]


def write_clip(path: Path, template: Any, packets: list[KeptPacket]) -> int:
    """Remux `packets` of the input stream `template` into an MP4 at `path` (written beside it, then renamed, so a
    reader never sees half a file); timestamps start at 0. Returns the file's size."""
    if not packets:
        raise ValueError("no packets for this clip")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    origin = min(p.dts if p.dts is not None else p.pts or 0 for p in packets)
    with av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream_from_template(template)
        for p in packets:
            packet = av.Packet(p.data)
            packet.pts = None if p.pts is None else p.pts - origin
            packet.dts = None if p.dts is None else p.dts - origin
            packet.time_base = template.time_base
            packet.is_keyframe = p.key
            packet.stream = stream
            out.mux(packet)
    os.replace(tmp, path)
    return path.stat().st_size


class ClipKeeper:
    """A source's ring and its pending clips: `keep(packet)` from the decoding thread, `request(...)` from any; a
    clip is written once packets past its end arrived, or at `close` with what there is."""

    def __init__(self, template: Any, keep_s: float) -> None:
        self.template = template
        self.ring = PacketRing(keep_s)
        self.pending: list[ClipRequest] = []
        self.lock = threading.Lock()
        self.written = 0

    def request(self, clip: ClipRequest) -> None:
        with self.lock:
            if len(self.pending) >= MAX_PENDING:
                raise ValueError(f"{MAX_PENDING} clips are already waiting for this stream")
            self.pending.append(clip)

    def keep(self, packet: KeptPacket) -> None:
        with self.lock:
            self.ring.add(packet)
            due = [c for c in self.pending if c.end <= packet.t]
            self.pending = [c for c in self.pending if c.end > packet.t]
            packets = [(c, self.ring.between(c.start, c.end)) for c in due]
        for clip, kept in packets:
            self._write(clip, kept)

    def close(self) -> None:
        """The source ends: pending clips get what was kept (a stream removed, a file ended, a camera lost)."""
        with self.lock:
            pending, self.pending = self.pending, []
            packets = [(c, self.ring.between(c.start, c.end)) for c in pending]
        for clip, kept in packets:
            self._write(clip, kept)

    def _write(self, clip: ClipRequest, packets: list[KeptPacket]) -> None:
        try:
            write_clip(clip.path, self.template, packets)
            self.written += 1
            why, path = "", clip.path
        except (OSError, ValueError, av.FFmpegError) as exc:
            why, path = f"{type(exc).__name__}: {exc}", None
            log.warning("clip %s not written: %s", clip.path.name, why)
        if clip.done is not None:
            clip.done(path, why)
