"""The graph loader fuzzed with hypothesis: random documents, mutated example graphs (keys, values, types),
damaged text (cut short, random unicode, bad UTF-8, odd numbers). `graph.load` must return a Graph or
raise a one-line GraphflowError, quickly; `graphflow validate` must exit 2 with one stderr line per bad file.

GRAPHFLOW_FUZZ_EXAMPLES=N runs N random (not the fixed, derandomised) examples per test."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from graphflow import graph
from graphflow.graph import fields
from graphflow.errors import GraphflowError
from graphflow.graph.restrictions import SAFE_ENGINES, Restrictions

ROOT = Path(__file__).resolve().parents[1]
EVERYTHING = {  # a valid graph with every built-in engine, rule kind, sink kind and most fields, to mutate too
    "name": "everything", "settings": {"queue_capacity": 4, "shutdown_timeout": 5, "stats_interval": 1},
    "engines": {
        "src": {"type": "decode", "params": {"sources": [
            {"id": "cam1", "uri": str(ROOT / "graphs" / "data" / "demo.mp4"), "fps": 10, "start": 1,
             "max_frames": 20, "loop": True},
            {"id": "cam2", "uri": "rtsp://127.0.0.1:8554/cam", "transport": "udp", "open_timeout": 2,
             "read_timeout": 2}],
            "color": "rgb", "queue_size": 4, "reconnect": True, "retry": 0.5, "retry_max": 8, "attempts": 5}},
        "pre": {"type": "preprocess",
                "params": {"size": [320, 320], "normalize": "unit", "pad_value": 0, "center": True}},
        "det": {"type": "infer", "placement": "process", "on_error": "stop", "restart": "on-failure", "max_restarts": 2,
                "params": {"model": "yolox-nano", "conf": 0.25, "iou": 0.5, "classes": ["person", 2], "max_batch": 4}},
        "trk": {"type": "track", "params": {"algorithm": "iou", "track_buffer": 10, "min_hits": 1}},
        "zone": {"type": "rule", "params": {"fps": 10, "rules": [
            {"id": "door", "kind": "line_cross", "line": [[0.5, 0], [0.5, 1]], "direction": "both",
             "classes": ["person"]},
            {"id": "yard", "kind": "zone", "polygon": [[0, 0], [1, 0], [1, 1]], "anchor": "center"},
            {"id": "wait", "kind": "dwell", "polygon": [[0, 0], [1, 0], [1, 1]], "seconds": 2},
            {"id": "crowd", "kind": "crowding", "polygon": [[0, 0], [1, 0], [1, 1]], "min_count": 3, "seconds": 1},
            {"id": "fast", "kind": "speed", "max_speed": 5, "window": 1}]}},
        "dbl": {"type": "map", "params": {"function": "graphflow.examples:identity"}},
        "out": {"type": "publish", "params": {"sinks": [
            {"kind": "jsonl", "path": "out.jsonl"}, {"kind": "video", "path": "out_{stream}.mp4", "fps": 10},
            {"kind": "redis", "url": "redis://127.0.0.1:6379/0", "stream": "ev", "what": "events", "maxlen": 100},
            {"kind": "zmq", "address": "tcp://127.0.0.1:5556"}, {"kind": "mot", "path": "mot.txt"},
            {"kind": "snapshot", "path": "snaps", "events": ["door"]}]}},
        "log": {"type": "sink", "params": {"path": "-", "arrays": True, "times": False}}},
    "connections": [["src.out", "pre.in"], {"from": "pre.out", "to": "det.in", "policy": "drop_oldest", "capacity": 2},
                    ["det", "trk"], ["trk", "zone"], ["zone", "dbl"], ["dbl", "out"],
                    {"from": "zone.out", "to": "log.in", "policy": "latest", "slots": 4}],
}
BASES = {p.name: json.loads(p.read_text()) for p in sorted((ROOT / "graphs").glob("*.json"))}
BASES["everything"] = EVERYTHING
EXAMPLES = int(os.environ.get("GRAPHFLOW_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 150, derandomize=not EXAMPLES, deadline=2000, database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: it writes patch files
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT_S = 5.0  # one load taking this long counts as a hang

SCALARS = (st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=12) | st.sampled_from(["", ".", "src.out", "a.b.c", "in", "out", "block", "process"])
           | st.sampled_from([10**12, 1e12, "a/b", "../../x", "/etc/passwd", "tcp://0.0.0.0:1", "http://h/x.mp4",
                              "os:system", "this:x", "-"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=10)
ODD_TEXT = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "[" * 100_000, '"\\ud800"', "\x00",
                            '"a\\nb"', "\ufeff", "{}", "]", ",", ":"])


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this thread if the block runs longer than `seconds`."""
    def expire(*_: Any) -> None:
        raise TimeoutError(f"graph.load still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    (path / "everything.json").write_text(json.dumps(EVERYTHING))
    graph.load(path / "everything.json")  # valid, and warms imports (onnxruntime, PyAV): deadlines time the loader only
    return path


def check_load(path: Path) -> graph.Graph | None:
    """Load `path`: a Graph (checked for consistency), or None after a one-line GraphflowError."""
    try:
        with time_limit(LIMIT_S):
            g = graph.load(path)
    except GraphflowError as exc:
        text = str(exc)
        assert text and "\n" not in text and "\r" not in text, repr(text)
        assert text.isprintable(), repr(text)
        assert "check() raised" not in text, f"a built-in engine's check() has a bug: {text}"
        return None
    nx_graph = g.nx()
    assert set(nx_graph.nodes) == set(g.nodes) and nx_graph.number_of_edges() == len(g.edges)
    assert all(e.src in g.nodes and e.dst in g.nodes for e in g.edges)
    return g


def tree_paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (keys and indexes) into a JSON tree, the root included."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from tree_paths(child, prefix + (key,))


def retyped(value: Any) -> list[Any]:
    """Same content, other JSON types: what a user gets wrong when hand-editing a graph."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), None]
    if isinstance(value, (int, float)):
        return [str(value), -value, value * 1_000_000, [value], float(value) + 0.5, bool(value)]
    if isinstance(value, str):
        return [len(value), [value], {value: value}, value.upper(), value + ".", value * 3, ""]
    if isinstance(value, list):
        return [{str(i): v for i, v in enumerate(value)}, value[:1], value + value, [value], len(value)]
    if isinstance(value, dict):
        return [list(value.values()), list(value), [value], {}]
    return [0, "", [], {}]


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """An example graph with one to four edits: replace, retype, delete, rename, insert."""
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(tree_paths(doc))))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        target = parent[path[-1]] if path else doc
        op = draw(st.sampled_from(["replace", "retype", "delete", "rename", "insert"]))
        if op == "insert" and isinstance(target, (dict, list)):
            key = draw(st.text(max_size=8) | st.sampled_from(["type", "params", "placement", "from", "policy"]))
            value = draw(VALUES)
            target.__setitem__(key, value) if isinstance(target, dict) else target.insert(0, value)
        elif not path:
            continue
        elif op == "delete":
            del parent[path[-1]]
        elif op == "rename" and isinstance(parent, dict):
            key = draw(st.text(max_size=8) | st.sampled_from(sorted(parent)))  # may collide with a sibling
            parent[key] = parent.pop(path[-1])
        elif op == "retype":
            parent[path[-1]] = draw(st.sampled_from(retyped(target)))
        else:
            parent[path[-1]] = draw(VALUES)
    return doc


@st.composite
def damaged_text(draw: st.DrawFn) -> bytes:
    """An example graph's (possibly mutated) JSON text cut short, or with text or bytes spliced in."""
    doc = draw(mutated()) if draw(st.booleans()) else BASES[draw(st.sampled_from(sorted(BASES)))]
    data = json.dumps(doc, indent=draw(st.sampled_from([None, 1]))).encode()
    at = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["cut", "text", "odd", "bytes"]))
    if how == "cut":
        return data[:at]
    if how == "bytes":
        return data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]
    spliced = draw(st.text(min_size=1, max_size=6) if how == "text" else ODD_TEXT)
    return data[:at] + spliced.encode("utf-8", "surrogatepass") + data[at:]


