"""Engine types by name: built-ins, `package.module:Class`, and the `graphflow.engines` entry points."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .engine import Engine

BUILTINS = {
    "source": "engines.source:Source",
    "map": "engines.map:Map",
    "sink": "engines.sink:Sink",
    "decode": "engines.decode:Decode",
    "preprocess": "engines.preprocess:Preprocess",
    "infer": "engines.infer:Infer",
    "track": "engines.track:Track",
    "rule": "engines.rule:Rule",
    "publish": "engines.publish:Publish",
    "detfile": "engines.detfile:DetFile",
}


def _import(target: str) -> object:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(type_name: str) -> type[Engine]:
    """The Engine class for a graph `type`; raises ValueError with one line saying why not."""
    target = BUILTINS.get(type_name)
    if target is None:
        eps = {ep.name: ep.value for ep in entry_points(group="graphflow.engines")}
        target = eps.get(type_name)
    if target is None:
        if ":" not in type_name:
            raise ValueError(f"unknown engine type {type_name!r} (built-ins: {', '.join(available())}; "
                             "or give 'package.module:ClassName')")
        target = type_name
    try:
        cls = _import(target)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {target!r}: {exc}") from None
    except AttributeError as exc:
        raise ValueError(f"cannot find {target!r}: {exc}") from None
    except Exception as exc:  # a user's module failing at import time
        raise ValueError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise ValueError(f"{target!r} is not a graphflow.Engine subclass")
    return cls


def available() -> list[str]:
    """Names of built-in and entry-point engine types."""
    return sorted(set(BUILTINS) | {ep.name for ep in entry_points(group="graphflow.engines")})
