"""Frame sources decoded with PyAV: video files, rtsp:// streams, image folders and single images.

Every source yields `Frame`s (HxWx3 uint8 BGR or RGB, index, pts in seconds, capture wall time) and applies
the same per-source controls: `start`, `fps` (drop decoded frames evenly by pts), `max_frames`, `loop`, and can
resume after its first `skip` frames without decoding them where the media allows (`Source.frames(skip)`).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from graphflow.errors import GraphflowError
from graphflow.media.clips import ClipKeeper, KeptPacket
from graphflow.media.urls import redact

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "srt://")
COLORS = {"bgr": "bgr24", "rgb": "rgb24"}
_FIELD_TYPES = {"uri": (str,), "fps": (int, float), "start": (int, float), "max_frames": (int,), "loop": (bool,),
                "transport": (str,), "open_timeout": (int, float), "read_timeout": (int, float), "realtime": (bool,),
                "max_pixels": (int,), "threads": (int,), "keep_packets_s": (int, float)}
# numeric fields: (lowest, lowest allowed itself, highest); bounds keep every value usable by FFmpeg and the clock
_FIELD_RANGES = {"fps": (0, False, 1000), "start": (0, True, 10_000_000), "open_timeout": (0, False, 3600),
                 "read_timeout": (0, False, 3600), "max_frames": (0, True, None), "max_pixels": (1, True, None),
                 "threads": (0, True, 64), "keep_packets_s": (0, True, 600)}
MAX_PIXELS = 100_000_000  # default largest frame (width × height): 100 MP, above 8K video and most photos


class SourceError(GraphflowError, ValueError):
    """A source cannot be opened or read; the message names the source and the cause on one line.

    `field` names the SourceSpec field at fault, when one is."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SourceSpec:
    """What to read and how: `fps` None keeps every frame; `max_frames` None reads to the end."""

    uri: str
    fps: float | None = None
    start: float = 0.0
    max_frames: int | None = None
    loop: bool = False
    color: str = "bgr"
    transport: str = "tcp"
    open_timeout: float = 10.0
    read_timeout: float = 10.0
    hwaccel: str | None = None
    realtime: bool = False
    max_pixels: int = MAX_PIXELS
    threads: int = 1  # decoder threads; 0: FFmpeg's choice (one per core), see AVSource._open
    keep_packets_s: float = 0.0  # seconds of compressed packets kept for evidence clips (media.clips); 0: none

    def __post_init__(self) -> None:
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                self._fail(name, f"must be {' or '.join(k.__name__ for k in kinds)}", value)
        for name, (low, inclusive, high) in _FIELD_RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            finite = not isinstance(value, float) or math.isfinite(value)
            if not finite or value < low or (value == low and not inclusive) or (high is not None and value > high):
                self._fail(name, f"must be {'≥' if inclusive else '>'} {low}" + (f" and ≤ {high}" if high else ""),
                           value)
        if self.realtime and self.is_stream:
            self._fail("realtime", "is for files and image folders (a network stream is live already)", True)
        for name, allowed in (("color", tuple(COLORS)), ("transport", ("tcp", "udp")),
                              ("hwaccel", (None, "", "cuda", "nvdec"))):
            if getattr(self, name) not in allowed:
                self._fail(name, f"must be one of {', '.join(map(repr, allowed))}", getattr(self, name))

    def _fail(self, name: str, why: str, value: Any) -> None:
        raise SourceError(f"source {self.shown}: {name} {why} (got {value!r})", name)

    @property
    def is_stream(self) -> bool:
        return self.uri.lower().startswith(STREAM_SCHEMES)

    @property
    def shown(self) -> str:
        """The uri as messages and logs show it: credentials hidden."""
        return redact(self.uri)


@dataclass
class Frame:
    """One decoded frame: image HxWx3 uint8, index among the frames kept, pts (s), capture wall time, and for an
    image source the file's name within its folder."""

    image: np.ndarray
    index: int
    pts: float
    capture: float
    file: str = ""


@dataclass
class SourceStats:
    """Counters a source keeps: frames decoded, dropped by the fps control, kept, corrupt packets skipped."""

    decoded: int = 0
    dropped: int = 0
    kept: int = 0
    corrupt: int = 0
    loops: int = 0


class RateGate:
    """Keeps frames so that at most `fps` pass per second of pts, evenly spaced (one per 1/fps slot)."""

    def __init__(self, fps: float | None) -> None:
        self.fps = fps
        self.last_slot: float = -math.inf

    def keep(self, pts: float) -> bool:
        if self.fps is None:
            return True
        slot = math.floor(pts * self.fps + 1e-6)
        if slot <= self.last_slot:
            return False
        self.last_slot = slot
        return True


