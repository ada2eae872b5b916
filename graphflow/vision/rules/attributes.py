"""A rule's `attributes` filter: what a track's second-stage results (secondary's attributes) must be for the rule
to count it. Regular expressions run on RE2, in time linear in the text: a pattern cannot stall the engines."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import re2

from graphflow.engine import Param
from graphflow.errors import ParamError
from graphflow.vision.rules.keys import Converted

MAX_PATTERN = 256  # characters of a `regex`: RE2 bounds the time, this bounds the compiled size too

# The tests of a rule's `attributes: {name: {...}}`; a plain value there means equal to it, a list any of them.
# Their errors are re-raised under the test's full field path (rules[0].attributes.score.min).
ATTRIBUTE_TEST: dict[str, Param] = {
    "regex": Param(str, None, doc=f"the attribute, as text, contains a match of this regular expression (RE2 "
                                  f"syntax: no backreferences or lookaround; at most {MAX_PATTERN} characters)"),
    "min": Param(float, None, doc="the attribute is a number ≥ min"),
    "max": Param(float, None, doc="the attribute is a number ≤ max"),
}
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is the user's error, said once in the ParamError


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


@dataclass(frozen=True)
class AttributeTest:
    """What one attribute of a track must be for a rule to count the track: one of `values`, or (from an object)
    matching `regex` and within `min`..`max`. A track without the attribute does not match."""

    name: str
    values: tuple = ()
    regex: Any = None  # a compiled RE2 pattern
    min: float | None = None
    max: float | None = None

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """Whether a track's attributes pass this test."""
        if self.name not in attributes:
            return False
        value = attributes[self.name]
        if self.values:  # bool only equals bool: True must not match an attribute of 1
            return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)
        if self.regex is not None and (not _scalar(value) or self.regex.search(str(value)) is None):
            return False
        if self.min is not None or self.max is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        return True


def compile_pattern(pattern: str, where: str) -> Any:
    """`pattern` compiled by RE2, or ParamError at `where` in one line: too long, or not a pattern RE2 runs."""
    if len(pattern) > MAX_PATTERN:
        raise ParamError(where, f"at most {MAX_PATTERN} characters (got {len(pattern)})")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ParamError(where, f"not a valid regular expression (RE2 syntax): {' '.join(why.split())}") from None


class AttributeFilter(Converted):
    """The `attributes` key: attribute name → value, list of values, or an object of tests, converted to
    AttributeTests."""

    def __init__(self) -> None:
        super().__init__(dict, None, form=f"an object of attribute name → value, list of values, or "
                                          f"{{{', '.join(ATTRIBUTE_TEST)}}}",
                         doc="count only tracks whose second-stage results (secondary's attributes) match")

    def convert(self, spec: Any, where: str, rule: str) -> tuple[AttributeTest, ...]:
        if not isinstance(spec, dict) or not spec:
            raise ParamError(where, self.wrong(spec))
        tests = []
        for name, want in spec.items():
            here = f"{where}.{name}"
            if _scalar(want):
                tests.append(AttributeTest(name, values=(want,)))
            elif isinstance(want, list):
                if not want or not all(_scalar(v) for v in want):
                    raise ParamError(here, f"a list must hold one or more strings or numbers (got {want!r})")
                tests.append(AttributeTest(name, values=tuple(want)))
            elif isinstance(want, dict):
                tests.append(_attribute_object(name, want, here))
            else:
                raise ParamError(here, f"must be a value, a list of values or an object (got {want!r})")
        return tuple(tests)


def _attribute_object(name: str, want: dict, where: str) -> AttributeTest:
    """An `{"regex", "min", "max"}` test, each key checked by its Param."""
    unknown = sorted(set(want) - set(ATTRIBUTE_TEST))
    if unknown or not want:
        raise ParamError(f"{where}.{unknown[0]}" if unknown else where,
                         f"{'unknown test' if unknown else 'needs a test'} (known: {', '.join(ATTRIBUTE_TEST)})")
    checked = {}
    for key, value in want.items():
        try:
            checked[key] = ATTRIBUTE_TEST[key].coerce(value)
        except ParamError as exc:
            raise ParamError(f"{where}.{key}", exc.message) from None
    if "min" in checked and "max" in checked and checked["min"] > checked["max"]:
        raise ParamError(where, f"min {checked['min']:g} is above max {checked['max']:g}: nothing could match")
    regex = compile_pattern(checked["regex"], f"{where}.regex") if "regex" in checked else None
    return AttributeTest(name, regex=regex, min=checked.get("min"), max=checked.get("max"))
