"""Test clips for the GPU and end-to-end benches: the demo video's real photographs scaled to camera size and
encoded as H.264 by PyAV's libx264, at a chosen size and frame rate, cached by those settings."""
from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "graphs" / "data" / "demo.mp4"


def make_clip(folder: Path, width: int = 1920, height: int = 1080, fps: int = 30, seconds: float = 10.0,
              gop: int = 60) -> Path:
    """An H.264 MP4 (yuv420p, no B-frames, a key frame every `gop` frames, as cameras send) of the demo video's
    frames scaled to width×height, `seconds` long at `fps`; made once per settings in `folder`."""
    path = Path(folder) / f"clip_{width}x{height}_{fps}fps_{seconds:g}s.mp4"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.mp4")
    count = round(seconds * fps)
    with av.open(str(DEMO)) as source, av.open(str(partial), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "bf": "0", "g": str(gop), "keyint_min": str(gop)}
        frames = [f.reformat(width, height, "yuv420p", interpolation="BILINEAR") for f in source.decode(video=0)]
        stream.codec_context.time_base = Fraction(1, fps)
        for i, frame in enumerate(itertools.islice(itertools.cycle(frames), count)):
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            frame.pict_type = av.video.frame.PictureType.NONE  # the encoder places key frames by `gop`
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    partial.rename(path)
    return path
