"""Graph JSON → validated `Graph` (a networkx MultiDiGraph of engine nodes and port-to-port edges)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from . import registry
from .engine import Engine
from .errors import GraphError, ParamError

PLACEMENTS = ("thread", "process")
POLICIES = ("block", "drop_oldest", "latest")
ON_ERROR = ("skip", "stop")
RESTART = ("never", "on-failure")
NODE_FIELDS = {"type", "placement", "params", "on_error", "restart", "max_restarts"}
EDGE_FIELDS = {"from", "to", "policy", "capacity", "feedback"}
SETTINGS = {"queue_capacity": (int, 8), "shutdown_timeout": (float, 10.0), "stats_interval": (float, 0.5)}


@dataclass
class Node:
    """One engine of the graph, as declared."""

    id: str
    type: str
    cls: type[Engine]
    params: dict[str, Any]
    placement: str = "thread"
    on_error: str = "skip"
    restart: str = "never"
    max_restarts: int = 3


@dataclass
class Edge:
    """A connection from one output port to one input port, with its queue policy."""

    src: str
    src_port: str
    dst: str
    dst_port: str
    policy: str = "block"
    capacity: int = 8
    feedback: bool = False

    @property
    def name(self) -> str:
        return f"{self.src}.{self.src_port}->{self.dst}.{self.dst_port}"


@dataclass
class Graph:
    """A validated graph, ready to run."""

    name: str
    file: str
    nodes: dict[str, Node]
    edges: list[Edge]
    settings: dict[str, Any] = field(default_factory=dict)

    def nx(self) -> nx.MultiDiGraph:
        """The graph as networkx: node attrs type/placement/params, edge attrs ports/policy."""
        g = nx.MultiDiGraph(name=self.name)
        for n in self.nodes.values():
            g.add_node(n.id, type=n.type, placement=n.placement, params=n.params, cls=n.cls)
        for e in self.edges:
            g.add_edge(e.src, e.dst, src_port=e.src_port, dst_port=e.dst_port, policy=e.policy,
                       capacity=e.capacity, feedback=e.feedback)
        return g

    def sources(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.cls.is_source()]


def _line_col_error(file: str, text: str, exc: json.JSONDecodeError) -> GraphError:
    return GraphError(file, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """`--set engine.param=value` strings → {engine: {param: value}}; values are JSON when they parse."""
    out: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, eq, raw = item.partition("=")
        engine_id, dot, param = key.partition(".")
        if not eq or not dot or not engine_id or not param:
            raise GraphError("--set", item, "expected ENGINE.PARAM=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(engine_id, {})[param] = value
    return out


def load(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Graph:
    """Read, validate and build a graph; every problem is a GraphError naming file, engine and field."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise GraphError(file, "", f"cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise _line_col_error(file, text, exc) from None
    except _DuplicateKey as exc:
        raise GraphError(file, "", f"duplicate key {exc.args[0]!r} (engine ids and fields must be unique)") from None
    return build(doc, file, overrides)


def build(doc: Any, file: str = "<graph>", overrides: dict[str, dict[str, Any]] | None = None) -> Graph:
    """Validate a parsed graph document (see `load`)."""
    if not isinstance(doc, dict):
        raise GraphError(file, "", "top level must be an object with 'engines' and 'connections'")
    unknown = set(doc) - {"name", "engines", "connections", "settings", "description"}
    if unknown:
        raise GraphError(file, sorted(unknown)[0], "unknown field (expected name, engines, connections, settings)")
    engines = doc.get("engines")
    if not isinstance(engines, dict) or not engines:
        raise GraphError(file, "engines", "graph has no engines (need an object of id → engine)")
    settings = _settings(file, doc.get("settings", {}))
    overrides = copy.deepcopy(overrides or {})
    for engine_id in overrides:
        if engine_id not in engines:
            raise GraphError(file, f"--set {engine_id}", f"no engine {engine_id!r} (engines: {', '.join(engines)})")
    nodes = {eid: _node(file, eid, spec, overrides.get(eid, {})) for eid, spec in engines.items()}
    conns = doc.get("connections", [])
    if not isinstance(conns, list):
        raise GraphError(file, "connections", "must be a list of [\"a.out\", \"b.in\"] pairs")
    edges = [_edge(file, i, c, nodes, settings["queue_capacity"]) for i, c in enumerate(conns)]
    graph = Graph(str(doc.get("name", Path(file).stem)), file, nodes, edges, settings)
    _check_topology(graph)
    return graph


def _settings(file: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise GraphError(file, "settings", "must be an object")
    out = {}
    for key, (typ, default) in SETTINGS.items():
        value = raw.get(key, default)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool) or value <= 0:
            raise GraphError(file, f"settings.{key}", f"must be a positive {typ.__name__} (got {value!r})")
        out[key] = value
    extra = set(raw) - set(SETTINGS)
    if extra:
        raise GraphError(file, f"settings.{sorted(extra)[0]}", f"unknown setting (known: {', '.join(SETTINGS)})")
    return out


