"""The sink kinds' base class and registry, and what sinks share: the records they write, safe file names for
stream ids, and one-line reasons. A sink kind is one subclass of `Output` with a `kind` name and its keys as
`Param` attributes; defining it registers it."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from graphflow import Engine, Message, Param, ParamError
from graphflow.detections import plain
from graphflow.graph.fields import check_keys

WHAT = ("events", "frames")
NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
NAME_LIMIT = 64  # characters of a stream id kept in a file name, before the hash
SHOWN_LIMIT = 80  # characters of a stream id shown in a log line

SINKS: dict[str, type[Output]] = {}  # kind → class, filled by defining the classes


def dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def reason(exc: BaseException) -> str:
    """An exception as one line for a user."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def at(field: str, key: str) -> str:
    """The param path of `key` under `field` (`sinks[0]` + `path`; `path` alone for an engine's own key)."""
    return f"{field}.{key}" if field else key


def safe_name(name: Any) -> str:
    """`name` as one file name part (or MQTT topic level): kept as it is when it is short and made of letters,
    digits, `.`, `_` and `-` only; otherwise the other characters become `_`, it is cut to 64 characters and
    `~` and a hash of the real name follow, so two names never share a part and none is too long."""
    text = str(name)
    if len(text) <= NAME_LIMIT and text not in ("", ".", "..") and not NAME_CHARS.search(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{NAME_CHARS.sub('_', text[:NAME_LIMIT])}~{digest}"


def shown(stream: str) -> str:
    """A stream id for a log line: cut when it is very long (ids come from the network)."""
    return repr(stream if len(stream) <= SHOWN_LIMIT else f"{stream[:SHOWN_LIMIT]}… ({len(stream)} characters)")


def stream_path(path: str, stream: str) -> str:
    """The file of `stream` for a per-stream sink: `{stream}` in `path` is replaced by the stream's safe name; a
    path without it gets the name before its extension (`out.mp4` → `out.<stream>.mp4`), the same for every stream
    whatever the order they come in."""
    if "{stream}" in path:
        return path.replace("{stream}", safe_name(stream))
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{safe_name(stream)}{p.suffix}"))


def message_record(msg: Message, arrays: bool = False, times: bool = True) -> dict[str, Any]:
    """A message as a JSON-ready dict: stream, seq, pts, data, times (and array shapes if asked)."""
    record: dict[str, Any] = {"stream": msg.stream, "seq": msg.seq, "pts": msg.pts, **plain(msg.data)}
    if arrays:
        record["arrays"] = {k: [list(a.shape), a.dtype.str] for k, a in msg.arrays.items()}
    if times:
        record["times"] = msg.times
    return record


def records(msg: Message, what: str) -> list[dict[str, Any]]:
    """What a sink writes for `msg`: each event (with its stream and frame), or the message's record."""
    if what == "frames":
        return [message_record(msg)]
    return [{"stream": msg.stream, "frame": msg.seq, **event} for event in msg.data.get("events", ())]


def record_count(msg: Message, what: str) -> int:
    """How many records `records(msg, what)` gives, without making them."""
    return 1 if what == "frames" else len(msg.data.get("events", ()))


def check_folder(field: str, path: str | Path) -> None:
    """ParamError unless the folder `path` exists or can be created (its nearest existing parent is a writable
    folder): sinks create their folders when they start, `validate` only checks."""
    target = folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ParamError(field, f"{str(folder)!r} is a file, not a folder" if folder == target else
                         f"cannot create {str(target)!r}: {str(folder)!r} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ParamError(field, f"cannot create files under {str(folder)!r}: not writable")


class Output:
    """One sink of `publish`: a sink kind. Subclasses name their `kind` and declare their keys as `Param`s; what
    every sink counts is items written, items lost, and the error that stopped it (one line, logged once)."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):  # a kind of its own; bases without one (BrokerSink) are not kinds
            if cls.kind in SINKS:
                raise ValueError(f"sink kind {cls.kind!r} is defined twice "
                                 f"({SINKS[cls.kind].__name__}, {cls.__name__})")
            SINKS[cls.kind] = cls

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        self.__dict__.update(spec)  # the checked keys, read as attributes through the class's Params
        self.owner, self.index = owner, index
        self.where = f"sinks[{index}]" if where is None else where  # the param path of this sink's keys
        self.written = self.lost = 0
        self.error: str | None = None

    @classmethod
    def declared_keys(cls) -> dict[str, Param]:
        """Every key of this kind by name: the class's own Params first, then those of its bases (a subclass's
        declaration of a key wins)."""
        found: dict[str, Param] = {}
        for klass in cls.__mro__:
            for k, v in vars(klass).items():
                if isinstance(v, Param):
                    found.setdefault(k, v)
        return found

    @classmethod
    def check_spec(cls, field: str, spec: dict[str, Any]) -> dict[str, Any]:
        """`spec` checked against the declared keys and completed with defaults; ParamError names the faulty key."""
        keys = {k: v for k, v in spec.items() if k != "kind"}
        full = {"kind": cls.kind, **check_keys(field, keys, cls.declared_keys(), f"key for a {cls.kind} sink")}
        cls.check(field, full)
        return full

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        """Checks beyond one key's type and range (folders can be made, URL forms); raise ParamError."""

    @property
    def target(self) -> str:
        """Where this sink writes, for messages."""
        return str(getattr(self, "path", ""))

    @property
    def name(self) -> str:
        """This sink in messages: `publish 'out': sink 1 (video out/v.mp4)`."""
        return f"{type(self.owner).__name__.lower()} {self.owner.id!r}: sink {self.index} ({self.kind} {self.target})"

    def field(self, key: str) -> str:
        """The param path of one of this sink's keys, for errors."""
        return at(self.where, key)

    def start(self) -> None:
        """Start background work, once every sink is open."""

    def units(self, msg: Message) -> int:
        """How many items this sink writes for `msg` (what is counted as lost if it cannot)."""
        return 1

    def write(self, msg: Message) -> None:
        """Write one message; an exception stops this sink."""
        raise NotImplementedError

    def flush(self) -> None:
        """End of stream: hand out what is held back."""

    def end(self, stream: str) -> None:
        """`stream` ended: finish and forget what this sink keeps for it (its file, its overlay)."""

    def close(self) -> None:
        """Finish files and release handles."""

    def held(self) -> set[str]:
        """The streams this sink keeps something for (a file, an overlay)."""
        return set()

    def accept(self, msg: Message) -> None:
        """Write `msg`; after a failure, this sink only counts messages as lost (the other sinks go on)."""
        if self.error is None:
            try:
                self.write(msg)
                return
            except Exception as exc:
                self.fail(exc)
        self.lost += self.units(msg)

    def fail(self, exc: BaseException) -> None:
        """Stop this sink: one error line naming the engine, the sink and the reason."""
        self.error = reason(exc)
        self.owner.log.error("%s failed: %s; it writes nothing more and counts its messages as lost", self.name,
                             self.error)

    def ended(self, stream: str) -> None:
        """`end`, with a failure stopping only this sink."""
        if self.error is None:
            try:
                self.end(stream)
            except Exception as exc:
                self.fail(exc)

    def settle(self) -> None:
        """`flush`, with a failure stopping only this sink."""
        if self.error is None:
            try:
                self.flush()
            except Exception as exc:
                self.fail(exc)

    def finish(self) -> None:
        """`close`, with a failure reported once (a sink that failed before is closed quietly)."""
        try:
            self.close()
        except Exception as exc:
            if self.error is None:
                self.fail(exc)

    def metrics(self) -> dict[str, Any]:
        return {"kind": self.kind, "written": self.written, "lost": self.lost, "error": self.error}


def sink_kinds() -> dict[str, dict[str, Param]]:
    """Each sink kind with its declared keys (for `graphflow engines` and docs)."""
    return {kind: cls.declared_keys() for kind, cls in SINKS.items()}


def check_sink(field: str, spec: Any) -> dict[str, Any]:
    """One `sinks[i]` entry validated and completed with defaults; ParamError names the faulty key."""
    if not isinstance(spec, dict):
        raise ParamError(field, f"must be an object with a 'kind' (got {spec!r})")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in SINKS:
        raise ParamError(f"{field}.kind", f"must be one of {', '.join(SINKS)} (got {kind!r})")
    return SINKS[kind].check_spec(field, spec)