class Source:
    """Base of every source kind: shared start/fps/max_frames/loop logic around `_decode()`."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.stats = SourceStats()
        self.lost = ""  # why a network stream stopped early (a read error), "" when it just ended
        self.rate = 25.0
        self.width = 0
        self.height = 0

    def _decode(self, since: float) -> Iterator[tuple[Any, float]]:
        """One pass over the media: (undecoded frame, pts seconds) pairs from pts `since` (≥ `spec.start`) on."""
        raise NotImplementedError

    def _to_image(self, item: Any) -> np.ndarray | None:
        """The HxWx3 uint8 image of one `_decode` item (only for kept frames), None if unreadable."""
        raise NotImplementedError

    def _file(self, item: Any) -> str:
        """The file a `_decode` item came from, for sources made of many files ("" otherwise)."""
        return ""

    def _timeline(self) -> list[float] | None:
        """The pts of one pass from `spec.start` on, in order, read without decoding; None when unknown."""
        return None

    def _pass_length(self) -> tuple[int, float] | None:
        """(frames, seconds) of one pass from `spec.start` on, from the media's header; None when unknown."""
        return None

    def length(self) -> int | None:
        """About how many frames `frames()` yields, from the header (one pass through the fps control, capped by
        `max_frames`), for progress shares and ETAs; None when unknown (a network stream or a loop without
        `max_frames`, a header without a count)."""
        spec, known = self.spec, None if self.spec.is_stream or self.spec.loop else self._pass_length()
        if known is None:
            return spec.max_frames
        frames, seconds = known
        if spec.fps:
            frames = min(frames, math.ceil(seconds * spec.fps - 1e-6))
        return max(frames, 0) if spec.max_frames is None else max(min(frames, spec.max_frames), 0)

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def frames(self, skip: int = 0) -> Iterator[Frame]:
        """The kept frames, from index `skip` on: the first `skip` (after the fps control, counted across loops)
        are passed over by seeking when the media's timeline is known, else decoded but not converted."""
        spec, gate = self.spec, RateGate(self.spec.fps)
        offset, index, since = 0.0, 0, spec.start
        if skip:
            position = self._position(skip, gate)
            if position is None:
                return
            offset, index, since = position
        while spec.max_frames is None or index < spec.max_frames:
            last = None
            for item, pts in self._decode(since):
                self.stats.decoded += 1
                last = pts
                if not gate.keep(pts + offset):
                    self.stats.dropped += 1
                    continue
                if index < skip:  # delivered before the resume: counted, never converted
                    index += 1
                    continue
                image = self._to_image(item)
                index += 1  # an unreadable image keeps its number: index stays the position on the timeline
                if image is None:
                    continue
                self.height, self.width = image.shape[:2]
                self.stats.kept += 1
                yield Frame(image, index - 1, pts + offset, time.time(), self._file(item))
                if spec.max_frames is not None and index >= spec.max_frames:
                    return
            if not spec.loop or last is None:
                return
            self.stats.loops += 1
            offset += last - spec.start + 1.0 / self.rate
            since = spec.start

    def _position(self, skip: int, gate: RateGate) -> tuple[float, int, float] | None:
        """Where kept frame `skip` is, found on the timeline through the same fps control and loops as
        `frames()`: (pts offset of its pass, `skip`, its pts within the pass), with `gate` left just before it.
        None when the source has no such frame; (0, 0, start) when the timeline is unknown (decode to skip)."""
        times = self._timeline()
        if times is None:
            return 0.0, 0, self.spec.start
        if not times:
            return None
        offset, index = 0.0, 0
        while True:
            for pts in times:
                before = gate.last_slot
                if not gate.keep(pts + offset):
                    continue
                if index == skip:
                    gate.last_slot = before
                    return offset, index, pts
                index += 1
            if not self.spec.loop:
                return None
            self.stats.loops += 1
            offset += times[-1] - self.spec.start + 1.0 / self.rate

    def close(self) -> None:
        """Release what the source holds open."""


