"""Loader/validator: every bad input gives one line naming file, engine and field; CLI exits 2."""
import json
import subprocess
import sys

import pytest

from graphflow import graph
from graphflow.errors import GraphError

GOOD = {
    "engines": {"src": {"type": "source", "params": {"count": 3}}, "out": {"type": "sink", "params": {"path": "-"}}},
    "connections": [["src.out", "out.in"]],
}


def variant(**changes):
    doc = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        target = doc
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[k]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return doc


CASES = [
    (variant(engines__src__type="nope"), "engines.src.type", "unknown engine type 'nope'"),
    (variant(engines__src__type="no_such_mod:Thing"), "engines.src.type", "cannot import"),
    (variant(engines__src__type="json:dumps"), "engines.src.type", "not a graphflow.Engine subclass"),
    (variant(engines__src__params={"count": -1}), "engines.src.params.count", "must be ≥ 0 (got -1)"),
    (variant(engines__src__params={"count": "many"}), "engines.src.params.count", "must be an integer"),
    (variant(engines__src__params={"cuont": 3}), "engines.src.params.cuont", "unknown parameter"),
    (variant(engines__src__params={"shape": [0, 2]}), "engines.src.params.shape", "positive integers"),
    (variant(engines__src__placement="gpu"), "engines.src.placement", "must be one of thread, process"),
    (variant(engines__src__placement="process:"), "engines.src.placement", "or process:NAME"),
    (variant(engines__src__placement="process:a b"), "engines.src.placement", "(got 'process:a b')"),
    (variant(engines__src__colour=1), "engines.src.colour", "unknown field"),
    (variant(connections=[["src.bad", "out.in"]]), "connections[0].from", "no output port 'bad'"),
    (variant(connections=[["src.out", "out.x"]]), "connections[0].to", "no input port 'x'"),
    (variant(connections=[["src.out", "ghost.in"]]), "connections[0].to", "no engine 'ghost'"),
    (variant(connections=[["src.out", "out.in"], ["src.out", "out.in"]]), "connections[1]", "duplicate"),
    (variant(connections=[]), "engines.out", "input port 'in' is not connected"),
    (variant(connections=[{"from": "src", "to": "out", "policy": "sometimes"}]), "connections[0].policy", "must be one of"),
    (variant(connections=[{"from": "src", "to": "out", "capacity": 0}]), "connections[0].capacity", "≥ 1"),
    (variant(engines={}), "engines", "graph has no engines"),
    (variant(settings={"queue_capacity": -3}), "settings.queue_capacity", "positive"),
]


@pytest.mark.parametrize("doc,field,text", CASES, ids=[c[1] + ":" + c[2][:20] for c in CASES])
def test_bad_graphs_name_file_engine_and_field(write_graph, doc, field, text):
    path = write_graph(doc)
    with pytest.raises(GraphError) as info:
        graph.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert text in message
    assert "\n" not in message


def test_malformed_json_reports_line_and_column(write_graph):
    path = write_graph('{\n  "engines": {\n    "src": {"type": "source",}\n  }\n}')
    with pytest.raises(GraphError, match=r"invalid JSON at line 3, column 30"):
        graph.load(path)


def test_duplicate_engine_id_rejected(write_graph):
    path = write_graph('{"engines": {"a": {"type": "source"}, "a": {"type": "sink"}}, "connections": []}')
    with pytest.raises(GraphError, match="duplicate key 'a'"):
        graph.load(path)


def map_doc(edges, feedback=False):
    engines = {"src": {"type": "source"}, "a": {"type": "map", "params": {"function": "graphflow.examples:double_value"}},
               "b": {"type": "map", "params": {"function": "graphflow.examples:double_value"}},
               "out": {"type": "sink"}}
    conns = [["src", "a"], ["a", "b"], ["b", "out"]] + edges
    return {"engines": engines, "connections": conns}


def test_cycle_rejected_unless_feedback(write_graph):
    with pytest.raises(GraphError, match=r"connections: cycle a → b → a"):
        graph.load(write_graph(map_doc([["b.out", "a.in"]])))
    g = graph.load(write_graph(map_doc([{"from": "b.out", "to": "a.in", "feedback": True}])))
    assert sum(e.feedback for e in g.edges) == 1


def test_unreachable_engine_rejected(write_graph):
    doc = map_doc([])
    doc["engines"]["lonely"] = {"type": "map", "params": {"function": "graphflow.examples:double_value"}}
    doc["engines"]["lonely2"] = {"type": "map", "params": {"function": "graphflow.examples:double_value"}}
    doc["connections"] += [["lonely", "lonely2"], ["lonely2", "lonely"]]
    with pytest.raises(GraphError, match="cycle|unreachable"):
        graph.load(write_graph(doc))


def test_map_function_must_import(write_graph):
    doc = map_doc([])
    doc["engines"]["a"]["params"]["function"] = "graphflow.examples:nothing_here"
    with pytest.raises(GraphError, match=r"engines.a.params.function: cannot load"):
        graph.load(write_graph(doc))


def test_set_overrides_params_and_is_validated(write_graph):
    path = write_graph(GOOD)
    g = graph.load(path, graph.parse_set(["src.count=7"]))
    assert g.nodes["src"].params["count"] == 7
    with pytest.raises(GraphError, match="engines.src.params.count: must be ≥ 0"):
        graph.load(path, graph.parse_set(["src.count=-2"]))
    with pytest.raises(GraphError, match="no engine 'zz'"):
        graph.load(path, graph.parse_set(["zz.count=1"]))


def test_user_engine_class_that_is_not_an_engine(write_graph, user_module):
    user_module("notengine", "class Thing:\n    pass\n")
    with pytest.raises(GraphError, match="engines.src.type: 'notengine:Thing' is not a graphflow.Engine subclass"):
        graph.load(write_graph(variant(engines__src__type="notengine:Thing")))


def test_cli_validate_exit_code_and_one_line(write_graph):
    path = write_graph(variant(engines__src__params={"count": -1}))
    proc = subprocess.run([sys.executable, "-m", "graphflow", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "engines.src.params.count: must be ≥ 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_engine_found_through_entry_point_group(tmp_path, write_graph, user_module, monkeypatch):
    user_module("epengines", "from graphflow import Engine\nclass Echo(Engine):\n"
                "    def process(self, msg):\n        self.send(msg)\n")
    dist = tmp_path / "epengines-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epengines\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[graphflow.engines]\necho = epengines:Echo\n")
    doc = {"engines": {"src": {"type": "source"}, "e": {"type": "echo"}, "out": {"type": "sink"}},
           "connections": [["src", "e"], ["e", "out"]]}
    g = graph.load(write_graph(doc))
    assert g.nodes["e"].cls.__name__ == "Echo"
