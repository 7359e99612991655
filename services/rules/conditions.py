"""Rule conditions compiled into durable-rules' JSON condition language, and the checks
that refuse what durable-rules would crash or hang on.

Pure: it writes the JSON the engine (services/rules/engine.py) hands to durable-rules.
Why each check exists is in docs/adr/0002-durable-rules-quirks-and-per-batch-sessions.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final, TypeAlias

from domain.ruleset.model import (
    AllOf,
    AnyOf,
    AttributeScalar,
    Comparison,
    Condition,
    EvaluationProblem,
    Not,
    Rule,
    RuleSet,
    RuleSetError,
    Step,
    condition_attributes,
)

JsonCondition: TypeAlias = dict[str, Any]

# Far below the ~250 properties that crash durable-rules; a fact also carries sid,
# id, event_type, subject_kind, occurred_at and attrs.
MAX_ATTRIBUTES_PER_EVENT_TYPE: Final = 64

# durable-rules hangs, holding the GIL, while building a network in which one node
# has more than 512 children. The number of condition branches bounds them all.
MAX_CONDITION_BRANCHES: Final = 512

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

# Negating a comparison flips its operator; an absent attribute is handled apart.
_DURABLE_OPERATORS: Final = {"ne": "$neq", "gt": "$gt", "gte": "$gte", "lt": "$lt", "lte": "$lte"}
_NEGATED: Final = {"eq": "ne", "ne": "eq", "gt": "lte", "gte": "lt", "lt": "gte", "lte": "gt"}


def engine_value(value: AttributeScalar, name: str) -> str | int | float | bool:
    """An attribute value as durable-rules compares it; EvaluationProblem if it cannot."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise EvaluationProblem(f"attribute {name!r} is a timestamp without a timezone")
        return value.timestamp()
    if isinstance(value, float) and not math.isfinite(value):
        raise EvaluationProblem(f"attribute {name!r} is not a finite number")
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        # durable-rules parses integers into 64 bits; a larger one would compare wrongly.
        raise EvaluationProblem(f"attribute {name!r} does not fit in 64 bits")
    if not isinstance(value, str | int | float):  # bool is an int
        raise EvaluationProblem(f"attribute {name!r} has an unsupported type {type(value).__name__}")
    return value


def projections(rule_set: RuleSet) -> dict[str, tuple[str, ...]]:
    """For each event type some rule listens to, the attributes its conditions read."""
    read: dict[str, set[str]] = {}
    for rule in rule_set.rules:
        keyed = {
            a
            for a in (rule.window and rule.window.group_by, rule.sequence and rule.sequence.correlate_by)
            if a
        }
        steps = rule.sequence.steps if rule.sequence is not None else (Step(rule.event_types, rule.when),)
        for step in steps:
            for event_type in step.event_types:
                read.setdefault(event_type, set()).update(condition_attributes(step.when), keyed)
    too_many = [
        f"event type {event_type!r}: conditions read {len(names)} attributes, "
        f"more than the {MAX_ATTRIBUTES_PER_EVENT_TYPE} durable-rules can safely be given"
        for event_type, names in read.items()
        if len(names) > MAX_ATTRIBUTES_PER_EVENT_TYPE
    ]
    if too_many:
        raise RuleSetError(too_many)
    return {event_type: tuple(sorted(names)) for event_type, names in read.items()}


def rule_set_patterns(rule_set: RuleSet, *, reserved_branches: int) -> list[list[JsonCondition]]:
    """Every rule's patterns (``rule_patterns``), refused if, with the caller's own
    ``reserved_branches``, they make more branches than durable-rules can build."""
    patterns = [rule_patterns(rule) for rule in rule_set.rules]
    branches = sum(_pattern_branches(p) for p in patterns) + reserved_branches
    if branches > MAX_CONDITION_BRANCHES:
        raise RuleSetError(
            [
                f"the rules' conditions make {branches} branches (each event type, 'in' value and "
                f"'any' alternative is one); durable-rules hangs beyond {MAX_CONDITION_BRANCHES}"
            ]
        )
    return patterns


def _pattern_branches(pattern: list[JsonCondition]) -> int:
    """A rule's branches: durable-rules expands each pattern's "or"s, and a join's combinations."""
    return math.prod(_branch_count(condition) for named in pattern for condition in named.values())


def _branch_count(condition: JsonCondition) -> int:
    """Into how many conjunctions durable-rules splits a condition (it expands "or")."""
    if "$and" in condition:
        return math.prod(_branch_count(c) for c in condition["$and"])
    if "$or" in condition:
        return sum(_branch_count(c) for c in condition["$or"])
    return 1


