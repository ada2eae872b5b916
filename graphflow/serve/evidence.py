"""Evidence of each event: the annotated frame, the object's crop and a clip from `pre` seconds before the event's
frame to `post` after it (remuxed by the stream's decode engine from the packets it keeps), in one folder with
retention by age and total size, oldest first. Work happens on a thread of its own behind a bounded queue: a burst
of events never holds up the graph (an event whose evidence could not be queued is counted, not lost)."""
from __future__ import annotations

import io
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphflow.detections import Detections
from graphflow.message import Message

log = logging.getLogger(__name__)
KINDS = {"snapshot": "jpg", "crop": "crop.jpg", "clip": "mp4"}  # evidence kind → file suffix
GOP_MARGIN_S = 4.0  # packets kept beyond pre + post: the clip starts at the key frame at or before `pre`
PRUNE_EVERY_S = 30.0


@dataclass(frozen=True)
class EvidencePolicy:
    """How much evidence to keep: `pre`/`post` seconds of clip around the event, total size and age limits."""

    pre_s: float = 5.0
    post_s: float = 5.0
    keep_mb: float = 2000.0
    keep_days: float = 7.0
    quality: int = 85


def event_id() -> str:
    return uuid.uuid4().hex[:16]


class Evidence:
    """The service's evidence folder. `offer(...)` (from a task's tap) names each event's files and queues their
    making; `request_clip(task, stream, start, end, path)` is how a clip is asked of the stream's decode engine."""

    def __init__(self, folder: Path, policy: EvidencePolicy, request_clip: Callable[[str, str, float, float, Path],
                                                                                     None], size: int = 64) -> None:
        self.folder, self.policy, self.request_clip = folder, policy, request_clip
        folder.mkdir(parents=True, exist_ok=True)
        self.jobs: queue.Queue = queue.Queue(maxsize=size)
        self.counts = {"events": 0, "snapshots": 0, "crops": 0, "clips_asked": 0, "dropped": 0, "failed": 0,
                       "pruned": 0}
        self.bytes = 0
        self._pruned_at = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="evidence", daemon=True)
        self.thread.start()

    def keep_packets_s(self) -> float:
        """What a stream's source must keep of its packets for these clips."""
        return self.policy.pre_s + self.policy.post_s + GOP_MARGIN_S

    def path(self, eid: str, kind: str) -> Path:
        return self.folder / f"{eid}.{KINDS[kind]}"

    def offer(self, task: str, msg: Message, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`events` with an `id` each and the URLs of their evidence; their files are made in the background."""
        named = []
        for ev in events:
            eid = event_id()
            named.append({**ev, "id": eid, "evidence": {k: f"/events/{eid}/{k}.{'mp4' if k == 'clip' else 'jpg'}"
                                                        for k in KINDS}})
        try:
            self.jobs.put_nowait((task, msg, named))
            self.counts["events"] += len(named)
        except queue.Full:
            self.counts["dropped"] += len(named)
            for ev in named:
                ev["evidence"] = {}
        return named

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                task, msg, events = self.jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._make(task, msg, events)
            except Exception:  # a bug of ours must not end the evidence thread
                self.counts["failed"] += 1
                log.exception("evidence of %s#%s failed", msg.stream, msg.seq)
            if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                self.prune()

    def _make(self, task: str, msg: Message, events: list[dict[str, Any]]) -> None:
        image = msg.arrays.get("image")
        tracks = msg.data.get("tracks", msg.data.get("detections"))
        objects = Detections.of(tracks) if tracks is not None else Detections()
        snapshot = self._annotated(image, objects, msg.data.get("color", "bgr")) if image is not None else None
        for ev in events:
            if snapshot is not None:
                self._write(self.path(ev["id"], "snapshot"), snapshot)
                self.counts["snapshots"] += 1
                crop = self._crop(image, objects, ev, msg.data.get("color", "bgr"))
                if crop is not None:
                    self._write(self.path(ev["id"], "crop"), crop)
                    self.counts["crops"] += 1
            if msg.pts is not None:
                try:
                    self.request_clip(task, msg.stream, msg.pts - self.policy.pre_s, msg.pts + self.policy.post_s,
                                      self.path(ev["id"], "clip"))
                    self.counts["clips_asked"] += 1
                except Exception as exc:  # the source keeps no packets (an image folder), or it is gone
                    self.counts["failed"] += 1
                    log.debug("no clip for event %s: %s", ev["id"], exc)

    def _annotated(self, image: np.ndarray, objects: Detections, color: str) -> bytes:
        from graphflow.vision.osd import draw

        return self._jpeg(draw(image, objects, color=color), color)

    def _crop(self, image: np.ndarray, objects: Detections, ev: dict[str, Any], color: str) -> bytes | None:
        """The event's object (its track, else the box nearest the event's position), a little padded."""
        if not len(objects):
            return None
        ids = objects.track_ids.tolist()
        track = ev.get("track_id")
        if track in ids:
            i = ids.index(track)
        elif "position" in ev:
            centres = (objects.boxes[:, :2] + objects.boxes[:, 2:]) / 2
            i = int(np.argmin(((centres - np.asarray(ev["position"], np.float32)) ** 2).sum(axis=1)))
        else:
            return None
        x1, y1, x2, y2 = objects.boxes[i].tolist()
        pad_x, pad_y = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
        h, w = image.shape[:2]
        box = [max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y)), min(w, int(x2 + pad_x) + 1),
               min(h, int(y2 + pad_y) + 1)]
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            return None
        return self._jpeg(image[box[1]:box[3], box[0]:box[2]], color)

    def _jpeg(self, image: np.ndarray, color: str) -> bytes:
        from PIL import Image

        rgb = image[..., ::-1] if color == "bgr" else image
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).save(out, "JPEG", quality=self.policy.quality)
        return out.getvalue()

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
        self.bytes += len(data)

    def prune(self) -> None:
        """Delete the oldest evidence until the folder is under `keep_mb`, and any older than `keep_days`."""
        self._pruned_at = time.monotonic()
        files = []
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue
            if p.is_file() and not p.name.startswith("."):
                files.append((st.st_mtime, st.st_size, p))
        files.sort()
        total = sum(size for _, size, _ in files)
        limit, oldest = self.policy.keep_mb * 2**20, time.time() - self.policy.keep_days * 86400
        for mtime, size, p in files:
            if total <= limit and mtime >= oldest:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            self.counts["pruned"] += 1
        self.bytes = total

    def metrics(self) -> dict[str, Any]:
        return {**self.counts, "bytes": self.bytes, "queued": self.jobs.qsize()}
