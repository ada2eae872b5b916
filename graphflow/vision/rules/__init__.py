"""Event rules on tracks — zone intrusion, line crossing, dwell, crowding and speed — evaluated per stream.

Each rule kind is one RuleKind subclass in a module of this package, registered by being defined; every module
here is imported below, so a new kind is one new file.
"""
from __future__ import annotations

import importlib
import pkgutil

from graphflow.vision.rules.attributes import ATTRIBUTE_TEST, MAX_PATTERN
from graphflow.vision.rules.base import COMMON, RULE_CLASSES, Frame, RuleKind
from graphflow.vision.rules.geometry import MAX_POINTS, points_in_polygon, polygon_problem
from graphflow.vision.rules.ruleset import RuleSet, check_rules, parse_rules

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTRIBUTE_TEST", "COMMON", "MAX_PATTERN", "MAX_POINTS", "RULE_CLASSES", "Frame", "RuleKind", "RuleSet",
           "check_rules", "parse_rules", "points_in_polygon", "polygon_problem"]
