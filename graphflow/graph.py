"""Graph JSON → validated `Graph` (a networkx MultiDiGraph of engine nodes and port-to-port edges)."""
from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from . import registry
from .engine import Engine
from .errors import GraphError, ParamError

log = logging.getLogger(__name__)
PLACEMENTS = ("thread", "process")
GROUP = re.compile(r"process:[A-Za-z0-9_.-]{1,64}")  # engines naming one group share one child process
POLICIES = ("block", "drop_oldest", "latest")
ON_ERROR = ("skip", "stop")
RESTART = ("never", "on-failure")
NODE_FIELDS = {"type", "placement", "params", "on_error", "restart", "max_restarts"}
EDGE_FIELDS = {"from", "to", "policy", "capacity", "feedback", "slots"}
MAX_DIGITS = 30  # longer integers in a graph file are a mistake (and slow to parse)
SETTINGS = {"queue_capacity": (int, 8), "shutdown_timeout": (float, 10.0), "stats_interval": (float, 0.5)}


@dataclass
class Node:
    """One engine of the graph, as declared."""

    id: str
    type: str
    cls: type[Engine]
    params: dict[str, Any]
    placement: str = "thread"  # "thread", "process" (a process of its own) or "process:GROUP" (shared)
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
    slots: int = 0  # shared-memory frame slots when it crosses processes (0: 2 × capacity + 8)

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


def _clean(text: str) -> str:
    """`text` with unprintable characters (newlines, controls) escaped, so an error stays one printable line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error(file: str, path: str, message: str) -> GraphError:
    """A GraphError whose parts, which may quote the user's keys and values, are made one printable line."""
    return GraphError(_clean(file), _clean(path), _clean(message))


