"""Loader/validator: every bad input gives one line naming file, engine and field; CLI exits 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from graphflow import graph
from graphflow.errors import GraphError

ROOT = Path(__file__).resolve().parents[1]
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
    (variant(settings={"queue_capacity": -3}), "settings.queue_capacity", "must be ≥ 1 (got -3)"),
    (variant(settings={"queue_capacity": 10**12}), "settings.queue_capacity", "must be ≤ 10000"),
    (variant(settings={"shutdown_timeout": 1e12}), "settings.shutdown_timeout", "must be ≤ 3600"),
    (variant(settings={"stats_interval": 0}), "settings.stats_interval", "must be ≥ 0.01"),
    (variant(settings={"colour": 1}), "settings.colour", "unknown setting"),
    (variant(connections=[{"from": "src", "to": "out", "capacity": 10**12}]), "connections[0].capacity", "≤ 10000"),
    (variant(connections=[{"from": "src", "to": "out", "slots": 10**12}]), "connections[0].slots", "≤ 10000"),
    (variant(connections=[{"from": "src", "to": "out", "feedback": 1}]), "connections[0].feedback", "true or false"),
    (variant(engines__src__max_restarts=10**9), "engines.src.max_restarts", "≤ 1000"),
    (variant(engines={"a/b": {"type": "source"}}), "engines", "bad engine id 'a/b'"),
    (variant(engines={"..": {"type": "source"}}), "engines", "bad engine id '..'"),
    (variant(engines={"a b": {"type": "source"}}), "engines", "bad engine id 'a b'"),
    (variant(description=["not", "text"]), "description", "must be a string"),
    (variant(name=3), "name", "must be a string"),
    (variant(nodes={}), "nodes", "unknown field (known: name, description, engines, connections, settings)"),
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


def test_description_accepted(write_graph):
    g = graph.load(write_graph({**GOOD, "name": "g", "description": "two engines, for people to read"}))
    assert g.name == "g"


# Relative paths: one rule, relative to the graph file's folder; `--set` values relative to the current folder.

def paths_doc():
    """A graph whose every kind of path param is relative: video, model, detection file, sinks, a user's param."""
    return {
        "engines": {
            "src": {"type": "decode", "params": {"sources": [{"id": "a", "uri": "data/demo.mp4"},
                                                             {"id": "b", "uri": "rtsp://127.0.0.1:8554/cam"}]}},
            "det": {"type": "infer", "params": {"model": "models/det.onnx"}},
            "named": {"type": "infer", "params": {"model": "yolox-nano"}},
            "mot": {"type": "detfile", "params": {"path": "data/walkers_det.txt"}},
            "out": {"type": "publish", "params": {"sinks": [
                {"kind": "jsonl", "path": "out/events.jsonl"}, {"kind": "jsonl", "path": "-"},
                {"kind": "video", "path": "out/{stream}.mp4"}]}},
            "mine": {"type": "pathengines:Report"}},
        "connections": [["src", "det"], ["src", "named"], ["det", "out"], ["named", "out"], ["mot", "mine"]],
    }


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp/project/: a graph's folder with data/, models/, out/ and a user engine module; cwd is tmp/elsewhere."""
    folder = tmp_path / "project"
    (folder / "models").mkdir(parents=True)
    (folder / "out").mkdir()
    (folder / "data").symlink_to(ROOT / "graphs" / "data")
    (folder / "models" / "det.onnx").symlink_to(ROOT / "graphflow" / "models" / "yolox_nano.onnx")
    (folder / "pathengines.py").write_text(
        "from graphflow import Engine, Param\n"
        "class Report(Engine):\n"
        "    outputs = ()\n"
        "    path = Param(str, 'report.txt', path='write')\n"
        "    def process(self, msg):\n        pass\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "pathengines", raising=False)
    return folder


def test_relative_paths_are_relative_to_the_graph_file(project):
    path = project / "graph.json"
    path.write_text(json.dumps(paths_doc()))
    g = graph.load(path)
    sources = g.nodes["src"].params["sources"]
    assert sources[0]["uri"] == str(project / "data/demo.mp4")
    assert sources[1]["uri"] == "rtsp://127.0.0.1:8554/cam"
    assert g.nodes["det"].params["model"] == str(project / "models/det.onnx")
    assert g.nodes["named"].params["model"] == "yolox-nano"
    assert g.nodes["mot"].params["path"] == str(project / "data/walkers_det.txt")
    sinks = g.nodes["out"].params["sinks"]
    assert [s["path"] for s in sinks] == [str(project / "out/events.jsonl"), "-", str(project / "out/{stream}.mp4")]
    assert g.nodes["mine"].params == {"path": str(project / "report.txt")}  # a default path too
    doc = paths_doc()
    doc["engines"]["mine"]["params"] = {"path": "../reports/r.txt"}
    path.write_text(json.dumps(doc))
    assert graph.load(path).nodes["mine"].params["path"] == str(project.parent / "reports/r.txt")


def test_set_paths_are_relative_to_the_current_folder_and_index_lists(project):
    path = project / "graph.json"
    path.write_text(json.dumps(paths_doc()))
    cwd = project.parent / "elsewhere"
    (cwd / "clip.mp4").symlink_to(ROOT / "graphs/data/demo.mp4")
    g = graph.load(path, graph.parse_set(["src.sources.0.uri=clip.mp4", "src.sources.1.fps=5",
                                          "out.sinks.0.path=mine.jsonl", 'mine.path=r.txt']))
    assert g.nodes["src"].params["sources"][0]["uri"] == str(cwd / "clip.mp4")
    assert g.nodes["src"].params["sources"][1] == {"id": "b", "uri": "rtsp://127.0.0.1:8554/cam", "fps": 5}
    assert g.nodes["out"].params["sinks"][0]["path"] == str(cwd / "mine.jsonl")
    assert g.nodes["out"].params["sinks"][2]["path"] == str(project / "out/{stream}.mp4")
    assert g.nodes["mine"].params["path"] == str(cwd / "r.txt")
    whole = graph.parse_set(['src.sources=[{"uri": "clip.mp4"}]'])
    assert graph.load(path, whole).nodes["src"].params["sources"] == [{"uri": str(cwd / "clip.mp4")}]


@pytest.mark.parametrize("item,message", [
    ("src.sources.2.uri=x", "--set src.sources.2.uri: no item '2' in sources (a list of 2: 0 to 1)"),
    ("src.sources.first.uri=x", "no item 'first' in sources"),
    ("src.sources.0.uri.x=1", "sources.0.uri is not an object or a list"),
    ("src.nothing.x=1", "no field 'nothing' to go into"),
])
def test_set_into_lists_and_objects_errors(project, item, message):
    path = project / "graph.json"
    path.write_text(json.dumps(paths_doc()))
    with pytest.raises(GraphError) as info:
        graph.load(path, graph.parse_set([item]))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("item", ["src..uri=1", "src.=1", ".x=1", "src.x"])
def test_parse_set_refuses_malformed(item):
    with pytest.raises(GraphError, match="expected ENGINE.PARAM=VALUE"):
        graph.parse_set([item])


def test_example_graphs_validate_from_another_folder(tmp_path):
    files = sorted(str(p) for p in (ROOT / "graphs").glob("*.json"))
    proc = subprocess.run([sys.executable, "-m", "graphflow", "validate", *files], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok (") == len(files)


# Modules beside the graph file or in the current folder, as `python -m` finds them.

ECHO = "from graphflow import Engine\nclass Echo(Engine):\n    def process(self, msg):\n        self.send(msg)\n"


def echo_doc(module, placement="thread", out="-"):
    return {"engines": {"src": {"type": "source", "params": {"count": 5}},
                        "e": {"type": f"{module}:Echo", "placement": placement},
                        "out": {"type": "sink", "params": {"path": out}}},
            "connections": [["src", "e"], ["e", "out"]]}


@pytest.fixture
def clean_imports(monkeypatch):
    """Undo what loading adds to sys.path (each test's module has a name of its own)."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_module_beside_the_graph_file_is_found(tmp_path, monkeypatch, clean_imports):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "besideengines.py").write_text(ECHO)
    (tmp_path / "proj" / "g.json").write_text(json.dumps(echo_doc("besideengines")))
    monkeypatch.chdir(tmp_path)
    assert graph.load(tmp_path / "proj" / "g.json").nodes["e"].cls.__name__ == "Echo"


def test_module_in_the_current_folder_is_found(tmp_path, monkeypatch, clean_imports):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "cwdengines.py").write_text(ECHO)
    (tmp_path / "g.json").write_text(json.dumps(echo_doc("cwdengines")))
    monkeypatch.chdir(tmp_path / "here")
    sys.path[:] = [p for p in sys.path if p not in ("", ".", str(tmp_path / "here"))]
    assert graph.load(tmp_path / "g.json").nodes["e"].cls.__name__ == "Echo"


def test_failed_import_says_where_it_looked(tmp_path, monkeypatch, clean_imports):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "g.json").write_text(json.dumps(echo_doc("nowhereengines")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GraphError) as info:
        graph.load(tmp_path / "proj" / "g.json")
    assert str(info.value) == (f"{tmp_path / 'proj' / 'g.json'}: engines.e.type: cannot import 'nowhereengines:Echo': "
                               f"No module named 'nowhereengines' (looked in {tmp_path / 'proj'}, {tmp_path} "
                               "and the Python path)")


def test_process_engine_from_a_module_beside_the_graph(tmp_path, monkeypatch, clean_imports):
    """The child process unpickles the engine class by module name: it must find the module too."""
    from graphflow import runtime

    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "childengines.py").write_text(ECHO)
    out = tmp_path / "out.jsonl"
    (tmp_path / "proj" / "g.json").write_text(json.dumps(echo_doc("childengines", "process", str(out))))
    monkeypatch.chdir(tmp_path)
    summary = runtime.run(graph.load(tmp_path / "proj" / "g.json"), handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    assert len(out.read_text().splitlines()) == 5


# Cross-engine checks: check_upstream(params, upstream) sees every engine feeding a node.

HOOKS = '''
from graphflow import Engine, Param, ParamError

class Labels(Engine):
    labels = Param(list, ["person", "car"])
    def process(self, msg):
        self.send(msg)

class Picky(Engine):
    outputs = ()
    wanted = Param(list, [])
    seen = []

    @classmethod
    def check_upstream(cls, params, upstream):
        cls.seen.append([(c.__name__, p) for c, p in upstream])
        known = {label for c, p in upstream for label in p.get("labels", [])}
        for i, name in enumerate(params["wanted"]):
            if name not in known:
                raise ParamError(f"wanted[{i}]", f"{name!r} is not a label upstream ({', '.join(sorted(known))})")

    def process(self, msg):
        pass
'''


def hooks_doc(wanted):
    return {"engines": {"src": {"type": "source"}, "lab": {"type": "hookengines:Labels"},
                        "mid": {"type": "map", "params": {"function": "graphflow.examples:identity"}},
                        "other": {"type": "source"}, "pick": {"type": "hookengines:Picky", "params": {"wanted": wanted}},
                        "log": {"type": "sink"}},
            "connections": [["src", "lab"], ["lab", "mid"], ["mid", "pick"], ["other", "log"]]}


def test_check_upstream_sees_transitive_upstream_engines(write_graph, user_module):
    user_module("hookengines", HOOKS)
    g = graph.load(write_graph(hooks_doc(["car"])))
    picky = g.nodes["pick"].cls
    assert [[name for name, _ in call] for call in picky.seen] == [["Source", "Labels", "Map"]]
    assert picky.seen[0][1][1] == {"labels": ["person", "car"]}  # defaults filled in
    with pytest.raises(GraphError) as info:
        graph.load(write_graph(hooks_doc(["car", "persn"])))
    assert str(info.value).endswith("engines.pick.params.wanted[1]: 'persn' is not a label upstream (car, person)")


def test_bad_field_declaration_is_one_line(write_graph, user_module):
    user_module("baddecl", "from graphflow import Engine\nclass E(Engine):\n    outputs = ()\n"
                "    path_fields = {'files[].path': 'writ'}\n")
    doc = {"engines": {"src": {"type": "source"}, "e": {"type": "baddecl:E"}}, "connections": [["src", "e"]]}
    with pytest.raises(GraphError, match=r"engines.e.params: E declares field 'files\[\].path' as 'writ' "
                                         r"\(expected a pattern such as 'sinks\[\].path' of kind read, write, state, "
                                         r"bind\)"):
        graph.load(write_graph(doc))


def test_a_users_own_engines_package_does_not_shadow_the_built_in_ones(tmp_path):
    """Built-in engines import as graphflow.engines, so a project folder with an `engines` package of its own
    still gets both: its Echo and the built-in source and sink."""
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "__init__.py").write_text("")
    (tmp_path / "engines" / "source.py").write_text(ECHO)
    (tmp_path / "g.json").write_text(json.dumps(echo_doc("engines.source")))
    proc = subprocess.run([sys.executable, "-m", "graphflow", "launch", "g.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 5


MISTAKES = """\
{"engines": {"src": {"type": "decode", "params": {"sources": [{"id": "c", "uri": "nonexist.mp4"}]}},
 "det": {"type": "infer", "params": {"confidence": 0.3}},
 "trk": {"type": "tracker"},
 "cnt": {"type": "mistakes:CountPeopel"},
 "out": {"type": "publish", "params": {"sinks": [{"kind": "jsonl", "path": "o.jsonl"}]}}},
 "connections": [["src", "det"], ["det", "trk"], ["trk", "cnt"], ["cnt", "out"], ["out", "nowhere"]]}
"""


def test_every_independent_mistake_is_reported_in_one_pass(write_graph, user_module):
    """Four broken engines and a broken connection: five lines, in file order; the connections naming a broken
    engine are not reported again. `graph.load` raises the first, carrying all; `validate` prints all."""
    user_module("mistakes", "from graphflow import Engine\n\nclass CountPeople(Engine):\n"
                            "    inputs = ('in',)\n    outputs = ('out',)\n")
    path = write_graph(MISTAKES)
    with pytest.raises(GraphError) as info:
        graph.load(path)
    lines = [str(e) for e in info.value.errors]
    assert [line.split(": ")[1] for line in lines] == [
        "engines.src.params.sources[0].uri", "engines.det.params.confidence", "engines.trk.type", "engines.cnt.type",
        "connections[4].from"]
    assert str(info.value) == lines[0] and all("\n" not in line for line in lines)
    assert "did you mean 'conf'?" in lines[1]
    assert "did you mean 'track'?" in lines[2]
    assert "did you mean 'CountPeople'? engines in it: CountPeople" in lines[3]
    proc = subprocess.run([sys.executable, "-m", "graphflow", "validate", str(path)], capture_output=True, text=True,
                          cwd=path.parent)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {line}" for line in lines]


def test_unknown_keys_suggest_the_closest_known_one(write_graph):
    with pytest.raises(GraphError, match=r"settings.queue_capacty: unknown setting \(did you mean 'queue_capacity'"):
        graph.load(write_graph(variant(settings={"queue_capacty": 3})))
    with pytest.raises(GraphError, match=r"unknown engine type 'zzz' \(built-ins"):  # nothing near: no guess
        graph.load(write_graph(variant(engines__src__type="zzz")))


def test_launch_also_prints_every_mistake_and_starts_nothing(write_graph, user_module):
    user_module("mistakes", "from graphflow import Engine\n\nclass CountPeople(Engine):\n"
                            "    inputs = ('in',)\n    outputs = ('out',)\n")
    path = write_graph(MISTAKES)
    proc = subprocess.run([sys.executable, "-m", "graphflow", "launch", str(path)], capture_output=True, text=True,
                          cwd=path.parent)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 5
    assert all(line.startswith(f"error: {path}: ") for line in proc.stderr.splitlines())
    assert not (path.parent / "o.jsonl").exists()
