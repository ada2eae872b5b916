"""Typed detections: one frame's objects as parallel arrays, the form `data["detections"]` and `data["tracks"]` take.

Columns: boxes (N, 4) float32 xyxy in frame pixels, scores (N,) float32, class ids (N,) int32, labels, track ids
(N,) int64, the second stage's attributes per object, and any other per-object fields a user engine adds. An
object lacks a field when its score is NaN, its class id or track id -1, its label or attributes None; it then
has no such key in its dict. Engines work on the columns; user code may iterate (dict-like `Detection`s) or use
`to_dicts`/`from_dicts`. It crosses processes as one msgpack extension (graphflow.message) and JSON as the list
of dicts, boxes with 2 decimals and scores with 4.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgpack
import numpy as np

from graphflow.errors import GraphflowError

FIELDS = ("box", "score", "class_id", "label", "track_id", "attributes")  # dict keys, in the order JSON shows them
BOX_DECIMALS, SCORE_DECIMALS = 2, 4
_KNOWN = frozenset(FIELDS)
_NUMERIC = (("boxes", np.float32), ("scores", np.float32), ("class_ids", np.int32), ("track_ids", np.int64))
_MISSING = {"scores": np.nan, "class_ids": -1, "track_ids": -1}  # what a numeric column holds for "no value"


class DetectionsError(GraphflowError, ValueError):
    """Objects sent as dicts that cannot be read as detections; one line naming the object and field."""


def _numbers(values: Any, n: int, dtype: type, fill: float, name: str) -> np.ndarray:
    """A numeric column of length n: `values` as `dtype` (no copy when it already is), or `fill` throughout."""
    if values is None:
        return np.full(n, fill, dtype)
    arr = np.asarray(values, dtype).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"detections: {name} has {len(arr)} values for {n} boxes")
    return arr


def _objects(values: Any, n: int, name: str) -> np.ndarray:
    """An object column of length n (labels, attributes, extra fields): None for every object when not given."""
    if isinstance(values, np.ndarray) and values.dtype == object and values.ndim == 1 and len(values) == n:
        return values
    if values is None:
        return np.empty(n, object)  # (filled with None)
    values = list(values)
    if len(values) != n:
        raise ValueError(f"detections: {name} has {len(values)} values for {n} boxes")
    return np.fromiter(values, object, n)  # each value kept whole, whatever it holds


class Detection(Mapping):
    """One object of a Detections, read (and written) like the dict it is published as: `d["box"]`, `d.get("track_id")`,
    `"attributes" in d`; typed as `d.box`, `d.score`, `d.label`, `d.track_id`. Writes go to the parent's columns."""

    __slots__ = ("_of", "_i")

    def __init__(self, of: Detections, index: int) -> None:
        self._of, self._i = of, index

    def _fields(self) -> dict[str, Any]:
        return self._of._row(self._i)

    def __getitem__(self, key: str) -> Any:
        return self._of._get(self._i, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields())

    def __len__(self) -> int:
        return len(self._fields())

    def __setitem__(self, key: str, value: Any) -> None:
        self._of._set(self._i, key, value)

    def __repr__(self) -> str:
        return repr(self._fields())

    @property
    def box(self) -> list[float]:
        return self["box"]

    @property
    def score(self) -> float | None:
        return self.get("score")

    @property
    def class_id(self) -> int | None:
        return self.get("class_id")

    @property
    def label(self) -> str | None:
        return self.get("label")

    @property
    def track_id(self) -> int | None:
        return self.get("track_id")

    @property
    def attributes(self) -> dict[str, Any] | None:
        return self.get("attributes")