def _choice(file: str, where: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise GraphError(file, where, f"must be one of {', '.join(choices)} (got {value!r})")
    return value


def _node(file: str, eid: str, spec: Any, override: dict[str, Any]) -> Node:
    where = f"engines.{eid}"
    if not isinstance(spec, dict):
        raise GraphError(file, where, "must be an object with 'type' and optional 'params'")
    extra = set(spec) - NODE_FIELDS
    if extra:
        raise GraphError(file, f"{where}.{sorted(extra)[0]}", f"unknown field (known: {', '.join(sorted(NODE_FIELDS))})")
    type_name = spec.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise GraphError(file, f"{where}.type", "missing engine type")
    try:
        cls = registry.resolve(type_name)
    except ValueError as exc:
        raise GraphError(file, f"{where}.type", str(exc)) from None
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise GraphError(file, f"{where}.params", "must be an object")
    params = {**params, **override}
    try:
        cls(eid, params).check()
    except ParamError as exc:
        raise GraphError(file, f"{where}.params.{exc.field}" if exc.field else f"{where}.params", exc.message) from None
    max_restarts = spec.get("max_restarts", 3)
    if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
        raise GraphError(file, f"{where}.max_restarts", f"must be an integer ≥ 0 (got {max_restarts!r})")
    return Node(eid, type_name, cls, params,
                placement=_choice(file, f"{where}.placement", spec.get("placement", "thread"), PLACEMENTS),
                on_error=_choice(file, f"{where}.on_error", spec.get("on_error", "skip"), ON_ERROR),
                restart=_choice(file, f"{where}.restart", spec.get("restart", "never"), RESTART),
                max_restarts=max_restarts)


def _endpoint(file: str, where: str, ref: Any, nodes: dict[str, Node], output: bool) -> tuple[str, str]:
    if not isinstance(ref, str) or not ref:
        raise GraphError(file, where, f"must be a string 'engine.port' (got {ref!r})")
    eid, _, port = ref.partition(".")
    if eid not in nodes:
        raise GraphError(file, where, f"no engine {eid!r} (engines: {', '.join(nodes)})")
    ports = nodes[eid].cls.outputs if output else nodes[eid].cls.inputs
    kind = "output" if output else "input"
    if not port:
        if len(ports) != 1:
            raise GraphError(file, where, f"engine {eid!r} has {len(ports)} {kind} ports ({', '.join(ports) or 'none'}); name one")
        port = ports[0]
    if port not in ports:
        raise GraphError(file, where, f"engine {eid!r} has no {kind} port {port!r} ({kind}s: {', '.join(ports) or 'none'})")
    return eid, port


def _edge(file: str, i: int, conn: Any, nodes: dict[str, Node], capacity: int) -> Edge:
    where = f"connections[{i}]"
    if isinstance(conn, list) and len(conn) == 2:
        conn = {"from": conn[0], "to": conn[1]}
    if not isinstance(conn, dict):
        raise GraphError(file, where, "must be [\"a.out\", \"b.in\"] or {\"from\": ..., \"to\": ..., \"policy\": ...}")
    extra = set(conn) - EDGE_FIELDS
    if extra:
        raise GraphError(file, f"{where}.{sorted(extra)[0]}", f"unknown field (known: {', '.join(sorted(EDGE_FIELDS))})")
    src, src_port = _endpoint(file, f"{where}.from", conn.get("from"), nodes, output=True)
    dst, dst_port = _endpoint(file, f"{where}.to", conn.get("to"), nodes, output=False)
    cap = conn.get("capacity", capacity)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise GraphError(file, f"{where}.capacity", f"must be an integer ≥ 1 (got {cap!r})")
    feedback = conn.get("feedback", False)
    if not isinstance(feedback, bool):
        raise GraphError(file, f"{where}.feedback", f"must be true or false (got {feedback!r})")
    return Edge(src, src_port, dst, dst_port, _choice(file, f"{where}.policy", conn.get("policy", "block"), POLICIES),
                cap, feedback)


def _check_topology(graph: Graph) -> None:
    file = graph.file
    seen: dict[tuple[str, str, str, str], int] = {}
    for i, e in enumerate(graph.edges):
        key = (e.src, e.src_port, e.dst, e.dst_port)
        if key in seen:
            raise GraphError(file, f"connections[{i}]", f"duplicate of connections[{seen[key]}] ({e.name})")
        seen[key] = i
    for node in graph.nodes.values():
        for port in node.cls.inputs:
            if not any(e.dst == node.id and e.dst_port == port for e in graph.edges):
                raise GraphError(file, f"engines.{node.id}", f"input port {port!r} is not connected")
    if not graph.sources():
        raise GraphError(file, "engines", "graph has no source engine (an engine with no inputs, e.g. decode or source)")
    g = nx.DiGraph([(e.src, e.dst) for e in graph.edges if not e.feedback])
    g.add_nodes_from(graph.nodes)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " → ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise GraphError(file, "connections", f"cycle {path} (mark one edge \"feedback\": true if intended)")
    reachable = set()
    for s in graph.sources():
        reachable |= {s} | nx.descendants(g, s)
    for eid in graph.nodes:
        if eid not in reachable:
            raise GraphError(file, f"engines.{eid}", "unreachable from any source")