def rule_patterns(rule: Rule) -> list[JsonCondition]:
    """The named patterns of a rule (durable-rules' "all"): one fact, or a sequence's join of two.

    A sequence's second step joins the first on the correlation attribute and on event
    time (strictly later, at most the duration after it). The duration is given a
    second's slack because durable-rules adds floating-point seconds; select_pairs()
    applies it exactly on the datetimes.
    """
    if rule.sequence is None:
        return [{"m": rule_condition(rule)}]
    first, second = rule.sequence.steps
    join = [
        _step_condition(rule, second.event_types, second.when),
        {"$gt": {"occurred_at": {"first": "occurred_at"}}},
        {
            "$lte": {
                "occurred_at": {
                    "$add": {"$l": {"first": "occurred_at"}, "$r": _seconds(rule.sequence.within) + 1}
                }
            }
        },
    ]
    if rule.sequence.correlate_by is not None:
        path = f"attrs.{rule.sequence.correlate_by}"
        join.append({path: {"first": path}})
    return [
        {"first": _step_condition(rule, first.event_types, first.when)},
        {"second": {"$and": join}},
    ]


def rule_condition(rule: Rule) -> JsonCondition:
    """The durable-rules condition on a fact (the "m" of a rule) for a per-event or window Rule.

    It always begins with an equality on the event type: durable-rules hangs on a
    rule whose only test is that an attribute is absent.
    """
    return _step_condition(rule, rule.event_types, rule.when)


def _step_condition(rule: Rule, event_types: Sequence[str], when: Condition | None) -> JsonCondition:
    tests = [_one_of("event_type", event_types)]
    if rule.subject_kinds:
        tests.append(_one_of("subject_kind", rule.subject_kinds))
    # Effective dating is a condition on occurred_at, so an event outside the period
    # matches nothing, counts in no window and joins no sequence.
    if rule.effective_from is not None:
        tests.append({"$gte": {"occurred_at": engine_value(rule.effective_from, "effective_from")}})
    if rule.effective_to is not None:
        tests.append({"$lt": {"occurred_at": engine_value(rule.effective_to, "effective_to")}})
    if when is not None:
        tests.append(compile_condition(when))
    return {"$and": tests}


def _seconds(duration: timedelta) -> int:
    return int(duration.total_seconds())


def compile_condition(condition: Condition, *, negated: bool = False) -> JsonCondition:
    """A condition tree in durable-rules' JSON condition language.

    durable-rules has no "not", so negation is pushed down to the comparisons (De
    Morgan). A comparison on an absent attribute is false in durable-rules, so a
    negated one is widened with "or absent" to stay the boolean negation.
    """
    if isinstance(condition, Not):
        return compile_condition(condition.condition, negated=not negated)
    if isinstance(condition, AllOf | AnyOf):
        parts = [compile_condition(c, negated=negated) for c in condition.conditions]
        conjunction = isinstance(condition, AllOf) != negated
        return _and(parts) if conjunction else _or(parts)
    return _comparison(condition, negated=negated)


def _comparison(comparison: Comparison, *, negated: bool) -> JsonCondition:
    path = f"attrs.{comparison.attr}"
    value = comparison.value
    if comparison.op == "matches":
        if negated:
            raise RuleSetError([f"'matches' on {comparison.attr!r} cannot be negated in durable-rules"])
        return {"$mt": {path: value}}
    if comparison.op == "in":
        assert isinstance(value, tuple)
        candidates = [engine_value(v, comparison.attr) for v in value]
        if negated:
            return _or_absent(path, _and([{"$neq": {path: v}} for v in candidates]))
        return _or([{path: v} for v in candidates])
    if comparison.op == "between":
        assert isinstance(value, tuple)
        low, high = (engine_value(v, comparison.attr) for v in value)
        if negated:
            return _or_absent(path, _or([{"$lt": {path: low}}, {"$gt": {path: high}}]))
        return _and([{"$gte": {path: low}}, {"$lte": {path: high}}])
    assert not isinstance(value, tuple)
    operand = engine_value(value, comparison.attr)
    op = _NEGATED[comparison.op] if negated else comparison.op
    test = {path: operand} if op == "eq" else {_DURABLE_OPERATORS[op]: {path: operand}}
    return _or_absent(path, test) if negated else test


def _one_of(field: str, values: Sequence[str]) -> JsonCondition:
    return _or([{field: v} for v in values])


def _or_absent(path: str, test: JsonCondition) -> JsonCondition:
    return {"$or": [test, {"$nex": {path: 1}}]}


def _and(parts: list[JsonCondition]) -> JsonCondition:
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _or(parts: list[JsonCondition]) -> JsonCondition:
    return parts[0] if len(parts) == 1 else {"$or": parts}
