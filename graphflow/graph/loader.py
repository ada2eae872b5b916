"""Loading a graph document: JSON parsing, field and param checks, ports, topology; every mistake one line."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

import graphflow.graph.fields as fields
import graphflow.graph.registry as registry
from graphflow.engine import Engine, Param
from graphflow.errors import GraphError, ParamError
from graphflow.graph.model import EDGE, ENGINE_ID, GROUP, MAX_DIGITS, NODE, PLACEMENTS, SETTINGS, TOP, Edge, Graph, Node
from graphflow.graph.restrictions import Restrictions

log = logging.getLogger(__name__)


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


def loads(text: str) -> Any:
    """JSON text read with the graph file's rules (unique keys, finite numbers, bounded integers),
    for documents that arrive on their own (API bodies); ValueError with a one-line reason."""
    try:
        return _loads(text)
    except _BadValue as exc:
        raise ValueError(str(exc)) from None


def _loads(text: str) -> Any:
    """json.loads with the graph file's rules; JSONDecodeError for bad syntax, _BadValue for the rest."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_float=_finite, parse_int=_int,
                          parse_constant=_not_a_number)
    except RecursionError:
        raise _BadValue("invalid JSON: nested too deeply") from None


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """`--set engine.param=value` strings → {engine: {param: value}}; values are JSON when they parse. The param
    may reach inside lists and objects (`src.sources.0.uri`); such keys keep their dots until the graph is built."""
    out: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, eq, raw = item.partition("=")
        engine_id, dot, param = key.partition(".")
        if not eq or not dot or not engine_id or not param or "" in param.split("."):
            raise _error("--set", item, "expected ENGINE.PARAM=VALUE (PARAM may go on: sources.0.uri)")
        try:
            value = _loads(raw)
        except json.JSONDecodeError:
            value = raw
        except _BadValue as exc:
            raise _error("--set", item, str(exc)) from None
        out.setdefault(engine_id, {})[param] = value
    return out


