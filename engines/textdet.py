"""Textdet engine: a DB text detector (PP-OCR's by default) as the first stage of an OCR graph; writes each frame's
text lines as data["detections"] (label "text"), which track and a `secondary` recogniser take on."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from graphflow import Detections, Message, Param, ParamError
from graphflow.detections import BOX_DECIMALS, SCORE_DECIMALS
from graphflow.frames import FrameEngine
from graphflow.media.modelinfo import inspect_model
from graphflow.media.models import open_session
from graphflow.vision.crops import CropSpec, crop_tensor
from graphflow.vision.ocr import PPOCR_MODELS, db_boxes, db_input_size, resolve_ppocr


class TextDet(FrameEngine):
    """Text detector (DB): finds text lines in each frame and adds them to data["detections"] as boxes in frame
    pixels with label "text". Consumes arrays["image"]; other messages pass on unchanged."""

    inputs = ("in",)
    outputs = ("out",)
    model = Param(str, "ppocr-det", path="read", names=tuple(PPOCR_MODELS),
                  doc="ppocr-det (PP-OCRv4, from rapidocr-onnxruntime: pip install -e '.[ocr]') or a DB ONNX file")
    limit = Param(int, 960, ge=32, doc="longest side the frame is scaled down to (multiples of 32 go in)")
    thresh = Param(float, 0.3, ge=0.0, le=1.0, doc="probability a pixel needs to be text")
    box_thresh = Param(float, 0.6, ge=0.0, le=1.0, doc="mean probability a text region needs to be kept")
    unclip = Param(float, 1.5, ge=0.0, doc="how far regions are grown back (DB's unclip ratio)")
    min_size = Param(int, 3, ge=1, doc="smallest region side kept, in model pixels")
    threads = Param(int, 1, ge=0, doc="onnxruntime CPU threads (0: onnxruntime's default)")

    def check(self) -> None:
        try:
            self.path = resolve_ppocr(self.model)
            head = inspect_model(self.path).head
        except ValueError as exc:
            raise ParamError("model", str(exc)) from None
        if head != "ppocr-det":
            raise ParamError("model", f"{Path(self.path).name} looks like a {head} model, not a DB text detector")

    def setup(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        self.session = open_session(Path(self.path), options)
        self.input_name = self.session.get_inputs()[0].name

    def process(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        if not self.takes(msg, image is not None, "arrays['image']", "put textdet after decode"):
            return
        height, width = image.shape[:2]
        size = db_input_size(width, height, self.limit)
        whole = CropSpec(size, normalize="signed", color="bgr")  # the frame as one crop, stretched to `size`
        tensor = crop_tensor(image, [0, 0, width, height], whole, msg.data.get("color", "bgr"))
        prob = self.session.run(None, {self.input_name: tensor[None]})[0][0, 0]
        sx, sy = width / size[0], height / size[1]
        found = db_boxes(prob, self.thresh, self.box_thresh, self.unclip, self.min_size)
        boxes = np.array([box for box, _ in found], np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
        detections = Detections(np.round(boxes, BOX_DECIMALS), np.round([score for _, score in found], SCORE_DECIMALS),
                                np.zeros(len(found), np.int32), ["text"] * len(found))
        self.send(Message(msg.stream, msg.seq, msg.pts, {**msg.data, "detections": detections}, msg.arrays,
                          msg.times, msg.port))
