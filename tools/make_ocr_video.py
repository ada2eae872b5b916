"""Build graphs/data/ocr/signs.mp4 and its ground truth signs.json: Chinese licence plates and signs with known
strings, rendered with CJK and Latin fonts from Debian's packages, moving over a real photograph.

Each sign has its own size, tilt, blur and straight path, so text is read at several scales, angles and sharpness;
signs.json holds, per frame, each visible sign's text and box (the whole sign inside the frame).
Fonts: fonts-droid-fallback (CJK) and fonts-dejavu-core (Latin, digits).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graphflow.vision.osd import VideoWriter  # noqa: E402  (the tool runs from a checkout, not an install)

log = logging.getLogger(__name__)

WIDTH, HEIGHT, FPS, FRAMES = 640, 360, 10, 80
OUT = Path(__file__).resolve().parent.parent / "graphs" / "data" / "ocr" / "signs.mp4"
CJK_FONT = Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf")
LATIN_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


@dataclass(frozen=True)
class Sign:
    """A sign: its text, colours (RGB), text height in pixels, tilt (degrees), blur radius, and straight path (its
    top-left corner at frame `first`, pixels per frame) while frames first..last show it."""

    text: str
    ink: tuple[int, int, int]
    plate: tuple[int, int, int]
    height: int
    start: tuple[float, float]
    velocity: tuple[float, float]
    tilt: float = 0.0
    blur: float = 0.0
    first: int = 0
    last: int = FRAMES - 1


SIGNS = (
    Sign("京A·12345", (255, 255, 255), (20, 60, 170), 34, (10, 40), (3.0, 0.3)),
    Sign("沪B·6F789", (255, 255, 255), (20, 60, 170), 24, (440, 215), (-3.0, 0.0), tilt=4.0),
    Sign("粤C·D2468", (10, 10, 10), (230, 190, 20), 30, (60, 296), (2.0, -0.2), blur=0.8),
    Sign("出口 EXIT", (255, 255, 255), (0, 120, 60), 40, (370, 10), (0.0, 1.5), first=10),
    Sign("OPEN 24H", (200, 20, 20), (245, 245, 240), 20, (40, 150), (2.0, 0.0), tilt=-3.0, first=20),
)


def _font(char: str, size: int) -> ImageFont.FreeTypeFont:
    """The CJK font for CJK characters, the Latin one for the rest."""
    return ImageFont.truetype(str(CJK_FONT if ord(char) >= 0x2E80 else LATIN_FONT), size)


def render_sign(sign: Sign) -> np.ndarray:
    """The sign as an RGBA image: text on a plate with a margin, tilted and blurred as the sign says."""
    size = round(sign.height * 1.25)  # font size whose glyphs are about `height` tall
    widths = [_font(c, size).getlength(c) for c in sign.text]
    pad = sign.height // 3
    image = Image.new("RGBA", (round(sum(widths)) + 2 * pad, sign.height + 2 * pad), sign.plate + (255,))
    draw = ImageDraw.Draw(image)
    x = pad
    for char, width in zip(sign.text, widths):
        draw.text((x, pad + sign.height / 2), char, font=_font(char, size), fill=sign.ink + (255,), anchor="lm")
        x += width
    if sign.tilt:
        image = image.rotate(sign.tilt, resample=Image.BICUBIC, expand=True)
    if sign.blur:
        image = image.filter(ImageFilter.GaussianBlur(sign.blur))
    return np.asarray(image)


def background() -> np.ndarray:
    """The rocket photo (a real outdoor scene) scaled to the frame size, RGB."""
    return np.asarray(Image.fromarray(data.rocket()).resize((WIDTH, HEIGHT), Image.LANCZOS))


def paste(frame: np.ndarray, rgba: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend `rgba` into the RGB `frame` at (x, y), clipped to the frame."""
    h, w = rgba.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, frame.shape[1]), min(y + h, frame.shape[0])
    if x0 < x1 and y0 < y1:
        part = rgba[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32)
        alpha = part[:, :, 3:] / 255
        frame[y0:y1, x0:x1] = np.round(part[:, :, :3] * alpha + frame[y0:y1, x0:x1] * (1 - alpha)).astype(np.uint8)


def main(out: Path = OUT) -> Path:
    """Write the clip to `out` and the ground truth beside it (`signs.json`); return the clip's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base = background()
    images = [render_sign(s) for s in SIGNS]
    truth = []
    writer = VideoWriter()
    writer.open(out, FPS, (WIDTH, HEIGHT), crf=20)
    try:
        for i in range(FRAMES):
            frame = base.copy()
            visible = []
            for sign, image in zip(SIGNS, images):
                if not sign.first <= i <= sign.last:
                    continue
                t = i - sign.first
                x, y = round(sign.start[0] + sign.velocity[0] * t), round(sign.start[1] + sign.velocity[1] * t)
                paste(frame, image, x, y)
                h, w = image.shape[:2]
                if x >= 0 and y >= 0 and x + w <= WIDTH and y + h <= HEIGHT:  # wholly inside: readable
                    visible.append({"text": sign.text, "box": [x, y, x + w, y + h]})
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
            truth.append({"frame": i, "signs": visible})
    finally:
        writer.close()
    (out.parent / "signs.json").write_text(json.dumps({"fps": FPS, "frames": truth}, ensure_ascii=False, indent=0))
    log.info("wrote %s (%d frames, %.0f kB) and signs.json", out, FRAMES, out.stat().st_size / 1e3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=OUT, help=f"where to write the clip (default {OUT})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parser.parse_args().out)