def load(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None, *,
         restrictions: Restrictions | None = None) -> Graph:
    """Read, validate and build a graph; every problem is a GraphError naming file, engine and field. Relative paths
    in it are relative to its folder; `restrictions` (restricted mode) is for graphs from untrusted sources."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _error(file, "", f"cannot read: {exc.strerror}") from None
    doc = _parse(file, raw)
    return build(doc, file, overrides, restrictions=restrictions)


@dataclass
class _Context:
    """What building one graph needs beyond the document: where relative paths and modules are looked up."""

    file: str
    restrictions: Restrictions | None
    folder: str  # the graph file's folder (the current one for a document without a file)
    cwd: str = field(default_factory=os.getcwd)

    def base(self, kind: str) -> str:
        """Folder a relative path of the graph file is resolved against."""
        return self.restrictions.base(kind) if self.restrictions else self.folder

    def set_base(self, kind: str) -> str:
        """Folder a relative path given with `--set` is resolved against: the current one (the user's shell)."""
        return self.restrictions.base(kind) if self.restrictions else self.cwd

    @property
    def search(self) -> list[str]:
        """Folders where `module:Class` modules are looked for: none in restricted mode."""
        return [] if self.restrictions else list(dict.fromkeys([self.folder, self.cwd]))


def build(doc: Any, file: str = "<graph>", overrides: dict[str, dict[str, Any]] | None = None, *,
          restrictions: Restrictions | None = None) -> Graph:
    """Validate a parsed graph document (see `load`); relative paths are taken from the folder of `file`. Mistakes
    in separate engines, connections and `--set`s are all found in one pass: the GraphError raised is the first,
    its `errors` every one (a connection to an engine that failed is not checked)."""
    if not isinstance(doc, dict):
        raise _error(file, "", "top level must be an object with 'engines' and 'connections'")
    top = _fields(file, "", doc, TOP, "field")
    engines = top["engines"]
    if not engines:
        raise _error(file, "engines", "graph has no engines (need an object of id → engine)")
    errors: list[GraphError] = []
    for eid in engines:
        if not ENGINE_ID.fullmatch(eid):
            errors.append(_error(file, "engines", f"bad engine id {eid!r}: use 1 to 64 letters, digits, '_' or '-' "
                                 "('.' separates engine and port)"))
    settings = _fields(file, "settings", top["settings"], SETTINGS, "setting")
    ctx = _Context(file, restrictions, os.path.dirname(os.path.abspath(file)))
    overrides = copy.deepcopy(overrides or {})
    for engine_id in overrides:
        if engine_id not in engines:
            errors.append(_error(file, f"--set {engine_id}", f"no engine {engine_id!r} (engines: "
                                 f"{', '.join(engines)})"))
    nodes = _nodes(ctx, engines, overrides, errors)
    edges = _edges(file, top["connections"], nodes, set(engines) - set(nodes), settings["queue_capacity"], errors)
    if errors:
        raise GraphError.of(errors)
    graph = Graph(top["name"] or Path(file).stem, file, nodes, edges, settings)
    _check_topology(graph)
    _check_upstream(graph)
    return graph


def _nodes(ctx: _Context, engines: dict[str, Any], overrides: dict[str, dict[str, Any]],
           errors: list[GraphError]) -> dict[str, Node]:
    """The engines that pass their checks; each one that does not adds its error to `errors`."""
    nodes = {}
    for eid, spec in engines.items():
        if ENGINE_ID.fullmatch(eid):
            with _collected(errors):
                nodes[eid] = _node(ctx, eid, spec, overrides.get(eid, {}))
    return nodes


def _edges(file: str, connections: list[Any], nodes: dict[str, Node], failed: set[str], capacity: int,
           errors: list[GraphError]) -> list[Edge]:
    """The connections that pass their checks (those naming a `failed` engine are not checked); each one that does
    not adds its error to `errors`."""
    edges = []
    for i, conn in enumerate(connections):
        if not failed & _engines_named(conn):
            with _collected(errors):
                edges.append(_edge(file, i, conn, nodes, capacity))
    return edges


def _engines_named(conn: Any) -> set[str]:
    """The engine ids a connection's ends name, as far as it is well formed (the rest is `_edge`'s to report)."""
    ends = conn if isinstance(conn, list) else [conn.get("from"), conn.get("to")] if isinstance(conn, dict) else []
    return {end.partition(".")[0] for end in ends if isinstance(end, str)}


@contextlib.contextmanager
def _collected(errors: list[GraphError]) -> Iterator[None]:
    """Add a GraphError raised in the block to `errors` (with those it carries) instead of stopping there."""
    try:
        yield
    except GraphError as exc:
        errors.extend(exc.errors)


def _fields(file: str, where: str, raw: Any, schema: dict[str, Param], what: str) -> dict[str, Any]:
    """`raw` checked against `schema` by fields.check_keys, any mistake as one GraphError line."""
    if not isinstance(raw, dict):
        raise _error(file, where, "must be an object")
    try:
        return fields.check_keys(where, raw, schema, what)
    except ParamError as exc:
        raise _error(file, exc.field, exc.message) from None


@contextlib.contextmanager
def _reported(file: str, where: str, what: str) -> Iterator[None]:
    """Turn what an engine's own checks raise into one GraphError line naming the engine's params."""
    try:
        yield
    except GraphError:
        raise
    except ParamError as exc:
        raise _error(file, f"{where}.params.{exc.field}" if exc.field else f"{where}.params", exc.message) from None
    except ValueError as exc:  # the other way engines may report a user's mistake in one line
        raise _error(file, f"{where}.params", str(exc)) from None
    except Exception as exc:  # a bug in the engine's own check: still one line naming the engine (-v: traceback)
        log.debug("%s: %s failed", where, what, exc_info=True)
        raise _error(file, f"{where}.params", f"{what} raised {type(exc).__name__}: {exc}") from None


def _placement(file: str, where: str, value: str) -> str:
    if value in PLACEMENTS or GROUP.fullmatch(value):
        return value
    raise _error(file, where, f"must be one of {', '.join(PLACEMENTS)}, or process:NAME to share one process with "
                              f"the engines of the same NAME (letters, digits, _ . -) (got {value!r})")


def _node(ctx: _Context, eid: str, spec: Any, override: dict[str, Any]) -> Node:
    file, where = ctx.file, f"engines.{eid}"
    if not isinstance(spec, dict):
        raise _error(file, where, "must be an object with 'type' and optional 'params'")
    node = _fields(file, where, spec, NODE, "field")
    type_name = node["type"]
    if not type_name:
        raise _error(file, f"{where}.type", "needs an engine type name (got '')")
    try:
        if ctx.restrictions:
            ctx.restrictions.check_type(type_name)
        cls = registry.resolve(type_name, ctx.search)
    except ValueError as exc:
        raise _error(file, f"{where}.type", str(exc)) from None
    with _reported(file, where, f"{type_name} check()"):
        params = _params(ctx, eid, cls, node["params"], override)
        if ctx.restrictions:
            ctx.restrictions.check_params(cls, params)
        _import_modules(ctx, cls, params)
        cls(eid, params).check()
    return Node(eid, type_name, cls, params, placement=_placement(file, f"{where}.placement", node["placement"]),
                on_error=node["on_error"], restart=node["restart"], max_restarts=node["max_restarts"],
                max_rss_mb=node["max_rss_mb"])


def _params(ctx: _Context, eid: str, cls: type[Engine], params: dict[str, Any],
            override: dict[str, Any]) -> dict[str, Any]:
    """The node's params with the graph's relative paths resolved against its folder, then the `--set` values
    applied (their relative paths resolved against the current folder)."""
    params = copy.deepcopy(params)
    fields.resolve_paths(cls, params, ctx.base)
    for key, value in override.items():
        holder, last, keys = _set_target(ctx.file, eid, params, key)
        holder[last] = fields.resolve_value(cls, keys, value, ctx.set_base)
    return params


def _set_target(file: str, eid: str, params: dict[str, Any], key: str) -> tuple[Any, Any, list[Any]]:
    """Where `--set eid.key=…` writes inside params: (holder, key or index, the typed key path)."""
    holder: Any = params
    keys: list[Any] = []
    parts = key.split(".")
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if isinstance(holder, list):
            if not part.isdigit() or int(part) >= len(holder):
                raise _error(file, f"--set {eid}.{key}", f"no item {part!r} in {'.'.join(map(str, keys))} "
                             f"(a list of {len(holder)}: 0 to {len(holder) - 1})")
            part = int(part)
        elif not isinstance(holder, dict):
            raise _error(file, f"--set {eid}.{key}", f"{'.'.join(map(str, keys))} is not an object or a list")
        elif not last and part not in holder:
            raise _error(file, f"--set {eid}.{key}", f"no field {part!r} to go into (set the whole "
                         f"{'.'.join(map(str, keys + [part]))} instead)")
        keys.append(part)
        if last:
            return holder, part, keys
        holder = holder[part]
    raise AssertionError("unreachable: parse_set refuses empty keys")


def _import_modules(ctx: _Context, cls: type[Engine], params: dict[str, Any]) -> None:
    """Let the `module:name` values an engine declares find modules beside the graph file, as types do."""
    for spec in fields.declared(cls):
        if spec.kind == "module":
            for found in fields.find(params, spec):
                registry.make_importable(found.value.partition(":")[0], ctx.search)


def _endpoint(file: str, where: str, ref: str, nodes: dict[str, Node], output: bool) -> tuple[str, str]:
    if not ref:
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
    edge = _fields(file, where, {"capacity": capacity, **conn}, EDGE, "field")
    src, src_port = _endpoint(file, f"{where}.from", edge["from"], nodes, output=True)
    dst, dst_port = _endpoint(file, f"{where}.to", edge["to"], nodes, output=False)
    return Edge(src, src_port, dst, dst_port, edge["policy"], edge["capacity"], edge["feedback"], edge["slots"])


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


def _check_upstream(graph: Graph) -> None:
    """Call `check_upstream(params, upstream)` of each engine class that defines it, with the (class, params) of
    every engine feeding it directly or not, in graph order: cross-engine checks such as a rule's class names
    against the labels of the model upstream. Params come with their defaults filled in. Every engine is checked
    before the first error is raised, carrying all (GraphError.of)."""
    errors: list[GraphError] = []
    for node in graph.nodes.values():
        hook = getattr(node.cls, "check_upstream", None)
        if hook is None:
            continue
        with _collected(errors), _reported(graph.file, f"engines.{node.id}", f"{node.type} check_upstream()"):
            hook(complete_params(node), upstream_of(graph, node.id))
    if errors:
        raise GraphError.of(errors)


def upstream_of(graph: Graph, engine: str) -> list[tuple[type[Engine], dict[str, Any]]]:
    """(class, params with defaults) of every engine feeding `engine`, directly or not, in graph order: what an
    engine's `check_upstream` is given (also by the service, checking a stream's new rules)."""
    g = nx.DiGraph([(e.src, e.dst) for e in graph.edges if not e.feedback])
    g.add_nodes_from(graph.nodes)
    before = nx.ancestors(g, engine)
    return [(graph.nodes[a].cls, complete_params(graph.nodes[a])) for a in nx.topological_sort(g) if a in before]


def complete_params(node: Node) -> dict[str, Any]:
    """A copy of the node's params with every declared default filled in."""
    defaults = {name: p.default for name, p in node.cls.declared_params().items() if not p.required}
    return copy.deepcopy({**defaults, **node.params})