@FUZZ
@given(doc=VALUES | st.fixed_dictionaries({"engines": st.dictionaries(st.text(max_size=6), VALUES, max_size=3),
                                           "connections": VALUES}))
def test_random_documents(workdir, doc):
    path = workdir / "random.json"
    path.write_text(json.dumps(doc))
    check_load(path)


@FUZZ
@given(doc=mutated())
def test_mutated_example_graphs(workdir, doc):
    path = workdir / "mutated.json"
    path.write_text(json.dumps(doc))
    check_load(path)


@FUZZ
@given(data=damaged_text())
def test_damaged_graph_text(workdir, data):
    path = workdir / "damaged.json"
    path.write_bytes(data)
    check_load(path)


@FUZZ
@given(doc=mutated())
@example(doc=EVERYTHING)
@example(doc=BASES["demo.json"])
def test_mutated_example_graphs_restricted(workdir, doc):
    """In restricted mode a graph is refused in one line, or every file, URI, address and module it names is
    within the policy."""
    policy = Restrictions(output_root=workdir, media_roots=(ROOT / "graphs",), engines=SAFE_ENGINES | {"map"},
                    modules=("graphflow.examples",))
    try:
        with time_limit(LIMIT_S):
            g = graph.build(doc, "untrusted.json", restrictions=policy)
    except GraphflowError as exc:
        assert "\n" not in str(exc) and str(exc).isprintable(), repr(str(exc))
        return
    for node in g.nodes.values():
        assert node.type in policy.engines
        for spec in fields.declared(node.cls):
            for found in fields.find(node.params, spec):
                value = found.value
                if spec.kind in ("write", "state") and value != "-":
                    assert Path(os.path.realpath(value)).is_relative_to(workdir), (found.where, value)
                elif spec.kind == "read" and fields.is_path(value, spec):
                    assert Path(os.path.realpath(value)).is_relative_to(ROOT / "graphs"), (found.where, value)
                elif spec.kind == "read" and fields.URL.match(value):
                    assert value.split("://")[0] in policy.schemes, (found.where, value)
                elif spec.kind == "module":
                    assert value.startswith("graphflow.examples:"), (found.where, value)
                elif spec.kind == "bind" and value.startswith("ipc://"):
                    assert Path(os.path.realpath(value[6:])).is_relative_to(workdir), (found.where, value)
                elif spec.kind == "bind":
                    assert value.startswith(("tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:", "inproc://")), \
                        (found.where, value)


def test_cli_validate_reports_each_bad_file_on_one_line(tmp_path):
    files = []
    for i, data in enumerate([b'{"engines": {"src": {"type": "decode",', b"\xff\xfe{}", b"[" * 100_000,
                              json.dumps({"engines": {"a\nb": {"type": "source"}}}).encode(),
                              json.dumps({**BASES["demo.json"], "settings": {"queue_capacity": 1e999}}).encode(),
                              json.dumps({**BASES["counter.json"], "connections": [["src", "double.\n"]]}).encode()]):
        files.append(tmp_path / f"bad{i}.json")
        files[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "graphflow", "validate", *map(str, files)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(": ")[1] for line in lines] == list(map(str, files)), proc.stderr
    assert all(line.startswith("error: ") for line in lines)
