"""Restricted mode, for graphs, streams and rules that arrive from others (the service's network API): which engine
code may be imported, which files read or written, which addresses bound, which brokers sent to and URIs opened;
decided before any of it.

A graph the user gives on the command line is their own configuration and is loaded without a policy."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from graphflow.engine import Engine
from graphflow.errors import ParamError
from graphflow.graph.fields import URL, Found, declared, find, is_path, resolve_paths

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Built-ins whose every file, address and module param is declared, so the checks below cover them; a new built-in
# joins this list once its declarations are complete. `map` is left out: running code is its purpose, so a policy
# lists it when wanted (its `function` must then come from `modules` too).
SAFE_ENGINES = frozenset({"decode", "preprocess", "infer", "track", "rule", "publish", "detfile", "source", "sink",
                          "secondary", "textdet"})


@dataclass(frozen=True)
class Restrictions:
    """What an untrusted graph may do. Relative read paths resolve against the first media root, relative write
    paths against the output root; an existing output is replaced only where the sink says `"overwrite": true`."""

    output_root: str | Path
    media_roots: tuple[str | Path, ...] = ()
    engines: frozenset[str] = SAFE_ENGINES  # built-in and entry-point type names
    modules: tuple[str, ...] = ()  # packages/modules allowed in `package.module:Class` types and module params
    schemes: tuple[str, ...] = ("file", "rtsp", "rtsps")
    bind_hosts: tuple[str, ...] = LOOPBACK
    brokers: tuple[str, ...] = ()  # HOST:PORT of servers sinks may send to, besides any on loopback
    roots: tuple[Path, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_root", Path(self.output_root).resolve())
        object.__setattr__(self, "roots", tuple(Path(r).resolve() for r in self.media_roots))
        object.__setattr__(self, "engines", frozenset(self.engines))

    def base(self, kind: str) -> str:
        """The folder a relative path of `kind` ("read", "write" or "state") is resolved against."""
        return str(self.roots[0] if kind == "read" and self.roots else self.output_root)

    def allows_module(self, module: str) -> bool:
        """Whether `module` is one of `modules` or inside one of those packages."""
        return any(module == m or module.startswith(m + ".") for m in self.modules)

    def check_type(self, type_name: str) -> None:
        """Raise ValueError (one line) unless the engine `type` may be imported: checked before anything is."""
        module, colon, _ = type_name.partition(":")
        if type_name in self.engines or (colon and self.allows_module(module)):
            return
        allowed = ", ".join(sorted(self.engines)) + (f"; modules {', '.join(self.modules)}" if self.modules else "")
        raise ValueError(f"engine type {type_name!r} is not allowed in restricted mode (allowed: {allowed})")

    def admit(self, cls: type[Engine], params: dict[str, Any]) -> dict[str, Any]:
        """Params for an engine of `cls` arriving on their own (a stream `{"sources": [entry]}`, a rule set): a copy
        with relative paths resolved against the roots, checked; ParamError names the first refused field."""
        params = copy.deepcopy(params)
        resolve_paths(cls, params, self.base)
        self.check_params(cls, params)
        return params

    def check_params(self, cls: type[Engine], params: dict[str, Any]) -> None:
        """Raise ParamError naming the first field whose file, URI, address or module the policy refuses."""
        for spec in declared(cls):
            for found in find(params, spec):
                getattr(self, f"_{spec.kind}")(found)

    def _read(self, found: Found) -> None:
        value = found.value
        scheme = value.split("://", 1)[0].lower() if URL.match(value) else "file"
        if scheme not in self.schemes:
            raise ParamError(found.where, f"{scheme}:// is not allowed in restricted mode "
                                          f"(allowed: {', '.join(self.schemes)})")
        if scheme == "file" and (URL.match(value) or is_path(value, found.spec)):
            self._inside(found, value.split("://", 1)[-1], self.roots, "a media root")

    def _write(self, found: Found) -> None:
        value = found.value
        if value == "-":
            return
        if URL.match(value):
            raise ParamError(found.where, f"must be a file path in restricted mode (got {value!r})")
        path = self._inside(found, value, (self.output_root,), "the output root")
        holder = found.holder
        if isinstance(holder, dict) and holder.get("overwrite") is True:
            return
        taken = _existing(path)
        if taken:
            raise ParamError(found.where, f"{taken} exists; restricted mode replaces a file only where the sink "
                                          "says \"overwrite\": true")

    def _state(self, found: Found) -> None:
        if URL.match(found.value):
            raise ParamError(found.where, f"must be a folder path in restricted mode (got {found.value!r})")
        self._inside(found, found.value, (self.output_root,), "the output root")

    def _bind(self, found: Found) -> None:
        value = found.value
        scheme, _, rest = value.partition("://")
        if scheme == "inproc":
            return
        if scheme == "ipc":
            self._inside(found, rest, (self.output_root,), "the output root")
            return
        host = rest.rpartition(":")[0].strip("[]")
        if scheme != "tcp" or host not in self.bind_hosts:
            raise ParamError(found.where, f"{value!r} would listen beyond this machine; restricted mode binds only "
                                          f"{', '.join(self.bind_hosts)}")

    def _connect(self, found: Found) -> None:
        value = found.value
        try:
            url = urlsplit(value)
            host, port = (url.hostname or "").lower(), url.port
        except ValueError:
            raise ParamError(found.where, f"not a usable URL (got {value!r})") from None
        if url.scheme == "unix":
            self._inside(found, url.path, (self.output_root,), "the output root")
            return
        address = (f"[{host}]" if ":" in host else host) + ("" if port is None else f":{port}")
        if host not in LOOPBACK and address not in self.brokers:
            raise ParamError(found.where, f"{address or value!r} is not an allowed broker in restricted mode "
                                          f"(allowed: loopback{''.join(', ' + b for b in self.brokers)}; a "
                                          "broker beyond loopback is named HOST:PORT, in the URL too)")

    def _module(self, found: Found) -> None:
        module = found.value.partition(":")[0]
        if not self.allows_module(module):
            raise ParamError(found.where, f"module {module!r} is not allowed in restricted mode "
                                          f"(allowed: {', '.join(self.modules) or 'none'})")

    @staticmethod
    def _inside(found: Found, value: str, roots: tuple[Path, ...], what: str) -> Path:
        """The real path of `value` (links followed), or ParamError when it leaves every root."""
        try:
            path = Path(os.path.realpath(value))
        except (OSError, ValueError):
            raise ParamError(found.where, f"not a usable path (got {value!r})") from None
        if not any(path.is_relative_to(root) for root in roots):
            where = ", ".join(map(str, roots)) or "none configured"
            raise ParamError(found.where, f"{path} is outside {what} ({where})")
        return path


def _existing(path: Path) -> str:
    """An existing file that writing to `path` would replace ({stream} stands for any stream), or ""."""
    try:
        if "{stream}" in path.name:
            hits = sorted(path.parent.glob(path.name.replace("{stream}", "*")))
        else:
            hits = [path] if path.exists() else []
            hits += sorted(path.parent.glob(f"{path.stem}.*{path.suffix}")) if path.suffix else []
        hits = [h for h in hits if h.is_file() or (h.is_dir() and any(h.iterdir()))]
    except (OSError, ValueError):
        return ""
    return str(hits[0]) if hits else ""
