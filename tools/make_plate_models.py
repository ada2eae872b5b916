"""Build the two small classifiers graphs/plates.json chains before the plate reader, as real ONNX models:

- graphs/models/plate_colour.onnx: a crop's mean colour against the colours of licence plates (blue, yellow, green,
  white): the class is the nearest one (softmax over minus the squared distance, in 0-255 RGB);
- graphs/models/plate_class.onnx: the same measure mapped to the vehicle class that colour stands for on Chinese
  plates (GA 36: blue small vehicle, yellow large vehicle, green new-energy vehicle, white special vehicle).

Their weights are the colours themselves, written here, not learned: no model hub is needed. Labels files beside
them. Needs `onnx` (in the test extra).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "graphs" / "models"
COLOURS = {"blue": (20, 60, 170), "yellow": (230, 190, 20), "green": (0, 120, 60), "white": (245, 245, 240)}
CLASSES = {"blue": "small", "yellow": "large", "green": "new-energy", "white": "special"}
SIZE = 16
TEMPERATURE = 2000.0  # squared RGB distance per unit of logit: neighbouring colours still score apart


def nearest_colour_model(path: Path) -> Path:
    """[N, 3, SIZE, SIZE] RGB 0-255 → [N, len(COLOURS)] softmax of -|mean colour - prototype|² / TEMPERATURE."""
    protos = numpy_helper.from_array(np.array(list(COLOURS.values()), np.float32), "protos")  # [K, 3]
    scale = numpy_helper.from_array(np.array(-1.0 / TEMPERATURE, np.float32), "scale")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axis1")
    sum_axes = numpy_helper.from_array(np.array([2], np.int64), "axis2")
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[2, 3], keepdims=0),       # [N, 3]
             helper.make_node("Unsqueeze", ["mean", "axis1"], ["mean3"]),                    # [N, 1, 3]
             helper.make_node("Sub", ["mean3", "protos"], ["diff"]),                         # [N, K, 3]
             helper.make_node("Mul", ["diff", "diff"], ["sq"]),
             helper.make_node("ReduceSum", ["sq", "axis2"], ["dist"], keepdims=0),           # [N, K]
             helper.make_node("Mul", ["dist", "scale"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               ["n", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", len(COLOURS)])],
                              [protos, scale, axes, sum_axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="graphflow")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, labels in (("plate_colour", list(COLOURS)), ("plate_class", [CLASSES[c] for c in COLOURS])):
        nearest_colour_model(OUT / f"{name}.onnx")
        (OUT / f"{name}.txt").write_text("\n".join(labels) + "\n")
        print(f"wrote {OUT / name}.onnx and .txt")


if __name__ == "__main__":
    main()
