"""Small ONNX models built with onnx.helper for the model-tools, second-stage and OCR tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list, metadata: dict[str, str] | None) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def shaped_model(path: Path, input_shape: list, output_shape: list, metadata: dict[str, str] | None = None) -> Path:
    """A model whose declared input and output shapes are the given ones (dims: ints or axis names): enough for
    `graphflow model inspect`, which reads shapes and never runs the model."""
    fixed = [d if isinstance(d, int) else 1 for d in output_shape]
    zeros = numpy_helper.from_array(np.zeros(fixed, np.float32), "zeros")
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("Add", ["zeros", "m"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], [zeros], metadata)


def colour_classifier(path: Path, size: int = 16, sharpness: float = 0.2) -> Path:
    """A real classifier: [N, 3, size, size] → softmax over the mean of each channel ([N, 3] scores), so the class
    of a crop is its dominant channel (in the layout it was fed: RGB input → 0 red, 1 green, 2 blue)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[2, 3], keepdims=0),
             helper.make_node("Mul", ["mean", "k"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    k = numpy_helper.from_array(np.array(sharpness, np.float32), "k")
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [k], None)
