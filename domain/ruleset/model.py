"""The rule-set model: frozen rules, their conditions and forms, and what evaluating them yields.

Condition semantics, which rules compiles for durable-rules (services/rules/conditions.py) and honours:

- A comparison on an attribute the event does not carry is false, and ``not`` is plain
  boolean negation, so ``not`` of such a comparison is true.
- ``matches`` is a whole-string match in durable-rules' regular-expression dialect
  (domain/ruleset/regex.py), which cannot be negated: ``matches`` may not sit under an odd
  number of ``not``.
- Comparisons are durable-rules' own: a numeric string compares equal to the number
  it spells. The catalogue's typed attributes keep that from mattering.

docs/rules.md is the language reference and states the event-time semantics of windows,
sequences, caps and effective periods.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from kit.vocabulary import Severity, SubjectKind

if TYPE_CHECKING:
    # For annotations only: points.py reads AttributeScalar and EvaluationProblem from here.
    from domain.ruleset.points import PointsExpression, Template

AttributeScalar: TypeAlias = str | int | float | bool | datetime
Operator: TypeAlias = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "between", "matches"]

OPERATORS: Final[tuple[Operator, ...]] = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "between", "matches")

# What a window or sequence firing offers its reason, description and points besides
# the attributes of its latest event (and which shadow attributes of the same name).
WINDOW_VARIABLES: Final = frozenset({"count", "first_at", "last_at"})


class RuleSetError(ValueError):
    """A rule-set file is invalid. ``errors`` lists every problem, each with its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__(
            f"invalid rule set ({len(self.errors)} problem{'s' if len(self.errors) != 1 else ''}):\n  "
            + "\n  ".join(self.errors)
        )


class EvaluationProblem(Exception):
    """A rule could not be applied to one event's attributes (missing, mistyped, division by zero)."""


@dataclass(frozen=True)
class EngineEvent:
    """One recorded event as the engine sees it."""

    key: str  # f"{source}/{event_id}", unique
    subject_key: str
    subject_kind: str  # "person" | "organization"
    event_type: str
    occurred_at: datetime  # timezone-aware UTC
    attributes: Mapping[str, AttributeScalar]


@dataclass(frozen=True)
class Firing:
    """One rule fired for one subject: what score turns into one ledger entry."""

    rule_id: str
    rule_set: str
    rule_set_version: int
    title: str
    description: str
    legal_basis: str
    event_keys: tuple[str, ...]
    subject_key: str
    subject_kind: str
    points: int
    category: str
    severity: str
    reason: str
    black_list: bool
    occurred_at: datetime
    outcome_id: str
    # The earliest event's occurred_at (occurred_at is the latest's).
    first_at: datetime


def outcome_id(
    rule_set: str, rule_set_version: int, rule_id: str, event_keys: Iterable[str], variant: str = ""
) -> str:
    """The deterministic id of a firing, so a re-evaluation yields the same outcome.
    ``variant`` tells apart firings of the same events that differ otherwise (a share cut
    by a cap)."""
    text = f"{rule_set}|{rule_set_version}|{rule_id}|" + "|".join(sorted(event_keys))
    if variant:
        text += f"|{variant}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reissued_id(original: str, generation: int) -> str:
    """The id of an outcome formed again from the same events after its reversal (the
    generation-th time): deterministic, and never the reversed id itself."""
    text = f"{original}|again|{generation}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Comparison:
    attr: str
    op: Operator
    # A scalar, or a tuple for "in" (the candidates) and "between" (low, high).
    value: AttributeScalar | tuple[AttributeScalar, ...]


@dataclass(frozen=True)
class AllOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    condition: Condition


Condition: TypeAlias = Comparison | AllOf | AnyOf | Not


def condition_attributes(condition: Condition | None) -> frozenset[str]:
    """Every attribute name a condition reads."""
    if condition is None:
        return frozenset()
    if isinstance(condition, Comparison):
        return frozenset({condition.attr})
    if isinstance(condition, Not):
        return condition_attributes(condition.condition)
    return frozenset().union(*(condition_attributes(c) for c in condition.conditions))


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    description: Template
    event_types: tuple[str, ...]
    subject_kinds: tuple[SubjectKind, ...]  # empty: any kind
    when: Condition | None
    points: int | PointsExpression
    category: str
    severity: Severity
    legal_basis: str
    black_list: bool
    reason: Template
    # The later rule forms; a rule has at most one of window and sequence. For a
    # sequence rule, event_types is the union of its steps' and when is None.
    window: Window | None = None
    sequence: SequenceSpec | None = None
    cap: Cap | None = None
    effective_from: datetime | None = None  # inclusive, on occurred_at
    effective_to: datetime | None = None  # exclusive, on occurred_at

    def points_for(self, attributes: Mapping[str, AttributeScalar]) -> int:
        if isinstance(self.points, int):
            return self.points
        return self.points.evaluate(attributes)

    @property
    def reach(self) -> timedelta:
        """How far in event time from one of its events this rule looks at others."""
        spans = [timedelta(0)]
        if self.window is not None:
            spans.append(self.window.within)
        if self.sequence is not None:
            spans.append(self.sequence.within)
        if self.cap is not None:
            spans.append(self.cap.per)
        return max(spans)


@dataclass(frozen=True)
class Window:
    """``count`` matching events of one subject (and one ``group_by`` value) within ``within``."""

    count: int
    within: timedelta  # last occurred_at - first occurred_at <= within
    group_by: str | None


@dataclass(frozen=True)
class Step:
    event_types: tuple[str, ...]
    when: Condition | None


@dataclass(frozen=True)
class SequenceSpec:
    """Step 0, then step 1 strictly later and at most ``within`` after it, same ``correlate_by`` value."""

    steps: tuple[Step, Step]
    within: timedelta
    correlate_by: str | None


@dataclass(frozen=True)
class Cap:
    """At most ``points`` (in absolute value) from one rule to one subject per period of ``per``."""

    points: int
    per: timedelta


@dataclass(frozen=True)
class RuleSet:
    name: str
    version: int
    rules: tuple[Rule, ...]
    source_sha256: str

    @property
    def lookback(self) -> timedelta:
        """The longest window, sequence or cap period: how much history around new events evaluation needs.

        timedelta(0) when every rule looks at one event alone.
        """
        return max((rule.reach for rule in self.rules), default=timedelta(0))

    @property
    def history_event_types(self) -> frozenset[str]:
        """The event types whose history matters (those of window, sequence and capped rules).

        Only these are read from ``history`` by the engine, so a store may load just them.
        """
        return frozenset(
            event_type for rule in self.rules if rule.reach > timedelta(0) for event_type in rule.event_types
        )


def is_attribute_name(value: object) -> bool:
    """A name an attribute may have (and a template or expression may quote): an ASCII identifier."""
    return isinstance(value, str) and value.isascii() and value.isidentifier()
