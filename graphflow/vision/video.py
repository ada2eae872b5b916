"""Frame sources decoded with PyAV: video files, rtsp:// streams, image folders and single images.

Every source yields `Frame`s (HxWx3 uint8 BGR or RGB, index, pts in seconds, capture wall time) and applies
the same per-source controls: `start`, `fps` (drop decoded frames evenly by pts), `max_frames`, `loop`.
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

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "srt://")
COLORS = {"bgr": "bgr24", "rgb": "rgb24"}
_FIELD_TYPES = {"uri": (str,), "fps": (int, float), "start": (int, float), "max_frames": (int,), "loop": (bool,),
                "transport": (str,), "open_timeout": (int, float), "read_timeout": (int, float)}


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

    def __post_init__(self) -> None:
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                self._fail(name, f"must be {' or '.join(k.__name__ for k in kinds)}", value)
        if self.fps is not None and self.fps <= 0:
            self._fail("fps", "must be > 0", self.fps)
        if self.start < 0:
            self._fail("start", "must be ≥ 0 seconds", self.start)
        if self.max_frames is not None and self.max_frames < 0:
            self._fail("max_frames", "must be ≥ 0", self.max_frames)
        for name, allowed in (("color", tuple(COLORS)), ("transport", ("tcp", "udp")), ("hwaccel", (None, "", "cuda"))):
            if getattr(self, name) not in allowed:
                self._fail(name, f"must be one of {', '.join(map(repr, allowed))}", getattr(self, name))

    def _fail(self, name: str, why: str, value: Any) -> None:
        raise SourceError(f"source {self.uri}: {name} {why} (got {value!r})", name)

    @property
    def is_stream(self) -> bool:
        return self.uri.lower().startswith(STREAM_SCHEMES)


@dataclass
class Frame:
    """One decoded frame: image HxWx3 uint8, index among the frames kept, pts (s), capture wall time."""

    image: np.ndarray
    index: int
    pts: float
    capture: float


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
        self._last_slot = -math.inf

    def keep(self, pts: float) -> bool:
        if self.fps is None:
            return True
        slot = math.floor(pts * self.fps + 1e-6)
        if slot <= self._last_slot:
            return False
        self._last_slot = slot
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

    def _decode(self) -> Iterator[tuple[Any, float]]:
        """One pass over the media: (undecoded frame, pts seconds) pairs from `spec.start` on."""
        raise NotImplementedError

    def _to_image(self, item: Any) -> np.ndarray | None:
        """The HxWx3 uint8 image of one `_decode` item (only for kept frames), None if unreadable."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        spec, gate = self.spec, RateGate(self.spec.fps)
        offset, index = 0.0, 0
        while spec.max_frames is None or index < spec.max_frames:
            last = None
            for item, pts in self._decode():
                self.stats.decoded += 1
                last = pts
                if not gate.keep(pts + offset):
                    self.stats.dropped += 1
                    continue
                image = self._to_image(item)
                if image is None:
                    continue
                self.height, self.width = image.shape[:2]
                index += 1
                self.stats.kept = index
                yield Frame(image, index - 1, pts + offset, time.time())
                if spec.max_frames is not None and index >= spec.max_frames:
                    return
            if not spec.loop or last is None:
                return
            self.stats.loops += 1
            offset += last - spec.start + 1.0 / self.rate

    def close(self) -> None:
        """Release what the source holds open."""


