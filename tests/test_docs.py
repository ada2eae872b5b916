"""The README and docs/ say what the code does: sample output, examples, references, options and tables."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from graphflow.engines.publish import SINKS, sink_kinds
from graphflow import cli
from graphflow import graph
from graphflow.media.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}
SIDE = 96  # input size of the test models: its YOLOX grid (189 anchors) is no other dimension of theirs
GRID = sum((SIDE // s) ** 2 for s in (8, 16, 32))


def section(title: str) -> str:
    """The README text under `## title`, up to the next `## ` heading."""
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M).group(1)


def table_rows(text: str, header: str = "") -> dict[str, str]:
    """Rows of the markdown tables in `text` (only the one whose header line starts with `header`, if given), by
    their first cell's backticked name."""
    if header:
        text = re.search(rf"^{re.escape(header)}.*?\n((?:\|.*\n)+)", text, re.M).group(1)
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([^`]+)`[^|]*\|(.*)\|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def with_demo_video(folder: Path) -> None:
    """Put the demo video where the examples' relative paths (beside the graph file) expect it."""
    (folder / "data").mkdir()
    (folder / "data" / "demo.mp4").symlink_to(ROOT / "graphs" / "data" / "demo.mp4")


def test_readme_sample_error_is_what_validate_prints(tmp_path, monkeypatch, capsys):
    sample = re.search(r"`(error: graph\.json: engines\.det\.params\.conf: [^`]+)`", README).group(1)
    doc = json.loads((ROOT / "graphs" / "demo.json").read_text())
    doc["engines"]["det"]["params"]["conf"] = 2
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    with_demo_video(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "graph.json"]) == 2
    assert capsys.readouterr().err.strip() == sample


def test_readme_graph_example_validates(tmp_path):
    example = re.search(r"```json\n(.*?)```", section("Graph file"), re.S).group(1)
    (tmp_path / "example.json").write_text(example)
    with_demo_video(tmp_path)
    g = graph.load(tmp_path / "example.json")
    assert g.nodes["out"].params["sinks"][0]["what"] == "events"
    assert [e.policy for e in g.edges] == ["block", "drop_oldest"]


def test_readme_graph_reference_names_every_field_the_loader_accepts():
    text = section("Graph file")
    documented = set(table_rows(text))
    for schema in (graph.TOP, graph.NODE, graph.EDGE, graph.SETTINGS):
        assert set(schema) - {"from", "to"} <= documented, set(schema) - documented
    assert "`from`, `to`" in text


def test_readme_sink_table_matches_the_sink_declarations():
    rows = table_rows(section("Inputs and outputs"), "| kind |")
    assert set(rows) == set(SINKS)
    for kind, params in sink_kinds().items():
        keys = set(re.findall(r"`(\w+)` \(|`(\w+)`,|`(\w+)` \|", "| " + rows[kind]))
        named = {k for group in keys for k in group if k}
        assert set(params) <= named, (kind, set(params) - named)


def test_readme_backend_table_matches_the_backends():
    rows = table_rows(section("GPU"), "| `backend` |")
    assert set(rows) == set(BACKENDS)


@pytest.mark.parametrize("name", ["README.md", *sorted(DOCS)])
def test_paths_named_in_docs_exist(name):
    text = README if name == "README.md" else DOCS[name]
    base = ROOT if name == "README.md" else ROOT / "docs"
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    # files of the repository (the outputs a graph writes, e.g. graphs/demo.jsonl, are not)
    repo_paths = re.findall(r"`((?:bench|tools|docs|tests)/[\w./-]+\.(?:py|md|png)"
                            r"|graphs/[\w-]+\.json|graphs/data/[\w.-]+)`", text)
    assert links or repo_paths
    for link in links:
        assert (base / link).exists(), link
    for path in repo_paths:
        assert (ROOT / path).exists(), path


def bench_options() -> list[tuple[str, str]]:
    """(script, option) for every `--option` the docs give a bench script: in a README paragraph after the script's
    name, and in each `bench/NAME.py` section of docs/benchmarks.md."""
    found = []
    for paragraph in README.split("\n\n"):
        for script, rest in re.findall(r"(bench/\w+\.py)(.*?)(?=bench/\w+\.py|\Z)", paragraph, re.S):
            found += [(script, option) for option in re.findall(r"--[a-z][\w-]*", rest)]
    for script, body in re.findall(r"^## `(bench/\w+\.py)`(.*?)(?=^## |\Z)", DOCS["benchmarks.md"], re.S | re.M):
        found += [(script, option) for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", body)]
    return found


def test_bench_options_in_docs_exist_in_the_scripts():
    options = bench_options()
    assert len({option for _, option in options}) >= 20
    for script, option in options:
        assert f'"{option}"' in (ROOT / script).read_text(), f"{script} has no option {option}"


def constant_model(path: Path, input_hw: tuple[int, int], output_shape: tuple[int, ...]) -> Path:
    """An ONNX file with one image input [N, 3, H, W] and one constant output of `output_shape` (a head's shape)."""
    onnx = pytest.importorskip("onnx")  # the test extra's; the package reads models with onnxruntime alone
    from onnx import TensorProto, helper, numpy_helper

    value = numpy_helper.from_array(np.zeros(output_shape, np.float32), "head")
    node = helper.make_node("Constant", [], ["out"], value=value)
    graph_ = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["N", 3, *input_hw])],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(output_shape))])
    onnx.save(helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("name, head, anchors, preprocessing", [
    ("YOLOX", "yolox", GRID, ("bgr", "none", False)),
    ("YOLOv5-style", "yolov5", 3 * (SIDE // 8) ** 2, ("rgb", "unit", True)),
    ("YOLOv8-style", "yolov8", (SIDE // 8) ** 2, ("rgb", "unit", True)),
])
def test_readme_detector_heads_and_preprocessing_are_what_infer_reads(tmp_path, name, head, anchors, preprocessing):
    """A model file with the output shape the README gives for a head is read as that head, with the README's
    preprocessing and COCO's names for 80 classes."""
    from graphflow.media.models import resolve_model

    text = section("Bring your own detector")
    layout = re.search(rf"- {re.escape(name)}: `\[N, ([^\]]+)\]`", text).group(1)
    sizes = {"anchors": anchors, "5 + classes": 85, "4 + classes": 84}
    output = (1, *(sizes[dim] for dim in layout.split(", ")))
    spec = resolve_model(str(constant_model(tmp_path / f"{head}.onnx", (SIDE, SIDE), output)))
    assert spec.output_format == head
    assert (spec.preprocess.color, spec.preprocess.normalize, spec.preprocess.center) == preprocessing
    assert spec.preprocess.size == (SIDE, SIDE) and spec.preprocess.pad_value == 114
    assert spec.labels[0] == "person" and len(spec.labels) == 80
    said = re.sub(r"\s+", " ", text)
    assert "YOLOX models get BGR 0–255 padded at the bottom right" in said
    assert "YOLOv5/v8 models get RGB scaled to 0–1 and centred, padding 114" in said
