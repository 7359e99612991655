"""A rule's ``when`` condition, read from its YAML form: comparisons and all/any/not groups.

Every operand is checked against what durable-rules compares correctly: 64-bit integers,
finite numbers, timezone-aware timestamps, and patterns in its dialect (regex.py).
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any, Final, cast

from domain.documents import Problems, child, item
from domain.ruleset.model import (
    OPERATORS,
    AllOf,
    AnyOf,
    AttributeScalar,
    Comparison,
    Condition,
    Not,
    Operator,
    is_attribute_name,
)
from domain.ruleset.regex import regex_problem

_LEAF_FIELDS: Final = frozenset({"attr", "op", "value"})
_GROUP_FIELDS: Final = frozenset({"all", "any", "not"})
_ORDERING_OPERATORS: Final = frozenset({"gt", "gte", "lt", "lte"})


def parse_condition(node: object, path: str, problems: Problems, *, negated: bool) -> Condition | None:
    """A rule's or step's ``when``; ``negated`` says whether it sits under an odd number of ``not``."""
    if not isinstance(node, dict) or not node:
        problems.add(path, "must be a comparison {attr, op, value} or a group {all | any | not}")
        return None
    groups = _GROUP_FIELDS & node.keys()
    if groups:
        if len(node) != 1:
            problems.add(path, f"a group has exactly one key (all, any or not), got {sorted(node)}")
            return None
        (key, value) = next(iter(node.items()))
        if key == "not":
            negation = parse_condition(value, child(path, "not"), problems, negated=not negated)
            return None if negation is None else Not(negation)
        if not isinstance(value, list) or not value:
            problems.add(child(path, key), "must be a non-empty list of conditions")
            return None
        children = [
            parse_condition(part, item(child(path, key), position), problems, negated=negated)
            for position, part in enumerate(value)
        ]
        parsed = tuple(c for c in children if c is not None)
        if len(parsed) != len(children):
            return None
        return AllOf(parsed) if key == "all" else AnyOf(parsed)
    return _parse_comparison(node, path, problems, negated=negated)


def _parse_comparison(
    node: dict[Any, Any], path: str, problems: Problems, *, negated: bool
) -> Comparison | None:
    before = len(problems)
    problems.unknown_fields(node, _LEAF_FIELDS, path)
    problems.required(node, ("attr", "op", "value"), path)
    attr, op, value = node.get("attr"), node.get("op"), node.get("value")
    if "attr" in node and not is_attribute_name(attr):
        problems.add(
            child(path, "attr"), f"must be an attribute name (letters, digits, underscore), got {attr!r}"
        )
    if "op" in node and op not in OPERATORS:
        problems.add(child(path, "op"), f"unknown operator {op!r}")
    if len(problems) > before:
        return None

    operand: AttributeScalar | tuple[AttributeScalar, ...] | None
    if op in ("eq", "ne"):
        operand = _scalar(value, child(path, "value"), problems)
    elif op in _ORDERING_OPERATORS:
        operand = _orderable(value, child(path, "value"), problems)
    elif op == "in":
        operand = _candidates(value, child(path, "value"), problems)
    elif op == "between":
        operand = _bounds(value, child(path, "value"), problems)
    else:
        operand = _pattern(value, child(path, "value"), problems)
        if negated:
            problems.add(
                child(path, "op"),
                "'matches' cannot be negated (durable-rules has no negated match); "
                "write the complement as a positive pattern",
            )
    if operand is None or len(problems) > before:
        return None
    return Comparison(attr=cast(str, attr), op=cast(Operator, op), value=operand)


def _scalar(value: object, path: str, problems: Problems) -> AttributeScalar | None:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        problems.add(path, "must fit in 64 bits")
        return None
    if isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        problems.add(path, "must be a finite number")
        return None
    if isinstance(value, datetime):
        return aware_timestamp(value, path, problems)
    if isinstance(value, date):
        problems.add(path, "a date needs a time and a timezone, e.g. 2024-01-01T00:00:00Z")
        return None
    problems.add(path, f"must be a string, number, boolean or timestamp, got {value!r}")
    return None


def aware_timestamp(value: datetime, path: str, problems: Problems) -> datetime | None:
    """``value`` if it has a timezone: event times are instants, compared across zones."""
    if value.tzinfo is None or value.utcoffset() is None:
        problems.add(path, "a timestamp needs a timezone, e.g. 2024-01-01T00:00:00Z")
        return None
    return value


def _orderable(value: object, path: str, problems: Problems) -> int | float | datetime | None:
    if isinstance(value, int | float | datetime | date) and not isinstance(value, bool):
        scalar = _scalar(value, path, problems)
        assert not isinstance(scalar, str | bool)
        return scalar
    problems.add(path, f"must be a number or a timestamp, got {value!r}")
    return None


def _candidates(value: object, path: str, problems: Problems) -> tuple[AttributeScalar, ...] | None:
    if not isinstance(value, list) or not value:
        problems.add(path, "must be a non-empty list of values")
        return None
    scalars = [_scalar(entry, item(path, position), problems) for position, entry in enumerate(value)]
    parsed = tuple(scalar for scalar in scalars if scalar is not None)
    return parsed if len(parsed) == len(scalars) else None


def _bounds(value: object, path: str, problems: Problems) -> tuple[AttributeScalar, ...] | None:
    if not isinstance(value, list) or len(value) != 2:
        problems.add(path, "must be a list [low, high]")
        return None
    low = _orderable(value[0], item(path, 0), problems)
    high = _orderable(value[1], item(path, 1), problems)
    if low is None or high is None:
        return None
    if isinstance(low, datetime) != isinstance(high, datetime):
        problems.add(path, "low and high must both be numbers or both be timestamps")
        return None
    if low > high:  # type: ignore[operator]  # same kind, checked above
        problems.add(path, f"low {low!r} is greater than high {high!r}")
        return None
    return (low, high)


def _pattern(value: object, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or not value:
        problems.add(path, "must be a non-empty regular expression string")
        return None
    problem = regex_problem(value)
    if problem is not None:
        problems.add(path, str(problem))
        return None
    return value