class AVSource(Source):
    """A video file or network stream demuxed and decoded by PyAV (FFmpeg); pts count from the stream's start."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._container: Any = None
        self.clips: ClipKeeper | None = None
        self._open()

    def _options(self) -> dict[str, str]:
        if not self.spec.is_stream:
            return {}
        options = {"rtsp_transport": self.spec.transport} if self.spec.uri.lower().startswith("rtsp") else {}
        # fpsprobesize 0: no frame-rate probe when opening. The probe reads about 20 frames (0.8 s at 25 fps) before
        # the first can be decoded, then hands them over at once: a live camera's first frame came late and stale,
        # followed by a burst the rest of the graph had to absorb. The rate comes from the stream's timing info.
        return options | {"fflags": "discardcorrupt", "fpsprobesize": "0"}

    def _select_decoder(self, stream: Any) -> Any:
        """The stream's decoder: with hwaccel cuda, FFmpeg's NVDEC one (`<codec>_cuvid`, frames come back in host
        memory), else, or when it cannot open (no GPU, codec not supported), the software one with a warning."""
        if self.spec.hwaccel != "cuda":
            return stream.codec_context
        name = f"{stream.codec_context.name}_cuvid"
        if name not in av.codecs_available:
            log.warning("source %s: no NVDEC decoder for %s in this FFmpeg build; decoding in software",
                        self.spec.shown, stream.codec_context.name)
            return stream.codec_context
        decoder = av.CodecContext.create(name, "r")
        decoder.extradata = stream.codec_context.extradata
        decoder.width, decoder.height = stream.width, stream.height
        try:
            decoder.open()
        except av.FFmpegError as exc:
            log.warning("source %s: %s unavailable (%s); decoding in software", self.spec.shown, name,
                        exc.strerror or exc)
            return stream.codec_context
        log.info("source %s: decoding on the GPU with %s", self.spec.shown, name)
        return decoder

    def _open_container(self) -> Any:
        """The opened container (demuxer); SourceError when it cannot be opened."""
        spec = self.spec
        try:
            return av.open(spec.uri, options=self._options(), timeout=(spec.open_timeout, spec.read_timeout))
        except av.FFmpegError as exc:
            raise SourceError(f"source {spec.shown}: cannot open ({exc.strerror or exc})") from None

    def _open(self) -> None:
        spec = self.spec
        local = None if spec.is_stream else local_path(spec.uri)
        if not spec.is_stream and (local is None or not local.is_file()):
            raise SourceError(f"source {spec.shown}: file not found")
        container = self._open_container()
        if not container.streams.video:
            container.close()
            raise SourceError(f"source {spec.shown}: no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            container.close()
            raise SourceError(f"source {spec.shown}: unsupported codec")
        if stream.width * stream.height > spec.max_pixels:
            container.close()
            raise SourceError(f"source {spec.shown}: frames of {stream.width}×{stream.height} exceed max_pixels "
                              f"{spec.max_pixels}")
        # one thread per decoder by default: with many streams the streams themselves keep the cores busy, and
        # each extra thread costs CPU to start and to hand frames over, memory, and a frame of delay (frame threading)
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = spec.threads
        self._container, self._stream = container, stream
        self._moved = False  # the demuxer has read past the start: the next pass seeks
        self._decoder = self._select_decoder(stream)
        self.rate = float(stream.average_rate or stream.guessed_rate or self.rate)
        # a live stream's start_time is its first timed packet, which may come after frames shown earlier
        # (an IDR without a timestamp, then B-frames): its t0 is taken from the first decoded frame instead
        self._t0: float | None = None if spec.is_stream else (
            float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0)
        self.width, self.height = stream.width, stream.height
        self.clips = ClipKeeper(stream, spec.keep_packets_s) if spec.keep_packets_s > 0 else None

    def _pass_length(self) -> tuple[int, float] | None:
        """The file's frame count and duration from its header (the count from the duration and rate when the
        header has none), less `spec.start`."""
        stream, container = self._stream, self._container
        seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
            (container.duration / 1e6 if container.duration else 0.0)
        frames = stream.frames or round(seconds * self.rate)
        if not frames:
            return None
        seconds = seconds or frames / self.rate
        return frames - round(self.spec.start * self.rate), seconds - self.spec.start

    def _seek(self, seconds: float) -> None:
        """Go to the key frame at or before `seconds`; 0 means the very start (some demuxers overshoot t0)."""
        base = self._stream.time_base
        target = int((seconds + (self._t0 or 0.0)) / base) if seconds > 0 and base else 0
        try:
            self._container.seek(target, stream=self._stream, backward=True)
            self._decoder.flush_buffers()
        except av.FFmpegError as exc:
            raise SourceError(f"source {self.spec.shown}: cannot seek ({exc.strerror or exc})") from None

    def _timeline(self) -> list[float] | None:
        """Presentation times of a file's frames from `spec.start` on, from packet headers only (no decoding)."""
        if self.spec.is_stream:
            return None
        self._seek(0.0)
        self._moved = True
        base, times = self._stream.time_base, []
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0 or packet.is_corrupt:
                    continue
                if packet.pts is None or not base:
                    return None
                times.append(float(packet.pts * base) - (self._t0 or 0.0))
        except av.FFmpegError:
            pass  # a damaged tail: the frames before it are the timeline, as decoding would find
        return sorted(t for t in times if t + 1e-6 >= self.spec.start)

    def _decode(self, since: float) -> Iterator[tuple[av.VideoFrame, float]]:
        if since > 0 or self._moved:
            self._seek(since)
        self._moved = True
        frames = self._frames()
        first = next(frames, None)
        if since > 0 and (first is None or first[1] > since + 1.5 / self.rate):
            log.debug("source %s: seek to %.3f s missed; decoding from the beginning", self.spec.shown, since)
            self._seek(0.0)
            frames = self._frames()
            first = next(frames, None)
        if first is not None:
            yield from (item for item in itertools.chain([first], frames) if item[1] + 1e-6 >= since)

    def _frames(self) -> Iterator[tuple[av.VideoFrame, float]]:
        """Every decodable frame from the current position with its pts; bad packets are counted, not fatal."""
        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                if self.spec.is_stream:
                    stalled = isinstance(exc, av.ExitError)  # FFmpeg's interrupt: read_timeout passed
                    self.lost = (f"no data for {self.spec.read_timeout:g} s" if stalled
                                 else f"read error: {exc.strerror or exc}")
                else:
                    self._corrupt(f"demux: {exc}")
                return
            if packet.is_corrupt:
                self._corrupt("corrupt packet")
                continue
            if self.clips is not None and packet.pts is not None and self._t0 is not None and packet.size:
                self.clips.keep(KeptPacket(bytes(packet), packet.pts, packet.dts, packet.is_keyframe,
                                           float(packet.pts * self._stream.time_base) - self._t0))
            try:
                frames = self._decoder.decode(packet)
            except av.FFmpegError as exc:
                self._corrupt(f"decode: {exc}")
                continue
            for frame in frames:
                yield frame, self._pts(frame)

    def _pts(self, frame: av.VideoFrame) -> float:
        """Seconds since the start of the media; a frame without a timestamp is placed by its count."""
        if frame.time is None:
            return self.stats.decoded / self.rate
        if self._t0 is None:
            self._t0 = float(frame.time) - self.stats.decoded / self.rate
        return float(frame.time) - self._t0

    def _to_image(self, item: av.VideoFrame) -> np.ndarray:
        return item.to_ndarray(format=COLORS[self.spec.color])

    def _corrupt(self, why: str) -> None:
        self.stats.corrupt += 1
        log.debug("source %s: skipped (%s)", self.spec.shown, why)

    def close(self) -> None:
        if self.clips is not None:
            self.clips.close()
        if self._container is not None:
            self._container.close()
            self._container = None


