"""Detector output decoding (YOLOX, YOLOv5-style, YOLOv8-style), class-aware NMS and box mapping.

Every decoder turns one image's raw output into (boxes Nx4 xyxy in model-input pixels, scores N, class ids N).
"""
from __future__ import annotations

import functools

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

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


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """Centre/size boxes to corner boxes."""
    half = xywh[:, 2:4] / 2
    return np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)


def _best_class(boxes_xywh: np.ndarray, class_scores: np.ndarray, weight: np.ndarray | None,
                p: DetectParams) -> Decoded:
    """Pick each anchor's best class, weight it (objectness), and keep those over threshold and in the filter."""
    class_ids = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(class_ids)), class_ids]
    if weight is not None:
        scores = scores * weight
    keep = scores >= p.conf
    if p.classes is not None:
        keep &= np.isin(class_ids, list(p.classes))
    return xywh_to_xyxy(boxes_xywh[keep]), scores[keep].astype(np.float32), class_ids[keep]


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


def decode_yolox(output: np.ndarray, input_size: tuple[int, int], p: DetectParams) -> Decoded:
    """YOLOX [A, 5+C] raw grid output: xy = (raw + cell) * stride, wh = exp(raw) * stride; score = obj * cls."""
    cells, strides = yolox_grid(*input_size)
    if len(cells) != output.shape[0]:
        raise ValueError(f"yolox output: {output.shape[0]} anchors, expected {len(cells)} for input {list(input_size)}")
    obj = output[:, 4]
    pre = obj >= p.conf  # score = obj * cls <= obj, so this drops nothing that could pass
    raw, cells, strides = output[pre], cells[pre], strides[pre]
    xy = (raw[:, :2] + cells) * strides
    wh = np.exp(np.minimum(raw[:, 2:4], 20.0)) * strides
    return _best_class(np.concatenate([xy, wh], axis=1), raw[:, 5:], raw[:, 4], p)


def decode_yolov5(output: np.ndarray, input_size: tuple[int, int], p: DetectParams) -> Decoded:
    """YOLOv5-style [A, 5+C]: decoded cx, cy, w, h in input pixels, objectness, class scores."""
    return _best_class(output[:, :4], output[:, 5:], output[:, 4], p)


def decode_yolov8(output: np.ndarray, input_size: tuple[int, int], p: DetectParams) -> Decoded:
    """YOLOv8-style [4+C, A]: decoded cx, cy, w, h rows then class score rows, no objectness."""
    out = output.T
    return _best_class(out[:, :4], out[:, 4:], None, p)


DECODERS: dict[str, Callable[[np.ndarray, tuple[int, int], DetectParams], Decoded]] = {
    "yolox": decode_yolox,
    "yolov5": decode_yolov5,
    "yolov8": decode_yolov8,
}


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
) -> list[dict]:
    """One image's thresholded candidates [k, 6] (model-input pixels) to the contract's detections: class-aware NMS,
    boxes mapped to original frame pixels, best first."""
    boxes, scores, class_ids = candidates[:, :4], candidates[:, 4], candidates[:, 5].astype(np.int64)
    keep = nms(boxes, scores, class_ids, p.iou, p.max_detections)
    frame_boxes = unletterbox_boxes(boxes[keep], letterbox_info, *frame_size).tolist()
    return [
        {
            "box": [round(v, 2) for v in box],
            "score": round(score, 4),
            "class_id": cid,
            "label": labels[cid] if cid < len(labels) else str(cid),
        }
        for box, score, cid in zip(frame_boxes, scores[keep].tolist(), class_ids[keep].tolist())
    ]


def postprocess(
    output: np.ndarray,
    fmt: str,
    letterbox_info: dict,
    frame_size: tuple[int, int],
    labels: list[str],
    p: DetectParams,
) -> list[dict]:
    """One image's raw output to the contract's detections: boxes in original frame pixels, best first."""
    decoded = DECODERS[fmt](output, tuple(letterbox_info["input"]), p)
    return finish_candidates(pack_candidates(*decoded), letterbox_info, frame_size, labels, p)
