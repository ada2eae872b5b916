"""Detector output decoding (YOLOX, YOLOv5-style, YOLOv8-style), class-aware NMS and box mapping.

Every decoder turns one image's raw output into (boxes Nx4 xyxy in model-input pixels, scores N, class ids N).
The arithmetic (score_rows, box_corners) takes the array module as `xp`: the torch backend runs the same code on the
GPU over a whole batch (batch_candidates).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from graphflow.detections import BOX_DECIMALS, SCORE_DECIMALS, Detections
from graphflow.vision.letterbox import unletterbox_boxes

log = logging.getLogger(__name__)

YOLOX_STRIDES = (8, 16, 32)

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DetectParams:
    """Post-processing settings shared by every decoder; `classes` keeps only those class ids (None: all)."""

    conf: float = 0.3
    iou: float = 0.45
    classes: frozenset[int] | None = None
    max_detections: int = 300


def rows_of(output: Any, fmt: str, xp: Any = np) -> Any:
    """An output as one row per anchor, [..., A, K]: YOLOv8-style [..., K, A] outputs are transposed (a view)."""
    return xp.swapaxes(output, -1, -2) if fmt == "yolov8" else output


def score_rows(rows: Any, fmt: str, conf: float, classes: Any = None, xp: Any = np) -> tuple[Any, Any, Any]:
    """Rows [..., A, K] to (best class id, score, kept): the first best class, its score times the objectness
    (YOLOX, v5; v8 has none), kept = score ≥ `conf` and, when `classes` (an array of ids in `xp`) is given, in it.
    `xp` is the rows' array module (numpy, cupy or torch), so the host and the GPU decode with one arithmetic."""
    class_scores = rows[..., 4 if fmt == "yolov8" else 5:]
    class_ids = xp.argmax(class_scores, -1)
    scores = xp.amax(class_scores, -1)
    if fmt != "yolov8":
        scores = scores * rows[..., 4]
    keep = scores >= conf
    if classes is not None:
        keep = keep & xp.isin(class_ids, classes)
    return class_ids, scores, keep


def box_corners(raw: Any, fmt: str, cells: Any = None, strides: Any = None, xp: Any = np) -> Any:
    """Raw box values [..., 4] to x1, y1, x2, y2 in model-input pixels. YOLOX's are grid offsets — xy = (raw +
    cell) × stride, wh = exp(raw) × stride, with the anchors' `cells` and `strides` (same leading shape); the other
    formats give centre and size already."""
    if fmt == "yolox":
        xy = (raw[..., :2] + cells) * strides
        wh = xp.exp(xp.clip(raw[..., 2:4], None, 20.0)) * strides
    else:
        xy, wh = raw[..., :2], raw[..., 2:4]
    half = wh / 2
    return xp.concatenate([xy - half, xy + half], -1)


@functools.lru_cache(maxsize=16)
def yolox_grid(input_w: int, input_h: int, strides: tuple[int, ...] = YOLOX_STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Cell (x, y) index and stride of every YOLOX anchor, in the model's output order (computed once per size;
    the arrays are read-only because they are shared)."""
    cells, cell_strides = [], []
    for stride in strides:
        gy, gx = np.meshgrid(np.arange(input_h // stride), np.arange(input_w // stride), indexing="ij")
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        cell_strides.append(np.full(gx.size, stride))
    grid, stride = np.concatenate(cells).astype(np.float32), np.concatenate(cell_strides).astype(np.float32)[:, None]
    grid.setflags(write=False)
    stride.setflags(write=False)
    return grid, stride


Grid = Callable[[tuple[int, int]], tuple[Any, Any]]


def anchor_boxes(raw: Any, anchor: Any, fmt: str, input_size: tuple[int, int], anchors: int, xp: Any = np,
                 grid: Grid | None = None) -> Any:
    """Raw box values [..., 4] of the anchors at indices `anchor` (same leading shape) of an output with `anchors`
    rows to xyxy boxes; `grid(input_size)` gives yolox_grid's arrays in `xp` (default: the NumPy ones)."""
    if fmt != "yolox":
        return box_corners(raw, fmt, xp=xp)
    cells, strides = grid(input_size) if grid is not None else yolox_grid(*input_size)
    if len(cells) != anchors:
        raise ValueError(f"yolox output: {anchors} anchors, expected {len(cells)} for input {list(input_size)}")
    return box_corners(raw, fmt, cells[anchor], strides[anchor], xp)