class ImageSource(Source):
    """A folder of images (sorted by name) or a single image; pts = position / fps (25 when fps is unset). An image
    that cannot be read, or is larger than `max_pixels`, is skipped with a warning and counted as corrupt; its
    frame number is not reused, so a frame's index always says where its file is in the folder."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        path = local_path(spec.uri)
        if path is not None and path.is_dir():
            self.paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.paths:
                raise SourceError(f"source {spec.shown}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        elif path is not None and path.is_file():
            self.paths = [path]
        else:
            raise SourceError(f"source {spec.shown}: file or folder not found")
        self.rate = spec.fps or 25.0

    def _first(self, since: float) -> int:
        return math.ceil(since * self.rate - 1e-6)

    def _decode(self, since: float) -> Iterator[tuple[Path, float]]:
        first = self._first(since)
        for i, path in enumerate(self.paths[first:], start=first):
            yield path, i / self.rate

    def _timeline(self) -> list[float]:
        return [i / self.rate for i in range(self._first(self.spec.start), len(self.paths))]

    def _pass_length(self) -> tuple[int, float]:
        frames = len(self.paths) - self._first(self.spec.start)
        return frames, frames / self.rate

    def _file(self, item: Path) -> str:
        return item.name

    def _to_image(self, item: Path) -> np.ndarray | None:
        """The image in the colour order asked for; None (counted as corrupt, logged once per file) when it cannot
        be read or is larger than `max_pixels`, checked from its header before any pixel is decoded."""
        try:
            with Image.open(item) as img:
                width, height = img.size
                if width * height > self.spec.max_pixels:
                    return self._skip_file(item, f"too large: {width}×{height} pixels exceed max_pixels "
                                                 f"{self.spec.max_pixels}")
                rgb = np.asarray(img.convert("RGB"))
        except Image.DecompressionBombError as exc:  # PIL's own limit, above ~179 MP, refuses it before we can
            return self._skip_file(item, f"too large: {exc}")
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError… for a damaged file
            return self._skip_file(item, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return np.ascontiguousarray(rgb[:, :, ::-1]) if self.spec.color == "bgr" else rgb

    def _skip_file(self, item: Path, why: str) -> None:
        self.stats.corrupt += 1
        log.warning("source %s: skipped image %s: %s", self.spec.shown, item.name, why)


def local_path(uri: str) -> Path | None:
    """`uri` as the path of an existing file or folder; None when nothing is there or it cannot be a path."""
    path = Path(uri)
    try:
        return path if path.exists() else None
    except (OSError, ValueError):  # e.g. a name longer than the file system allows
        return None
