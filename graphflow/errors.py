"""Errors shown to users as one line: `file: field.path: message`."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class GraphflowError(Exception):
    """Base class of every error graphflow reports to a user without a traceback."""


class ParamError(GraphflowError):
    """A parameter (or part of one) is wrong; `field` is a dotted/indexed path such as `sources[0].uri`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class GraphError(GraphflowError):
    """A graph file is wrong; rendered as `file: path: message`."""

    def __init__(self, file: str, path: str, message: str) -> None:
        super().__init__(f"{file}: {path}: {message}" if path else f"{file}: {message}")
        self.file = file
        self.path = path
        self.message = message
        self.errors: list[GraphError] = [self]  # every mistake found in the same pass, this one first

    @staticmethod
    def of(errors: list[GraphError]) -> GraphError:
        """The first of `errors`, carrying them all (`errors`): a loader reports every independent mistake at once,
        while `str()` stays the first one's line."""
        errors[0].errors = list(errors)
        return errors[0]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice a mistyped `word` most likely meant: the closest by difflib's ratio (≥ 0.6), else one that is a
    prefix of it or it of them (`confidence` → `conf`); None when nothing is near."""
    choices = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    low = word.lower()
    return next((c for c in choices if len(c) >= 3 and len(low) >= 3 and (low.startswith(c.lower())
                                                                        or c.lower().startswith(low))), None)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`"did you mean 'x'? "` for the `closest` choice, else "": the start of a hint in an error message."""
    near = closest(word, choices)
    return f"did you mean {near!r}? " if near else ""


class Unavailable(GraphflowError):
    """The service cannot take the request now (it is not ready: starting, an engine restarting or gone); HTTP 503."""
