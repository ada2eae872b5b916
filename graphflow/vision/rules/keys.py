"""The kinds of Param a rule key can be: a rule's id, and keys whose value is converted once its type is checked
(points to arrays, filters to tests)."""
from __future__ import annotations

from typing import Any

from graphflow.engine import Param
from graphflow.errors import ParamError
from graphflow.graph.fields import Shaped


class RuleId(Param):
    """A rule's id: a string, or an integer taken as its text (3 names the rule "3")."""

    def coerce(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return super().coerce(value)


class Converted(Shaped):
    """A list or object key whose items have a form of their own: `check_keys` checks its type, then the rule
    converts its value with `convert`, which raises ParamError at `where` (the key's path, `rules[0].polygon`) for
    a value not of that form; `rule` (the rule's id) names the rule in messages about its geometry."""

    def convert(self, value: Any, where: str, rule: str) -> Any:
        raise NotImplementedError


class Classes(Converted):
    """The `classes` filter: class ids or labels, as a set."""

    def __init__(self) -> None:
        super().__init__(list, None, form="a list of class ids or labels",
                         doc="count only tracks of these classes (default: every class)")

    def convert(self, value: list, where: str, rule: str) -> set[int | str]:
        if not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in value):
            raise ParamError(where, self.wrong(value))
        return set(value)
