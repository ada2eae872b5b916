"""`graphflow validate`, `inspect` and `engines`: check, draw and document graphs and engine kinds."""
from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import graphflow.graph.registry as registry
from graphflow import graph as graph_mod
from graphflow.errors import GraphflowError
from graphflow.graph.render import default_png, render
from graphflow.graph.restrictions import Restrictions


def _restrictions(args: argparse.Namespace, path: str) -> Restrictions | None:
    """The restricted-mode policy `validate --restricted` checks a graph against (None without the flag): media
    under --media-root (default: the graph's folder), outputs under --output-root, modules from --allow-module,
    brokers on loopback or from --allow-broker."""
    if not args.restricted:
        return None
    return Restrictions(output_root=args.output_root, media_roots=tuple(args.media_root or [Path(path).parent]),
                  modules=tuple(args.allow_module), brokers=tuple(args.allow_broker))


def print_error(exc: GraphflowError) -> None:
    """A user's mistake on stderr, one `error:` line each: a GraphError carries every mistake found in its file."""
    for each in getattr(exc, "errors", [exc]):
        print(f"error: {each}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    code = 0
    for path in args.graph:
        try:
            g = graph_mod.load(path, graph_mod.parse_set(args.set), restrictions=_restrictions(args, path))
            mode = " in restricted mode" if args.restricted else ""
            print(f"{path}: ok{mode} ({len(g.nodes)} engines, {len(g.edges)} connections)")
        except GraphflowError as exc:
            print_error(exc)
            code = 2
    return code


def cmd_inspect(args: argparse.Namespace) -> int:
    g = graph_mod.load(args.graph, graph_mod.parse_set(args.set))
    output = args.output or (default_png(g) if args.format == "png" else None)
    out = render(g, args.format, output)
    if out is not None:
        print(out)
    else:
        print(f"wrote {output}")
    return 0


def _doc(obj: Any) -> str:
    """The first paragraph of a docstring as one line (docstrings wrap mid-sentence)."""
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())


def _sink_kinds() -> dict[str, list[str]]:
    """Each sink kind of `publish` with its keys described, from the sinks' own declarations."""
    from graphflow.engines.publish import sink_kinds

    return {kind: _described(keys) for kind, keys in sink_kinds().items()}


def _described(params: dict[str, Any], prefix: str = "") -> list[str]:
    """One `name: description` line per declared key, for `graphflow engines`."""
    return [f"{prefix}{k}: {p.describe()}" for k, p in params.items()]


def _rule_kinds() -> dict[str, list[str]]:
    """The keys every rule takes with the tests of its `attributes` filter, then each rule kind of `rule` with what
    it does and its own keys, described from the rules' declarations."""
    from graphflow.vision.rules import ATTRIBUTE_TEST, COMMON, RULE_CLASSES

    every = _described(COMMON) + _described(ATTRIBUTE_TEST, "attributes.NAME.")
    return {"every kind": every, **{kind: [_doc(cls), *_described(cls.params)] for kind, cls in RULE_CLASSES.items()}}


KINDS: dict[str, tuple[str, Callable[[], dict[str, list[str]]]]] = {
    "publish": ("sink kinds (sinks[i].kind)", _sink_kinds),
    "rule": ("rule kinds (rules[i].kind)", _rule_kinds),
}


def _engine_types(names: list[str]) -> list[tuple[str, Any]]:
    """(name, Engine class) of each engine type named (a `module:Class` also from the current folder; a name that
    is none: GraphflowError), or of every built-in, with the reason instead of the class for one that cannot load."""
    if names:
        try:
            return [(name, registry.resolve(name, [os.getcwd()])) for name in names]
        except ValueError as exc:
            raise GraphflowError(f"engines: {exc}") from None
    found: list[tuple[str, Any]] = []
    for name in registry.available():
        try:
            found.append((name, registry.resolve(name)))
        except ValueError as exc:
            found.append((name, str(exc)))
    return found


def cmd_engines(args: argparse.Namespace) -> int:
    width = max(shutil.get_terminal_size().columns, 60)

    def say(text: str, indent: str, hang: str = "") -> None:
        print(textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + hang,
                            break_long_words=False, break_on_hyphens=False))
    for name, cls in _engine_types(args.names):
        if isinstance(cls, str):
            print(f"{name}: unavailable ({cls})")
            continue
        say(f"{name}  — {_doc(cls)}", "", "    ")
        print(f"    inputs: {', '.join(cls.inputs) or '-'}   outputs: {', '.join(cls.outputs) or '-'}")
        for pname, p in cls.declared_params().items():
            say(f"{pname}: {p.describe()}", "    ", "    ")
        if name in KINDS:
            title, kinds = KINDS[name]
            print(f"    {title}:")
            for kind, lines in kinds().items():
                print(f"      {kind}")
                for line in lines:
                    say(line, "        ", "  ")
    return 0