def class_array(p: DetectParams, xp: Any = np, **where: Any) -> Any:
    """`p.classes` as a sorted array of `xp` (torch takes `device=`), or None to keep every class."""
    return None if p.classes is None else xp.asarray(sorted(p.classes), **where)


def _decode(rows: np.ndarray, fmt: str, p: DetectParams, input_size: tuple[int, int],
            pre: np.ndarray | None = None) -> Decoded:
    """One image's rows [A, K] to its kept candidates; `pre` (anchor indices) limits the work to those anchors."""
    subset = rows if pre is None else rows[pre]
    class_ids, scores, keep = score_rows(subset, fmt, p.conf, class_array(p))
    anchor = np.flatnonzero(keep) if pre is None else pre[keep]
    boxes = anchor_boxes(rows[anchor, :4], anchor, fmt, input_size, len(rows))
    return boxes, scores[keep].astype(np.float32), class_ids[keep]


def decode_yolox(output: np.ndarray, input_size: tuple[int, int], p: DetectParams) -> Decoded:
    """YOLOX [A, 5+C] raw grid output: xy = (raw + cell) * stride, wh = exp(raw) * stride; score = obj * cls."""
    pre = np.flatnonzero(output[:, 4] >= p.conf)  # score = obj * cls <= obj, so this drops nothing that could pass
    return _decode(output, "yolox", p, input_size, pre)


def decode_yolov5(output: np.ndarray, input_size: tuple[int, int], p: DetectParams) -> Decoded:
    """YOLOv5-style [A, 5+C]: decoded cx, cy, w, h in input pixels, objectness, class scores."""
    return _decode(output, "yolov5", p, input_size)


def decode_yolov8(output: np.ndarray, input_size: tuple[int, int], p: DetectParams) -> Decoded:
    """YOLOv8-style [4+C, A]: decoded cx, cy, w, h rows then class score rows, no objectness."""
    return _decode(rows_of(output, "yolov8"), "yolov8", p, input_size)


DECODERS: dict[str, Callable[[np.ndarray, tuple[int, int], DetectParams], Decoded]] = {
    "yolox": decode_yolox,
    "yolov5": decode_yolov5,
    "yolov8": decode_yolov8,
}


