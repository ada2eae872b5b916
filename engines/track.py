"""Track engine: assigns per-stream track ids to data["detections"] and writes data["tracks"]."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from graphflow import Detections, Message, Param
from graphflow.frames import FrameEngine
from graphflow.vision.tracking import ByteTracker, IoUTracker, follow, make_tracker

log = logging.getLogger(__name__)


class Track(FrameEngine):
    """Follows detections over frames (greedy IoU or ByteTrack), one tracker per stream; adds data["tracks"].

    Consumes data["detections"]: a message without them that is not a frame (a total, an event) is passed on
    unchanged; a frame without them is an error (track before infer)."""

    inputs = ("in",)
    outputs = ("out",)
    algorithm = Param(str, "bytetrack", choices=("iou", "bytetrack"), doc="tracker kind")
    track_thresh = Param(float, 0.5, ge=0, le=1, doc="score from which a detection is 'high' (may start/keep tracks)")
    low_thresh = Param(float, 0.1, ge=0, le=1, doc="bytetrack: lowest score used in the second association")
    new_track_thresh = Param(float, -1.0, le=1, doc="bytetrack: score a new track needs (-1: track_thresh)")
    match_thresh = Param(float, 0.8, ge=0, le=1, doc="largest 1-IoU cost of a match (0.8: IoU ≥ 0.2)")
    track_buffer = Param(int, 30, ge=0, doc="frames a lost track is kept")
    min_hits = Param(int, 2, ge=1, doc="matches before a track is reported (those in a stream's first frame: at once)")
    class_aware = Param(bool, True, doc="match detections only to tracks of the same class")
    smooth = Param(bool, False, doc="bytetrack: report a box at its Kalman-filtered centre (with the detection's "
                                    "size) rather than the detection's own, less jitter")
    coast = Param(int, 0, ge=0, doc="frames a lost track is still reported, at its predicted box with no score "
                                    "(0: only tracks matched in the frame)")

    def setup(self) -> None:
        self.trackers: dict[str, IoUTracker | ByteTracker] = {}

    def _new_tracker(self) -> IoUTracker | ByteTracker:
        common = {"track_thresh": self.track_thresh, "match_thresh": self.match_thresh, "track_buffer": self.track_buffer,
                  "min_hits": self.min_hits, "class_aware": self.class_aware, "coast": self.coast}
        if self.algorithm == "bytetrack":
            common.update(low_thresh=self.low_thresh, smooth=self.smooth,
                          new_track_thresh=None if self.new_track_thresh < 0 else self.new_track_thresh)
        return make_tracker(self.algorithm, **common)

    def on_stream_end(self, stream: str) -> None:
        self.trackers.pop(stream, None)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "streams_held": len(self.trackers)}

    def process(self, msg: Message) -> None:
        dets = msg.data.get("detections")
        if not self.takes(msg, dets is not None, "data['detections']", "put infer before track"):
            return
        tracker = self.trackers.get(msg.stream)
        if tracker is None:
            tracker = self.trackers[msg.stream] = self._new_tracker()
        tracks = follow(tracker, Detections.of(dets, "data['detections']"))
        self.send(dataclasses.replace(msg, data={**msg.data, "tracks": tracks}))