class AVSource(Source):
    """A video file or network stream demuxed and decoded by PyAV (FFmpeg); pts count from the stream's start."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._container: Any = None
        self._open()

    def _options(self) -> dict[str, str]:
        if not self.spec.is_stream:
            return {}
        options = {"rtsp_transport": self.spec.transport} if self.spec.uri.lower().startswith("rtsp") else {}
        return options | {"fflags": "discardcorrupt"}

    def _select_decoder(self, stream: Any) -> Any:
        """The stream's decoder: with hwaccel cuda, FFmpeg's NVDEC one (`<codec>_cuvid`, frames come back in host
        memory), else, or when it cannot open (no GPU, codec not supported), the software one with a warning."""
        if self.spec.hwaccel != "cuda":
            return stream.codec_context
        name = f"{stream.codec_context.name}_cuvid"
        if name not in av.codecs_available:
            log.warning("source %s: no NVDEC decoder for %s in this FFmpeg build; decoding in software",
                        self.spec.uri, stream.codec_context.name)
            return stream.codec_context
        decoder = av.CodecContext.create(name, "r")
        decoder.extradata = stream.codec_context.extradata
        decoder.width, decoder.height = stream.width, stream.height
        try:
            decoder.open()
        except av.FFmpegError as exc:
            log.warning("source %s: %s unavailable (%s); decoding in software", self.spec.uri, name,
                        exc.strerror or exc)
            return stream.codec_context
        log.info("source %s: decoding on the GPU with %s", self.spec.uri, name)
        return decoder

    def _open_container(self) -> Any:
        """The opened container (demuxer); SourceError when it cannot be opened."""
        spec = self.spec
        try:
            return av.open(spec.uri, options=self._options(), timeout=(spec.open_timeout, spec.read_timeout))
        except av.FFmpegError as exc:
            raise SourceError(f"source {spec.uri}: cannot open ({exc.strerror or exc})") from None

    def _open(self) -> None:
        spec = self.spec
        local = None if spec.is_stream else local_path(spec.uri)
        if not spec.is_stream and (local is None or not local.is_file()):
            raise SourceError(f"source {spec.uri}: file not found")
        container = self._open_container()
        if not container.streams.video:
            container.close()
            raise SourceError(f"source {spec.uri}: no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            container.close()
            raise SourceError(f"source {spec.uri}: unsupported codec")
        stream.thread_type = "AUTO"
        self._container, self._stream = container, stream
        self._decoder = self._select_decoder(stream)
        self.rate = float(stream.average_rate or stream.guessed_rate or self.rate)
        # a live stream's start_time is its first timed packet, which may come after frames shown earlier
        # (an IDR without a timestamp, then B-frames): its t0 is taken from the first decoded frame instead
        self._t0: float | None = None if spec.is_stream else (
            float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0)
        self.width, self.height = stream.width, stream.height

    def _seek(self, seconds: float) -> None:
        """Go to the key frame at or before `seconds`; 0 means the very start (some demuxers overshoot t0)."""
        base = self._stream.time_base
        target = int((seconds + (self._t0 or 0.0)) / base) if seconds > 0 and base else 0
        try:
            self._container.seek(target, stream=self._stream, backward=True)
            self._decoder.flush_buffers()
        except av.FFmpegError as exc:
            raise SourceError(f"source {self.spec.uri}: cannot seek ({exc.strerror or exc})") from None

    def _decode(self) -> Iterator[tuple[av.VideoFrame, float]]:
        start = self.spec.start
        if start > 0 or self.stats.decoded:
            self._seek(start)
        frames = self._frames()
        first = next(frames, None)
        if start > 0 and (first is None or first[1] > start + 1.5 / self.rate):
            log.debug("source %s: seek to %.3f s missed; decoding from the beginning", self.spec.uri, start)
            self._seek(0.0)
            frames = self._frames()
            first = next(frames, None)
        if first is not None:
            yield from (item for item in itertools.chain([first], frames) if item[1] + 1e-6 >= start)

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
        log.debug("source %s: skipped (%s)", self.spec.uri, why)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class ImageSource(Source):
    """A folder of images (sorted by name) or a single image; pts = position / fps (25 when fps is unset)."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        path = local_path(spec.uri)
        if path is not None and path.is_dir():
            self.paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.paths:
                raise SourceError(f"source {spec.uri}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        elif path is not None and path.is_file():
            self.paths = [path]
        else:
            raise SourceError(f"source {spec.uri}: file or folder not found")
        self.rate = spec.fps or 25.0

    def _decode(self) -> Iterator[tuple[Path, float]]:
        first = math.ceil(self.spec.start * self.rate - 1e-6)
        for i, path in enumerate(self.paths[first:], start=first):
            yield path, i / self.rate

    def _to_image(self, item: Path) -> np.ndarray | None:
        try:
            with Image.open(item) as img:
                rgb = np.asarray(img.convert("RGB"))
        except OSError as exc:
            self.stats.corrupt += 1
            log.warning("source %s: skipped unreadable image %s (%s)", self.spec.uri, item.name, exc)
            return None
        return np.ascontiguousarray(rgb[:, :, ::-1]) if self.spec.color == "bgr" else rgb


def local_path(uri: str) -> Path | None:
    """`uri` as the path of an existing file or folder; None when nothing is there or it cannot be a path."""
    path = Path(uri)
    try:
        return path if path.exists() else None
    except (OSError, ValueError):  # e.g. a name longer than the file system allows
        return None


def open_source(spec: SourceSpec | dict[str, Any]) -> Source:
    """The right source for `spec` (a SourceSpec or a dict of its fields), opened and ready to iterate."""
    if isinstance(spec, dict):
        unknown = set(spec) - set(SourceSpec.__dataclass_fields__)
        if unknown:
            raise SourceError(f"source {spec.get('uri', '?')}: unknown field(s) {', '.join(sorted(unknown))}")
        if "uri" not in spec:
            raise SourceError("source: 'uri' is required")
        spec = SourceSpec(**spec)
    local = None if spec.is_stream else local_path(spec.uri)
    if local is not None and (local.is_dir() or local.suffix.lower() in IMAGE_SUFFIXES):
        return ImageSource(spec)
    return AVSource(spec)