def batch_candidates(output: Any, fmt: str, input_size: tuple[int, int], p: DetectParams, xp: Any = np,
                     grid: Grid | None = None, classes: Any = None) -> tuple[Any, Any, Any, Any]:
    """A batch's output [N, A, K] ([N, K, A] for v8) to every kept anchor's (image index, xyxy box, score, class
    id), in image then anchor order, computed where the output lives (the GPU decode): the decoders' arithmetic
    over the whole batch at once. `classes`: class_array(p) in `xp` on the output's device (made when not given)."""
    rows = rows_of(output, fmt, xp)
    if classes is None:
        classes = class_array(p, xp)
    class_ids, scores, keep = score_rows(rows, fmt, p.conf, classes, xp)
    image, anchor = xp.where(keep)
    boxes = anchor_boxes(rows[image, anchor, :4], anchor, fmt, input_size, rows.shape[1], xp, grid)
    return image, boxes, scores[image, anchor], class_ids[image, anchor]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a (N,4) and b (M,4), in their float dtype, without input checks (NMS's and the
    trackers' hot path)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    wh = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh -= lt
    np.maximum(wh, 0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    size_a, size_b = a[:, 2:] - a[:, :2], b[:, 2:] - b[:, :2]
    union = (size_a[:, 0] * size_a[:, 1])[:, None] + size_b[:, 0] * size_b[:, 1] - inter
    return inter / np.maximum(union, 1e-12)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against Nx4 xyxy boxes."""
    return pairwise_iou(box[None], boxes)[0]


DENSE_NMS = 256  # up to this many candidates, NMS computes all pairwise IoUs at once


def _nms_dense(ordered: np.ndarray, order: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Greedy NMS over boxes sorted best first, from one IoU matrix (the IoU `box_iou` computes, so the same boxes
    survive): a few NumPy calls in all instead of several per kept box."""
    over = pairwise_iou(ordered, ordered) > iou
    alive = np.ones(len(order), bool)
    keep = []
    for i in range(len(order)):
        if alive[i]:
            keep.append(i)
            if len(keep) >= max_keep:
                break
            alive &= ~over[i]
    return order[keep].astype(np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float, max_keep: int = 300) -> np.ndarray:
    """Class-aware greedy NMS; returns kept indices, best first. Classes are separated by offsetting boxes."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    offset = class_ids[:, None].astype(np.float32) * (float(boxes.max()) + 1.0)
    shifted = boxes + offset
    order = np.argsort(-scores, kind="stable")
    if len(order) <= DENSE_NMS:
        return _nms_dense(shifted[order], order, iou, max_keep)
    keep = []
    while order.size and len(keep) < max_keep:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(shifted[best], shifted[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def pack_candidates(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Decoded detections as one [k, 6] float32 array (x1, y1, x2, y2, score, class_id), the form GPU decoders
    return, so NMS and box mapping run on one layout for every backend."""
    return np.concatenate([boxes.astype(np.float32).reshape(-1, 4), scores.astype(np.float32)[:, None],
                           class_ids.astype(np.float32)[:, None]], axis=1)


def finish_candidates(
    candidates: np.ndarray,
    letterbox_info: dict,
    frame_size: tuple[int, int],
    labels: list[str],
    p: DetectParams,
) -> Detections:
    """One image's thresholded candidates [k, 6] (model-input pixels) to the contract's detections: class-aware NMS,
    boxes mapped to original frame pixels, best first."""
    boxes, scores, class_ids = candidates[:, :4], candidates[:, 4], candidates[:, 5].astype(np.int64)
    keep = nms(boxes, scores, class_ids, p.iou, p.max_detections)
    frame_boxes = unletterbox_boxes(boxes[keep], letterbox_info, *frame_size)
    kept_ids = class_ids[keep]
    return Detections(np.round(frame_boxes.astype(np.float64), BOX_DECIMALS),
                      np.round(scores[keep].astype(np.float64), SCORE_DECIMALS), kept_ids,
                      label_column(kept_ids, labels))


def label_column(class_ids: np.ndarray, labels: list[str]) -> np.ndarray:
    """Each class id's label (its number as text beyond the list) as a Detections label column."""
    table = _label_table(tuple(labels))
    if len(class_ids) and int(class_ids.max()) >= len(table):
        return np.array([labels[c] if c < len(labels) else str(c) for c in class_ids.tolist()] + [None], object)[:-1]
    return table[class_ids]


@functools.lru_cache(maxsize=16)
def _label_table(labels: tuple[str, ...]) -> np.ndarray:
    return np.array(labels + (None,), object)[:-1]  # (None: keeps a 1-D object array whatever the labels hold)


def postprocess(
    output: np.ndarray,
    fmt: str,
    letterbox_info: dict,
    frame_size: tuple[int, int],
    labels: list[str],
    p: DetectParams,
) -> Detections:
    """One image's raw output to the contract's detections: boxes in original frame pixels, best first."""
    decoded = DECODERS[fmt](output, tuple(letterbox_info["input"]), p)
    return finish_candidates(pack_candidates(*decoded), letterbox_info, frame_size, labels, p)
