"""Text recognition outputs: the character list of a CTC recogniser and greedy CTC decoding of its scores.

PP-OCR recognisers score, per step along the text line, a blank (index 0), each character of their dictionary, and
a space (last, when the model was trained with one); the dictionary travels in the model's metadata (`character`,
one a line) or in a file beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graphflow.detections import Detections

BLANK = ""


def character_list(chars: list[str], classes: int, source: str) -> list[str]:
    """The recogniser's class list: blank, the dictionary, and a space when the model scores one more class;
    ValueError (one line naming `source`) when the dictionary does not fit the model's `classes`."""
    table = [BLANK, *chars]
    if classes == len(table) + 1:
        table.append(" ")
    if classes != len(table):
        raise ValueError(f"{source}: {len(chars)} characters for a recogniser of {classes} classes (expected "
                         f"{classes - 2} or {classes - 1}: blank, the characters, and perhaps a space)")
    return table


def read_characters(path: str | Path) -> list[str]:
    """A dictionary file, one character a line (a line may be a space); ValueError when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"characters file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    chars = [line.rstrip("\r") for line in text.split("\n")]
    while chars and chars[-1] == "":
        chars.pop()
    if not chars:
        raise ValueError(f"characters file {path}: no characters in it (one a line)")
    return chars


def metadata_characters(metadata: dict[str, str]) -> list[str] | None:
    """The dictionary in a recogniser's metadata (`character`, one a line), None when it has none."""
    text = metadata.get("character")
    return text.split("\n") if text else None


def ctc_decode(scores: np.ndarray, table: list[str]) -> dict[str, Any]:
    """One text line's [steps, classes] scores to {"text", "score"}: the best class per step, repeats merged,
    blanks dropped; the score is the mean probability of the characters kept (0 for no text)."""
    best = scores.argmax(axis=-1)
    probs = scores[np.arange(len(best)), best]
    keep = best != 0
    keep[1:] &= best[1:] != best[:-1]
    text = "".join(table[i] if i < len(table) else "" for i in best[keep])
    return {"text": text, "score": round(float(probs[keep].mean()), 4) if keep.any() else 0.0}


PPOCR_MODELS = {"ppocr-det": "ch_PP-OCRv4_det_infer.onnx", "ppocr-rec": "ch_PP-OCRv4_rec_infer.onnx",
                "ppocr-cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
PPOCR_PACKAGE = "rapidocr_onnxruntime"


def resolve_ppocr(model: str) -> str:
    """A PP-OCR model name (PPOCR_MODELS) to its file inside the installed rapidocr-onnxruntime wheel (Apache-2.0);
    any other value is returned as it is (a path). ValueError saying what to install when the wheel is missing."""
    if model not in PPOCR_MODELS:
        return model
    import importlib.util

    spec = importlib.util.find_spec(PPOCR_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(f"model {model}: the PP-OCR models come with rapidocr-onnxruntime, which is not installed "
                         "(pip install -e '.[ocr]')")
    path = Path(spec.origin).parent / "models" / PPOCR_MODELS[model]
    if not path.is_file():
        raise ValueError(f"model {model}: {path} is missing from the installed rapidocr-onnxruntime")
    return str(path)


def db_input_size(width: int, height: int, limit: int) -> tuple[int, int]:
    """(width, height) a DB detector takes a frame at: its longer side at most `limit`, both multiples of 32."""
    scale = min(1.0, limit / max(width, height))
    return max(32, round(width * scale / 32) * 32), max(32, round(height * scale / 32) * 32)


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.6, unclip: float = 1.5,
             min_size: int = 3) -> list[tuple[list[float], float]]:
    """A DB text detector's probability map [H, W] to text boxes in map pixels, best first: regions over `thresh`,
    kept when their mean probability reaches `box_thresh` and both sides `min_size`, each grown by DB's unclip
    distance (area × unclip / perimeter) as the model was trained to shrink them. Boxes are upright: a tilted line
    gets the box around it."""
    from scipy import ndimage

    labels, count = ndimage.label(prob > thresh, structure=np.ones((3, 3)))
    if count == 0:
        return []
    means = ndimage.mean(prob, labels, np.arange(1, count + 1))
    found = []
    for index, (region, score) in enumerate(zip(ndimage.find_objects(labels), means), start=1):
        h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
        if score < box_thresh or min(w, h) < min_size:
            continue
        d = w * h * unclip / (2 * (w + h))
        box = [max(0.0, region[1].start - d), max(0.0, region[0].start - d),
               min(float(prob.shape[1]), region[1].stop + d), min(float(prob.shape[0]), region[0].stop + d)]
        found.append((box, float(score)))
    return sorted(found, key=lambda f: -f[1])


def same_text(text: str) -> str:
    """A string as OCR results are compared: spaces dropped, a plate's middle dot and a hyphen read alike."""
    return "".join(text.split()).replace("-", "·")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn `a` into `b`."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def read_signs(truth: list[dict], objects: Detections | list[dict]) -> list[tuple[str, str]]:
    """(true text, text read) per sign of one frame: the texts of the objects whose box centre lies in the sign's
    box, joined left to right ("" when none was read there)."""
    objects = Detections.of(objects)
    boxes = objects.rounded_boxes()
    read_ones = [(box, a["text"]) for box, a in zip(boxes.tolist(), objects.attributes.tolist())
                 if a is not None and "text" in a]
    pairs = []
    for sign in truth:
        x1, y1, x2, y2 = sign["box"]
        inside = [(box[0], text) for box, text in read_ones
                  if x1 <= (box[0] + box[2]) / 2 <= x2 and y1 <= (box[1] + box[3]) / 2 <= y2]
        pairs.append((sign["text"], "".join(text for _, text in sorted(inside, key=lambda pair: pair[0]))))
    return pairs


def text_accuracy(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Exact-string accuracy (share of signs read exactly, compared by `same_text`) and character accuracy
    (1 − edit distance / true length, summed over signs) of (true, read) pairs."""
    if not pairs:
        return {"signs": 0, "exact": 0.0, "chars": 0.0}
    exact = sum(same_text(t) == same_text(r) for t, r in pairs)
    errors = sum(min(len(same_text(t)), edit_distance(same_text(t), same_text(r))) for t, r in pairs)
    total = sum(len(same_text(t)) for t, _ in pairs)
    return {"signs": len(pairs), "exact": round(exact / len(pairs), 4), "chars": round(1 - errors / total, 4)}
