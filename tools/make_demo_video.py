"""Build graphs/data/demo.mp4: real photographs (scikit-image's bundled samples) moving at known speeds.

A person (the astronaut photo, half the frame height) walks left to right along the bottom, a smaller one
right to left along the top and the cat photo moves top to bottom on the right, over the grass photo; so
tracking and line-crossing have people who cross the frame's vertical centre line at known frames.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graphflow.vision.osd import VideoWriter  # noqa: E402  (the tool runs from a checkout, not an install)

log = logging.getLogger(__name__)

WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 25, 10
OUT = Path(__file__).resolve().parent.parent / "graphs" / "data" / "demo.mp4"


@dataclass(frozen=True)
class Sprite:
    """A cut-out photo and its straight path: top-left corner at frame 0 plus a speed in pixels per frame."""

    image: np.ndarray
    start: tuple[float, float]
    velocity: tuple[float, float]

    def position(self, frame: int) -> tuple[int, int]:
        return (round(self.start[0] + self.velocity[0] * frame), round(self.start[1] + self.velocity[1] * frame))


def resize(rgb: np.ndarray, height: int) -> np.ndarray:
    """`rgb` scaled to `height` rows, keeping the aspect ratio."""
    width = round(rgb.shape[1] * height / rgb.shape[0])
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))


def background() -> np.ndarray:
    """The grass photo (greyscale) tinted green and scaled to the frame size: a lawn the cut-outs cross."""
    grass = np.asarray(Image.fromarray(data.grass()).resize((WIDTH, HEIGHT), Image.LANCZOS), dtype=np.float32)
    return np.clip(grass[:, :, None] * np.array([0.7, 1.0, 0.55], np.float32) + 20, 0, 255).astype(np.uint8)


def sprites() -> list[Sprite]:
    """The moving cut-outs; speeds are chosen so each crosses the frame within the 10 s clip."""
    person = data.astronaut()[10:512, 90:430]
    big, small, cat = resize(person, 180), resize(person, 130), resize(data.chelsea(), 110)
    frames = FPS * SECONDS
    return [
        Sprite(big, (-big.shape[1], HEIGHT - 180 - 4), ((WIDTH + big.shape[1]) / frames, 0.0)),
        Sprite(small, (WIDTH, 4.0), (-(WIDTH + small.shape[1]) / (0.8 * frames), 0.0)),
        Sprite(cat, (WIDTH - cat.shape[1] - 10, -cat.shape[0]), (0.0, (HEIGHT + cat.shape[0]) / frames)),
    ]


def paste(frame: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    """Copy `image` into `frame` at (x, y), clipped to the frame."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, frame.shape[1]), min(y + h, frame.shape[0])
    if x0 < x1 and y0 < y1:
        frame[y0:y1, x0:x1] = image[y0 - y:y1 - y, x0 - x:x1 - x]


def render(frame_index: int, base: np.ndarray, cutouts: list[Sprite]) -> np.ndarray:
    """One BGR frame with every sprite at its position for `frame_index`."""
    frame = base.copy()
    for sprite in cutouts:
        paste(frame, sprite.image, *sprite.position(frame_index))
    return np.ascontiguousarray(frame[:, :, ::-1])


def main(out: Path = OUT) -> Path:
    """Write the demo clip to `out` and return its path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base, cutouts = background(), sprites()
    writer = VideoWriter()
    writer.open(out, FPS, (WIDTH, HEIGHT), crf=28)
    try:
        for i in range(FPS * SECONDS):
            writer.write(render(i, base, cutouts))
    finally:
        writer.close()
    log.info("wrote %s (%d frames, %.0f kB)", out, FPS * SECONDS, out.stat().st_size / 1e3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=OUT, help=f"where to write the clip (default {OUT})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parser.parse_args().out)