class Detections:
    """One frame's objects as parallel columns (see the module docstring): engines pass it in `data["detections"]`
    and `data["tracks"]`. `len()`, iteration (`Detection`s), `d[i]`, `d[mask]` / `d[indices]` (a new Detections),
    `append`, and equality with another Detections or a list of dicts (compared as published)."""

    __slots__ = ("boxes", "scores", "class_ids", "labels", "track_ids", "attributes", "extra")
    __hash__ = None  # mutable

    def __init__(self, boxes: Any = (), scores: Any = None, class_ids: Any = None, labels: Any = None,
                 track_ids: Any = None, attributes: Any = None, extra: Any = None) -> None:
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.scores = _numbers(scores, n, np.float32, _MISSING["scores"], "scores")
        self.class_ids = _numbers(class_ids, n, np.int32, _MISSING["class_ids"], "class_ids")
        self.labels = _objects(labels, n, "labels")
        self.track_ids = _numbers(track_ids, n, np.int64, _MISSING["track_ids"], "track_ids")
        self.attributes = _objects(attributes, n, "attributes")
        self.extra = _objects(extra, n, "extra")  # per object: a dict of a user's own fields, or None

    @classmethod
    def of(cls, value: Detections | Iterable[Mapping[str, Any]] | None, where: str = "detections") -> Detections:
        """`value` as Detections: itself, or built from a list of dicts (what a user engine may send); None: empty.
        `where` names the value in errors (e.g. "data['tracks']")."""
        if isinstance(value, Detections):
            return value
        if value is None:
            return cls()
        return cls.from_dicts(value, where)

    @classmethod
    def from_dicts(cls, objects: Iterable[Mapping[str, Any]], where: str = "detections") -> Detections:
        """Detections from dicts with `box` and any of score, class_id, label, track_id, attributes (other keys are
        kept as the object's own fields); DetectionsError naming the object (`where[i]`) when one cannot be read."""
        if isinstance(objects, Detections):
            return objects
        if isinstance(objects, (str, bytes, Mapping)) or not isinstance(objects, Iterable):
            raise DetectionsError(f"{where}: expected a list of objects with a 'box' (got {type(objects).__name__})")
        objects = list(objects)
        parents = {id(obj._of): obj._of for obj in objects if isinstance(obj, Detection)}
        if len(parents) == 1 and all(isinstance(obj, Detection) for obj in objects):  # views of one Detections
            return next(iter(parents.values())).take(np.array([obj._i for obj in objects], np.intp))
        for i, obj in enumerate(objects):
            if not isinstance(obj, Mapping) or "box" not in obj:
                raise DetectionsError(f"{where}[{i}]: expected an object with a 'box' [x1, y1, x2, y2] "
                                      f"(got {obj!r:.80})")
        try:
            boxes = np.array([obj["box"] for obj in objects], np.float32).reshape(-1, 4)
            columns = (np.array([obj.get("score", np.nan) for obj in objects], np.float32),
                       np.array([_or(obj.get("class_id"), -1) for obj in objects], np.int32),
                       np.array([_or(obj.get("track_id"), -1) for obj in objects], np.int64))
        except (TypeError, ValueError):
            raise DetectionsError(_first_bad(objects, where)) from None
        extra = [None if _KNOWN.issuperset(obj) else {k: v for k, v in obj.items() if k not in _KNOWN}
                 for obj in objects]
        return cls(boxes, columns[0], columns[1], [obj.get("label") for obj in objects], columns[2],
                   [obj.get("attributes") for obj in objects], extra)

    def __len__(self) -> int:
        return len(self.boxes)

    def __bool__(self) -> bool:
        return len(self.boxes) > 0

    def __iter__(self) -> Iterator[Detection]:
        return (Detection(self, i) for i in range(len(self)))

    def __getitem__(self, key: int | slice | np.ndarray | list) -> Any:
        if isinstance(key, (int, np.integer)):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"detection {key} out of range ({n} objects)")
            return Detection(self, int(key) % n)
        return self.take(key)

    def take(self, rows: slice | np.ndarray | list) -> Detections:
        """The objects picked by a boolean mask, indices or a slice, as a new Detections."""
        if isinstance(rows, list):
            rows = np.asarray(rows, bool if rows and isinstance(rows[0], (bool, np.bool_)) else np.intp)
        new = Detections.__new__(Detections)
        for name in self.__slots__:  # every column indexed alike: dtypes and lengths stay right
            setattr(new, name, getattr(self, name)[rows])
        return new

    def replace(self, **columns: Any) -> Detections:
        """A new Detections with the given columns replaced (None: no object has a value) and the others shared;
        the new columns are checked against the number of boxes."""
        unknown = columns.keys() - set(self.__slots__)
        if unknown:
            raise TypeError(f"Detections.replace: unknown column {sorted(unknown)[0]!r}")
        new = Detections.__new__(Detections)
        new.boxes = np.asarray(columns["boxes"], np.float32).reshape(-1, 4) if "boxes" in columns else self.boxes
        n = len(new.boxes)
        for name, dtype in _NUMERIC[1:]:
            value = _numbers(columns[name], n, dtype, _MISSING[name], name) if name in columns else getattr(self, name)
            setattr(new, name, value)
        for name in ("labels", "attributes", "extra"):
            setattr(new, name, _objects(columns[name], n, name) if name in columns else getattr(self, name))
        if "boxes" in columns and any(len(getattr(new, name)) != n for name in self.__slots__):
            raise ValueError(f"detections: {n} boxes for {len(self)} objects (replace the other columns too)")
        return new

    def copy(self) -> Detections:
        """A copy whose columns can be changed without touching this one."""
        return self.replace(**{name: getattr(self, name).copy() for name in self.__slots__})

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        """The objects of several Detections, in order, as one."""
        parts = [cls.of(p) for p in parts]
        if not parts:
            return cls()
        return parts[0].replace(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.__slots__})

    def append(self, obj: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Add one object, given as a dict and/or keywords (`box=[x1, y1, x2, y2]`, score, class_id, label, track_id,
        attributes, or fields of your own). Each append copies the columns: build many objects with `from_dicts`."""
        joined = Detections.concat([self, Detections.from_dicts([{**(obj or {}), **fields}])])
        for name in self.__slots__:
            setattr(self, name, getattr(joined, name))

    def rounded_boxes(self) -> np.ndarray:
        """The boxes as float64 with the decimals they are published with (what arithmetic that must agree with the
        JSON output, e.g. a tracker's, takes)."""
        return np.round(self.boxes.astype(np.float64), BOX_DECIMALS)

    def rounded_scores(self) -> np.ndarray:
        """The scores as float64 with the decimals they are published with (NaN where an object has none)."""
        return np.round(self.scores.astype(np.float64), SCORE_DECIMALS)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One dict per object, keys in FIELDS order then the object's own fields; the JSON form."""
        if not len(self):
            return []
        boxes, scores = self.rounded_boxes().tolist(), self.rounded_scores().tolist()
        class_ids, labels, track_ids = self.class_ids.tolist(), self.labels.tolist(), self.track_ids.tolist()
        attributes, extra = self.attributes.tolist(), self.extra.tolist()
        tracked = min(track_ids) >= 0
        if (not np.isnan(self.scores).any() and min(class_ids) >= 0 and None not in labels
                and (tracked or max(track_ids) < 0) and attributes.count(None) == len(attributes) == extra.count(None)):
            if tracked:  # the common forms, as infer and track make them
                return [{"box": b, "score": s, "class_id": c, "label": lab, "track_id": t}
                        for b, s, c, lab, t in zip(boxes, scores, class_ids, labels, track_ids)]
            return [{"box": b, "score": s, "class_id": c, "label": lab}
                    for b, s, c, lab in zip(boxes, scores, class_ids, labels)]
        out = []
        for b, s, c, lab, t, a, e in zip(boxes, scores, class_ids, labels, track_ids, attributes, extra):
            obj: dict[str, Any] = {"box": b}
            if s == s:  # not NaN
                obj["score"] = s
            if c >= 0:
                obj["class_id"] = c
            if lab is not None:
                obj["label"] = lab
            if t >= 0:
                obj["track_id"] = t
            if a is not None:
                obj["attributes"] = a
            if e:
                obj.update(e)
            out.append(obj)
        return out

    def _row(self, i: int) -> dict[str, Any]:
        """Object i as its published dict."""
        obj: dict[str, Any] = {"box": np.round(self.boxes[i].astype(np.float64), BOX_DECIMALS).tolist()}
        if not np.isnan(self.scores[i]):
            obj["score"] = round(float(self.scores[i]), SCORE_DECIMALS)
        if self.class_ids[i] >= 0:
            obj["class_id"] = int(self.class_ids[i])
        if self.labels[i] is not None:
            obj["label"] = self.labels[i]
        if self.track_ids[i] >= 0:
            obj["track_id"] = int(self.track_ids[i])
        if self.attributes[i] is not None:
            obj["attributes"] = self.attributes[i]
        if self.extra[i]:
            obj.update(self.extra[i])
        return obj

    def _get(self, i: int, key: str) -> Any:
        """One field of object i as its dict has it; KeyError when the object lacks it."""
        if key == "box":
            return np.round(self.boxes[i].astype(np.float64), BOX_DECIMALS).tolist()
        if key == "score" and not np.isnan(self.scores[i]):
            return round(float(self.scores[i]), SCORE_DECIMALS)
        if key == "class_id" and self.class_ids[i] >= 0:
            return int(self.class_ids[i])
        if key == "track_id" and self.track_ids[i] >= 0:
            return int(self.track_ids[i])
        if key == "label" and self.labels[i] is not None:
            return self.labels[i]
        if key == "attributes" and self.attributes[i] is not None:
            return self.attributes[i]
        if key not in _KNOWN and self.extra[i] and key in self.extra[i]:
            return self.extra[i][key]
        raise KeyError(key)

    def _set(self, i: int, key: str, value: Any) -> None:
        """Write one field of object i (a Detection's item assignment)."""
        if key == "box":
            self.boxes[i] = value
        elif key == "score":
            self.scores[i] = np.nan if value is None else value
        elif key == "class_id":
            self.class_ids[i] = _or(value, -1)
        elif key == "track_id":
            self.track_ids[i] = _or(value, -1)
        elif key == "label":
            self.labels[i] = value
        elif key == "attributes":
            self.attributes[i] = value
        else:
            self.extra[i] = {**(self.extra[i] or {}), key: value}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Detections):
            return self.to_dicts() == other.to_dicts()
        if isinstance(other, (list, tuple)):
            return self.to_dicts() == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Detections({self.to_dicts()!r})"

    def pack(self) -> bytes:
        """The columns as one msgpack document (the body of graphflow.message's extension type)."""
        raw = b"".join([np.asarray(getattr(self, name), dtype).tobytes() for name, dtype in _NUMERIC])
        n = len(self)
        columns = [getattr(self, name).tolist() for name in ("labels", "attributes", "extra")]
        return msgpack.packb([n, raw, *(col if col.count(None) < n else None for col in columns)])

    @classmethod
    def unpack(cls, data: bytes) -> Detections:
        """Inverse of `pack`; the columns are writable (they view one private copy of the bytes)."""
        n, raw, labels, attributes, extra = msgpack.unpackb(data)
        buf, at, columns = bytearray(raw), 0, {}
        for name, dtype in _NUMERIC:
            count = n * 4 if name == "boxes" else n
            columns[name] = np.frombuffer(buf, dtype, count, at)
            at += count * np.dtype(dtype).itemsize
        new = cls.__new__(cls)
        new.boxes = columns["boxes"].reshape(n, 4)
        new.scores, new.class_ids, new.track_ids = columns["scores"], columns["class_ids"], columns["track_ids"]
        new.labels, new.attributes, new.extra = (_objects(v, n, "") for v in (labels, attributes, extra))
        return new


def _or(value: Any, default: int) -> Any:
    return default if value is None else value


def _first_bad(objects: list[Mapping[str, Any]], where: str) -> str:
    """Why the first object whose box or numbers cannot be columns is wrong, as `where[i].field: …`."""
    for i, obj in enumerate(objects):
        try:
            if np.asarray(obj["box"], np.float32).shape != (4,):
                raise ValueError
        except (TypeError, ValueError):
            return f"{where}[{i}].box: must be [x1, y1, x2, y2] (got {obj['box']!r:.80})"
        for key, dtype in (("score", np.float32), ("class_id", np.int32), ("track_id", np.int64)):
            value = obj.get(key)
            try:
                np.asarray(value if value is not None else 0, dtype).item()
            except (TypeError, ValueError):
                return f"{where}[{i}].{key}: must be a number (got {value!r:.80})"
    return f"{where}: cannot be read as detections"


def plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with each Detections value as its list of dicts: JSON- and msgpack-ready without extension types."""
    if not any(isinstance(v, Detections) for v in data.values()):
        return data if isinstance(data, dict) else dict(data)
    return {k: v.to_dicts() if isinstance(v, Detections) else v for k, v in data.items()}
