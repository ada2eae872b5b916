"""Errors shown to users as one line: `file: field.path: message`."""
from __future__ import annotations


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


class Unavailable(GraphflowError):
    """The service cannot take the request now (it is not ready: starting, an engine restarting or gone); HTTP 503."""
