"""Engine types by name: built-ins, `package.module:Class`, and the `graphflow.engines` entry points."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from graphflow.engine import Engine
from graphflow.errors import did_you_mean

BUILTINS = {
    "source": "graphflow.engines.source:Source",
    "map": "graphflow.engines.map:Map",
    "sink": "graphflow.engines.sink:Sink",
    "decode": "graphflow.engines.decode:Decode",
    "preprocess": "graphflow.engines.preprocess:Preprocess",
    "infer": "graphflow.engines.infer:Infer",
    "track": "graphflow.engines.track:Track",
    "rule": "graphflow.engines.rule:Rule",
    "publish": "graphflow.engines.publish:Publish",
    "detfile": "graphflow.engines.detfile:DetFile",
    "secondary": "graphflow.engines.secondary:Secondary",
    "textdet": "graphflow.engines.textdet:TextDet",
}


def make_importable(module_name: str, search: Sequence[str]) -> None:
    """Append to sys.path the first folder of `search` holding `module_name`'s top-level module, when the Python
    path lacks it (as `python -m` finds modules in the current folder); appended, it shadows nothing installed, and
    child processes, which receive sys.path, find it too."""
    top = module_name.partition(".")[0]
    try:
        if not top or importlib.util.find_spec(top) is not None:
            return
        for folder in search:
            if importlib.machinery.PathFinder.find_spec(top, [folder]) is not None:
                if folder not in sys.path:
                    sys.path.append(folder)
                importlib.invalidate_caches()
                return
    except (ImportError, ValueError):  # a name that cannot be a module: the import itself says so
        return


def _import(target: str, search: Sequence[str] = ()) -> object:
    module_name, _, attr = target.partition(":")
    make_importable(module_name, search)
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(type_name: str, search: Sequence[str] = ()) -> type[Engine]:
    """The Engine class for a graph `type`; raises ValueError with one line saying why not. A `module:Class` module
    not on the Python path is looked for in the folders `search` (the graph file's, the current one)."""
    target = BUILTINS.get(type_name)
    if target is None:
        eps = {ep.name: ep.value for ep in entry_points(group="graphflow.engines")}
        target = eps.get(type_name)
    if target is None:
        if ":" not in type_name:
            raise ValueError(f"unknown engine type {type_name!r} ({did_you_mean(type_name, available())}built-ins: "
                             f"{', '.join(available())}; or give 'package.module:ClassName')")
        target = type_name
    try:
        cls = _import(target, search)
    except ModuleNotFoundError as exc:
        where = f"looked in {', '.join(search)} and the Python path" if search else "looked in the Python path"
        raise ValueError(f"cannot import {target!r}: {exc} ({where})") from None
    except AttributeError as exc:
        raise ValueError(f"cannot find {target!r}: {exc}{_engines_hint(target)}") from None
    except Exception as exc:  # a user's module failing at import time
        raise ValueError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise ValueError(f"{target!r} is not a graphflow.Engine subclass")
    return cls


def _engines_hint(target: str) -> str:
    """For a `module:Class` whose class is missing: the Engine classes its module does hold, the closest first."""
    module = sys.modules.get(target.partition(":")[0])
    names = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Engine)
             and v.__module__ == module.__name__] if module else []
    if not names:
        return ""
    return f" ({did_you_mean(target.rpartition(':')[2].rpartition('.')[2], names)}engines in it: {', '.join(names)})"


def available() -> list[str]:
    """Names of built-in and entry-point engine types."""
    return sorted(set(BUILTINS) | {ep.name for ep in entry_points(group="graphflow.engines")})