class _BadValue(Exception):
    """Raised by the JSON parser hooks for what JSON parses but a graph file must not hold."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _BadValue(f"duplicate key {key!r} (engine ids and fields must be unique)")
        seen[key] = value
    return seen


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadValue(f"number {text[:20]} is out of range")
    return value


def _not_a_number(name: str) -> Any:
    raise _BadValue(f"{name} is not a number in JSON")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _BadValue(f"integer {text[:20]}… has more than {MAX_DIGITS} digits")
    return int(text)


def _parse(file: str, raw: bytes) -> Any:
    """Graph file bytes → JSON document; UTF-8 (a leading BOM allowed), finite numbers, unique keys."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _error(file, "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}") from None
    try:
        return _loads(text)
    except json.JSONDecodeError as exc:
        raise _error(file, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _BadValue as exc:
        raise _error(file, "", str(exc)) from None


def _loads(text: str) -> Any:
    """json.loads with the graph file's rules; JSONDecodeError for bad syntax, _BadValue for the rest."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_float=_finite, parse_int=_int,
                          parse_constant=_not_a_number)
    except RecursionError:
        raise _BadValue("invalid JSON: nested too deeply") from None


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """`--set engine.param=value` strings → {engine: {param: value}}; values are JSON when they parse."""
    out: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, eq, raw = item.partition("=")
        engine_id, dot, param = key.partition(".")
        if not eq or not dot or not engine_id or not param:
            raise _error("--set", item, "expected ENGINE.PARAM=VALUE")
        try:
            value = _loads(raw)
        except json.JSONDecodeError:
            value = raw
        except _BadValue as exc:
            raise _error("--set", item, str(exc)) from None
        out.setdefault(engine_id, {})[param] = value
    return out


def load(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Graph:
    """Read, validate and build a graph; every problem is a GraphError naming file, engine and field."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _error(file, "", f"cannot read: {exc.strerror}") from None
    doc = _parse(file, raw)
    return build(doc, file, overrides)


def build(doc: Any, file: str = "<graph>", overrides: dict[str, dict[str, Any]] | None = None) -> Graph:
    """Validate a parsed graph document (see `load`)."""
    if not isinstance(doc, dict):
        raise _error(file, "", "top level must be an object with 'engines' and 'connections'")
    unknown = set(doc) - {"name", "engines", "connections", "settings", "description"}
    if unknown:
        raise _error(file, sorted(unknown)[0], "unknown field (expected name, engines, connections, settings)")
    engines = doc.get("engines")
    if not isinstance(engines, dict) or not engines:
        raise _error(file, "engines", "graph has no engines (need an object of id → engine)")
    for eid in engines:
        if not eid or "." in eid or not eid.isprintable() or any(c.isspace() for c in eid):
            raise _error(file, "engines", f"bad engine id {eid!r}: needs letters, digits or symbols other than '.', "
                         "without spaces")
    name = doc.get("name", Path(file).stem)
    if not isinstance(name, str):
        raise _error(file, "name", f"must be a string (got {name!r})")
    settings = _settings(file, doc.get("settings", {}))
    overrides = copy.deepcopy(overrides or {})
    for engine_id in overrides:
        if engine_id not in engines:
            raise _error(file, f"--set {engine_id}", f"no engine {engine_id!r} (engines: {', '.join(engines)})")
    nodes = {eid: _node(file, eid, spec, overrides.get(eid, {})) for eid, spec in engines.items()}
    conns = doc.get("connections", [])
    if not isinstance(conns, list):
        raise _error(file, "connections", "must be a list of [\"a.out\", \"b.in\"] pairs")
    edges = [_edge(file, i, c, nodes, settings["queue_capacity"]) for i, c in enumerate(conns)]
    graph = Graph(name, file, nodes, edges, settings)
    _check_topology(graph)
    return graph


def _settings(file: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _error(file, "settings", "must be an object")
    out = {}
    for key, (typ, default) in SETTINGS.items():
        value = raw.get(key, default)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool) or value <= 0:
            raise _error(file, f"settings.{key}", f"must be a positive {typ.__name__} (got {value!r})")
        out[key] = value
    extra = set(raw) - set(SETTINGS)
    if extra:
        raise _error(file, f"settings.{sorted(extra)[0]}", f"unknown setting (known: {', '.join(SETTINGS)})")
    return out


def _choice(file: str, where: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise _error(file, where, f"must be one of {', '.join(choices)} (got {value!r})")
    return value


def _placement(file: str, where: str, value: Any) -> str:
    if value in PLACEMENTS or (isinstance(value, str) and GROUP.fullmatch(value)):
        return value
    raise _error(file, where, f"must be one of {', '.join(PLACEMENTS)}, or process:NAME to share one process with "
                              f"the engines of the same NAME (letters, digits, _ . -) (got {value!r})")


def _node(file: str, eid: str, spec: Any, override: dict[str, Any]) -> Node:
    where = f"engines.{eid}"
    if not isinstance(spec, dict):
        raise _error(file, where, "must be an object with 'type' and optional 'params'")
    extra = set(spec) - NODE_FIELDS
    if extra:
        raise _error(file, f"{where}.{sorted(extra)[0]}", f"unknown field (known: {', '.join(sorted(NODE_FIELDS))})")
    type_name = spec.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise _error(file, f"{where}.type", f"needs an engine type name (got {type_name!r})")
    try:
        cls = registry.resolve(type_name)
    except ValueError as exc:
        raise _error(file, f"{where}.type", str(exc)) from None
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise _error(file, f"{where}.params", "must be an object")
    params = {**params, **override}
    try:
        cls(eid, params).check()
    except ParamError as exc:
        raise _error(file, f"{where}.params.{exc.field}" if exc.field else f"{where}.params", exc.message) from None
    except ValueError as exc:  # the other way engines may report a user's mistake in one line
        raise _error(file, f"{where}.params", str(exc)) from None
    except Exception as exc:  # a bug in the engine's own check(): still one line naming the engine (-v: traceback)
        log.debug("engine %r check() failed", eid, exc_info=True)
        raise _error(file, f"{where}.params", f"{type_name} check() raised {type(exc).__name__}: {exc}") from None
    max_restarts = spec.get("max_restarts", 3)
    if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
        raise _error(file, f"{where}.max_restarts", f"must be an integer ≥ 0 (got {max_restarts!r})")
    return Node(eid, type_name, cls, params,
                placement=_placement(file, f"{where}.placement", spec.get("placement", "thread")),
                on_error=_choice(file, f"{where}.on_error", spec.get("on_error", "skip"), ON_ERROR),
                restart=_choice(file, f"{where}.restart", spec.get("restart", "never"), RESTART),
                max_restarts=max_restarts)


def _endpoint(file: str, where: str, ref: Any, nodes: dict[str, Node], output: bool) -> tuple[str, str]:
    if not isinstance(ref, str) or not ref:
        raise _error(file, where, f"must be a string 'engine.port' (got {ref!r})")
    eid, _, port = ref.partition(".")
    if eid not in nodes:
        raise _error(file, where, f"no engine {eid!r} (engines: {', '.join(nodes)})")
    ports = nodes[eid].cls.outputs if output else nodes[eid].cls.inputs
    kind = "output" if output else "input"
    if not port:
        if len(ports) != 1:
            raise _error(file, where, f"engine {eid!r} has {len(ports)} {kind} ports ({', '.join(ports) or 'none'}); name one")
        port = ports[0]
    if port not in ports:
        raise _error(file, where, f"engine {eid!r} has no {kind} port {port!r} ({kind}s: {', '.join(ports) or 'none'})")
    return eid, port


def _edge(file: str, i: int, conn: Any, nodes: dict[str, Node], capacity: int) -> Edge:
    where = f"connections[{i}]"
    if isinstance(conn, list) and len(conn) == 2:
        conn = {"from": conn[0], "to": conn[1]}
    if not isinstance(conn, dict):
        raise _error(file, where, "must be [\"a.out\", \"b.in\"] or {\"from\": ..., \"to\": ..., \"policy\": ...}")
    extra = set(conn) - EDGE_FIELDS
    if extra:
        raise _error(file, f"{where}.{sorted(extra)[0]}", f"unknown field (known: {', '.join(sorted(EDGE_FIELDS))})")
    src, src_port = _endpoint(file, f"{where}.from", conn.get("from"), nodes, output=True)
    dst, dst_port = _endpoint(file, f"{where}.to", conn.get("to"), nodes, output=False)
    cap = conn.get("capacity", capacity)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise _error(file, f"{where}.capacity", f"must be an integer ≥ 1 (got {cap!r})")
    slots = conn.get("slots", 0)
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
        raise _error(file, f"{where}.slots", f"must be an integer ≥ 0 (0: automatic) (got {slots!r})")
    feedback = conn.get("feedback", False)
    if not isinstance(feedback, bool):
        raise _error(file, f"{where}.feedback", f"must be true or false (got {feedback!r})")
    return Edge(src, src_port, dst, dst_port, _choice(file, f"{where}.policy", conn.get("policy", "block"), POLICIES),
                cap, feedback, slots)


def _check_topology(graph: Graph) -> None:
    file = graph.file
    seen: dict[tuple[str, str, str, str], int] = {}
    for i, e in enumerate(graph.edges):
        key = (e.src, e.src_port, e.dst, e.dst_port)
        if key in seen:
            raise _error(file, f"connections[{i}]", f"duplicate of connections[{seen[key]}] ({e.name})")
        seen[key] = i
    for node in graph.nodes.values():
        for port in node.cls.inputs:
            if not any(e.dst == node.id and e.dst_port == port for e in graph.edges):
                raise _error(file, f"engines.{node.id}", f"input port {port!r} is not connected")
    if not graph.sources():
        raise _error(file, "engines", "graph has no source engine (an engine with no inputs, e.g. decode or source)")
    g = nx.DiGraph([(e.src, e.dst) for e in graph.edges if not e.feedback])
    g.add_nodes_from(graph.nodes)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " → ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise _error(file, "connections", f"cycle {path} (mark one edge \"feedback\": true if intended)")
    reachable = set()
    for s in graph.sources():
        reachable |= {s} | nx.descendants(g, s)
    for eid in graph.nodes:
        if eid not in reachable:
            raise _error(file, f"engines.{eid}", "unreachable from any source")
