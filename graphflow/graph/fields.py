"""The params an engine declares as file paths, listen addresses or module references, found wherever they sit
(`sinks[].path`), so the loader resolves relative paths and restricted mode checks values without knowing engines;
and the declared keys of structures that are not engines (graph settings, rules), checked in one place."""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from graphflow.engine import REQUIRED, Engine, Param
from graphflow.errors import ParamError, did_you_mean

EACH = None  # a pattern step standing for every item of a list
KINDS = ("read", "write", "state", "bind", "connect", "module")  # state: a folder an engine keeps and reuses;
# connect: the URL of a server (a broker) the engine sends to
PATHS = ("read", "write", "state")  # kinds whose values are files or folders
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
STEP = re.compile(r"\[\]|[^.\[\]]+")


def schema(**params: Param) -> dict[str, Param]:
    """Named Params declaring the fields of a structure that is not an engine (graph settings, nodes, edges, batch
    policy), so they are checked, documented and listed like engine params."""
    for name, p in params.items():
        p.name = name
    return params


def check_keys(where: str, raw: Mapping[str, Any], params: Mapping[str, Param], what: str) -> dict[str, Any]:
    """`raw` checked against its declared `params` and completed with defaults: unknown keys, required keys, then each
    value by its Param. ParamError names the first faulty key (`rules[0].seconds`); `what` names the key kind in
    messages ("key for a dwell rule")."""
    def at(key: str) -> str:
        return f"{where}.{key}" if where else key
    unknown = sorted(set(raw) - set(params))
    if unknown:
        raise ParamError(at(unknown[0]), f"unknown {what} ({did_you_mean(unknown[0], params)}known: "
                                         f"{', '.join(params)})")
    out = {}
    for name, p in params.items():
        if name not in raw:
            if p.required:
                raise ParamError(at(name), f"required ({p.doc})" if p.doc else "required")
            out[name] = copy.deepcopy(p.default)
            continue
        try:
            out[name] = p.coerce(raw[name])
        except ParamError as exc:
            raise ParamError(at(name), exc.message) from None
    return out


class Shaped(Param):
    """A list or object Param whose items have a form of their own (points, a filter, a matrix): its type error and
    its description say that form; a named check of the items runs after coercion."""

    def __init__(self, type: type, default: Any = REQUIRED, *, form: str, doc: str = "") -> None:
        super().__init__(type, default, doc=doc)
        self.form = form

    def coerce(self, value: Any) -> Any:
        try:
            return super().coerce(value)
        except ParamError as exc:
            raise ParamError(exc.field, self.wrong(value)) from None

    def wrong(self, value: Any) -> str:
        """The message for a value not of this form, for the type check and the named check alike."""
        return f"must be {self.form} (got {value!r})"

    def describe(self) -> str:
        return self.form + super().describe().removeprefix(self.type.__name__)


@dataclass(frozen=True)
class FieldSpec:
    """One declared field: a pattern such as `sources[].uri`, what it holds, and values that are names, not paths."""

    pattern: str
    kind: str
    names: tuple[str, ...] = ()

    @property
    def steps(self) -> list[str | None]:
        return [EACH if s == "[]" else s for s in STEP.findall(self.pattern)]


@dataclass
class Found:
    """A string value at a declared field: where it is (`sinks[0].path`), and the dict or list holding it."""

    where: str
    holder: dict | list
    key: str | int
    spec: FieldSpec

    @property
    def value(self) -> str:
        return self.holder[self.key]


def declared(cls: type[Engine]) -> list[FieldSpec]:
    """Every path, bind, connect and module field of an engine class: from its Params and its `path_fields`,
    `bind_fields` and `connect_fields`."""
    specs = [FieldSpec(name, p.path, p.names) for name, p in cls.declared_params().items() if p.path]
    specs += [FieldSpec(name, "module") for name, p in cls.declared_params().items() if p.module]
    specs += [FieldSpec(pattern, kind) for pattern, kind in getattr(cls, "path_fields", {}).items()]
    specs += [FieldSpec(pattern, "bind") for pattern in getattr(cls, "bind_fields", ())]
    specs += [FieldSpec(pattern, "connect") for pattern in getattr(cls, "connect_fields", ())]
    for spec in specs:
        if spec.kind not in KINDS or not spec.steps:
            raise ValueError(f"{cls.__name__} declares field {spec.pattern!r} as {spec.kind!r} "
                             f"(expected a pattern such as 'sinks[].path' of kind {', '.join(KINDS[:4])})")
    return specs


def find(params: dict[str, Any], spec: FieldSpec) -> Iterator[Found]:
    """The string values of `params` at `spec`'s pattern; values of other types are left to the engine's check."""
    yield from _walk(params, spec.steps, "", spec)


def _walk(node: Any, steps: list[str | None], where: str, spec: FieldSpec) -> Iterator[Found]:
    step, rest = steps[0], steps[1:]
    if step is EACH:
        keys: list[Any] = list(range(len(node))) if isinstance(node, list) else []
    else:
        keys = [step] if isinstance(node, dict) and step in node else []
    for key in keys:
        here = f"{where}[{key}]" if step is EACH else f"{where}.{key}" if where else key
        if rest:
            yield from _walk(node[key], rest, here, spec)
        elif isinstance(node[key], str):
            yield Found(here, node, key, spec)


def is_path(value: str, spec: FieldSpec) -> bool:
    """Whether a path field's value names a local file: not empty, not '-' (stdout), not a URL, not a name."""
    return bool(value) and value != "-" and not URL.match(value) and value not in spec.names


def resolve(value: str, base: str) -> str:
    """`value` (`~` expanded) made absolute against the folder `base`, `.` and `..` folded."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def resolve_paths(cls: type[Engine], params: dict[str, Any], base: Callable[[str], str]) -> None:
    """Make every relative path in `params` (changed in place) absolute, a path Param's default included (added to
    `params`), so engines never depend on the current folder; `base(kind)` gives the folder per kind."""
    for name, p in cls.declared_params().items():
        spec = FieldSpec(name, p.path or "", p.names)
        if p.path and name not in params and isinstance(p.default, str) and is_path(p.default, spec):
            params[name] = p.default
    for spec in declared(cls):
        if spec.kind in PATHS:
            for found in list(find(params, spec)):
                if is_path(found.value, spec):
                    found.holder[found.key] = resolve(found.value, base(spec.kind))


def resolve_value(cls: type[Engine], keys: list[str | int], value: Any, base: Callable[[str], str]) -> Any:
    """`value` about to be set at `keys` inside params (a `--set`), with the paths it holds made absolute."""
    holder = {"value": value}
    for spec in declared(cls):
        if spec.kind not in PATHS:
            continue
        rest = _remainder(spec.steps, keys)
        if rest is not None:
            for found in list(_walk(holder, ["value", *rest], "", spec)):
                if is_path(found.value, spec):
                    found.holder[found.key] = resolve(found.value, base(spec.kind))
    return holder["value"]


def _remainder(steps: list[str | None], keys: list[str | int]) -> list[str | None] | None:
    """The pattern steps left below `keys`, or None when `keys` do not lead into the pattern."""
    if len(keys) > len(steps):
        return None
    for step, key in zip(steps, keys):
        if (step is EACH and not isinstance(key, int)) or (step is not EACH and step != key):
            return None
    return steps[len(keys):]
