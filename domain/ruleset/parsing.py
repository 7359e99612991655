"""The declarative rule-set file, loaded and validated into frozen values.

A rule set is a YAML document (config/rulesets/sample.yaml is the worked example)::

    name: egret-sample
    version: 1
    rules:
      - id: library.late_return
        title: Book returned more than 30 days late
        description: A library book came back {days_late} days late.
        event_types: [library.book_returned_late]
        subject_kinds: [person]          # optional; absent means any kind
        when: {all: [{attr: days_late, op: gt, value: 30}]}   # optional; absent means always
        points: -3                       # or an expression such as "-10 * months"
        category: civic
        severity: minor
        legal_basis: "..."
        black_list: false                # optional
        reason: "Returned {days_late} days late"

Rules may also have a window, a sequence, a cap and an effective period; docs/rules.md
is the language reference and states their event-time semantics. Unknown fields are
errors rather than ignored, so that a file written for a later format is refused
instead of being evaluated differently.

Condition semantics, which the engine (services/rules/engine.py) honours:

- A comparison on an attribute the event does not carry is false, and ``not`` is plain
  boolean negation, so ``not`` of such a comparison is true.
- ``matches`` is a whole-string match in durable-rules' regular-expression dialect,
  which is a subset of Python's: printable ASCII literals, ``.``, classes such as
  ``[a-z0-9]`` or ``[^x]``, groups with ``|``, ``* + ?`` and ``{m,n}`` (n <= 100).
  There are no escapes and no anchors (the match is already anchored); ``.`` and
  classes match one ASCII character, never a non-ASCII one. durable-rules cannot
  negate a match, so ``matches`` may not sit under an odd number of ``not``.
- Comparisons are durable-rules' own: a numeric string compares equal to the number
  it spells. The catalogue's typed attributes keep that from mattering.

This module knows the format, not the engine: it does not import durable-rules.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import operator
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeGuard, cast

import yaml

from kit.safeyaml import YamlError, load_yaml
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS, Severity, SubjectKind

AttributeScalar: TypeAlias = str | int | float | bool | datetime
Operator: TypeAlias = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "between", "matches"]

OPERATORS: Final[tuple[Operator, ...]] = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "between", "matches")

# Storage keeps rule ids and rule-set names in 128-character columns.
_MAX_NAME_LENGTH: Final = 128
# Outcome.points is an int32 on the wire.
_MAX_POINTS: Final = 2**31 - 1
# Rule-set versions are int32 on the wire (RuleSetSummary.version, Outcome.rule_set_version).
_MAX_VERSION: Final = 2**31 - 1
_MAX_EXPRESSION_LENGTH: Final = 500
# durable-rules refuses (error 502-507) or misbehaves beyond this interval bound.
_MAX_REGEX_INTERVAL: Final = 100

_TOP_FIELDS: Final = frozenset({"name", "version", "rules"})
_RULE_FIELDS: Final = frozenset(
    {
        "id",
        "title",
        "description",
        "event_types",
        "subject_kinds",
        "when",
        "points",
        "category",
        "severity",
        "legal_basis",
        "black_list",
        "reason",
        "window",
        "sequence",
        "cap",
        "effective_from",
        "effective_to",
    }
)
# A sequence rule's steps name its event types instead.
_REQUIRED_RULE_FIELDS: Final = (
    "id",
    "title",
    "event_types",
    "points",
    "category",
    "severity",
    "legal_basis",
    "reason",
)
_LEAF_FIELDS: Final = frozenset({"attr", "op", "value"})
_WINDOW_FIELDS: Final = frozenset({"count", "within", "group_by"})
_SEQUENCE_FIELDS: Final = frozenset({"steps", "within", "correlate_by"})
_STEP_FIELDS: Final = frozenset({"event_types", "when"})
_CAP_FIELDS: Final = frozenset({"points", "per"})
# What a window or sequence firing offers its reason, description and points besides
# the attributes of its latest event (and which shadow attributes of the same name).
WINDOW_VARIABLES: Final = frozenset({"count", "first_at", "last_at"})
# A window of more events would be a count, not a pattern; the bound keeps a
# subject's evaluation linear.
_MAX_WINDOW_COUNT: Final = 1000
# Ten years: the lookback bounds the history loaded for every batch.
_MAX_DURATION: Final = timedelta(days=3660)
_DURATION: Final = re.compile(r"\s*([0-9]{1,9})\s*([smhdw])\s*")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_GROUP_FIELDS: Final = frozenset({"all", "any", "not"})
_ORDERING_OPERATORS: Final = frozenset({"gt", "gte", "lt", "lte"})
# Like the catalogue's names (library.book_returned_late). The engine relies on no
# event type starting with "$".
_EVENT_TYPE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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


_Evaluator: TypeAlias = Callable[[Mapping[str, AttributeScalar]], int | float]


@dataclass(frozen=True)
class PointsExpression:
    """Arithmetic over attributes (``+ - * / //``, unary minus, min/max/abs), compiled once."""

    source: str
    names: frozenset[str]
    _evaluate: _Evaluator = field(compare=False, repr=False)

    def evaluate(self, attributes: Mapping[str, AttributeScalar]) -> int:
        try:
            value = self._evaluate(attributes)
        except ZeroDivisionError:
            raise EvaluationProblem(f"points {self.source!r}: division by zero") from None
        except OverflowError:
            raise EvaluationProblem(f"points {self.source!r}: result out of range") from None
        return _as_points(value, self.source)


def _as_points(value: int | float, source: str) -> int:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EvaluationProblem(f"points {source!r}: result is not a finite number")
        # Half away from zero: 2.5 points is 3 and -2.5 is -3, as a reader would expect
        # (Python's round() would give 2 and -2).
        value = int(math.copysign(math.floor(abs(value) + 0.5), value))
    if abs(value) > _MAX_POINTS:
        raise EvaluationProblem(f"points {source!r}: {value} is out of range")
    return value


# A template compiled once: (literal text, attribute or None, format spec, conversion).
_TemplatePart: TypeAlias = tuple[str, str | None, str, str | None]
_CONVERSIONS: Final[dict[str, Callable[[object], str]]] = {"s": str, "r": repr, "a": ascii}


def _format_value(value: object, format_spec: str) -> str:
    if not format_spec:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, datetime):
            return value.isoformat()
    try:
        return format(value, format_spec)
    except (ValueError, TypeError) as error:
        raise EvaluationProblem(f"cannot format {value!r} with {format_spec!r}: {error}") from None


@dataclass(frozen=True)
class Template:
    """Text quoting attributes as ``{name}`` (format specs such as ``{amount:.2f}`` allowed)."""

    source: str
    names: frozenset[str]
    _parts: tuple[_TemplatePart, ...] = field(compare=False, repr=False)

    def render(self, attributes: Mapping[str, AttributeScalar]) -> str:
        # string.Formatter would re-parse the source on every call; this runs per firing.
        pieces: list[str] = []
        for literal, name, format_spec, conversion in self._parts:
            pieces.append(literal)
            if name is None:
                continue
            if name not in attributes:
                raise EvaluationProblem(f"attribute {name!r} is missing")
            value: object = attributes[name]
            if conversion is not None:
                value = _CONVERSIONS[conversion](value)
            pieces.append(_format_value(value, format_spec))
        return "".join(pieces)


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


def load_rule_set(path: Path | str) -> RuleSet:
    """Read and validate a rule-set file; raises RuleSetError listing every problem."""
    return rule_set_from_yaml(Path(path).read_bytes())


@functools.lru_cache(maxsize=32)
def stored_rule_set(source: str) -> RuleSet:
    """A stored version's rule set, parsed once per process: a stored version is immutable,
    and parsing the sample rule set costs about 40 ms of CPU (GetActiveRuleSet, asked on
    every Explain, parsed it on each call). RuleSet is frozen, so callers share it."""
    return rule_set_from_yaml(source)


def rule_set_from_yaml(source: str | bytes) -> RuleSet:
    """Validate rule-set YAML text; raises RuleSetError listing every problem."""
    raw = source.encode() if isinstance(source, str) else source
    try:
        document, loader = load_yaml(raw, loader=_StrictLoader)
    except YamlError as error:
        raise RuleSetError([f"invalid YAML: {error}"]) from None
    return parse_rule_set(document, source_sha256=hashlib.sha256(raw).hexdigest(), errors=loader.duplicates)


def parse_rule_set(document: object, *, source_sha256: str = "", errors: Sequence[str] = ()) -> RuleSet:
    """Validate an already-parsed document. ``errors`` are problems found earlier (e.g. by the loader)."""
    problems = list(errors)
    if not isinstance(document, dict):
        raise RuleSetError([*problems, "the document must be a mapping with name, version and rules"])
    problems.extend(f"{key}: unknown field" for key in document if key not in _TOP_FIELDS)

    name = document.get("name")
    if not _is_text(name) or len(name) > _MAX_NAME_LENGTH:
        problems.append(f"name: must be a non-empty string of at most {_MAX_NAME_LENGTH} characters")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= _MAX_VERSION:
        problems.append(f"version: must be an integer from 1 to {_MAX_VERSION}")

    raw_rules = document.get("rules")
    rules: list[Rule] = []
    if not isinstance(raw_rules, list) or not raw_rules:
        problems.append("rules: must be a non-empty list")
    else:
        first_index: dict[str, int] = {}
        for index, raw_rule in enumerate(raw_rules):
            rule = _parse_rule(raw_rule, index, problems)
            rule_id = raw_rule.get("id") if isinstance(raw_rule, dict) else None
            if _is_text(rule_id):
                if rule_id in first_index:
                    first = first_index[rule_id]
                    problems.append(
                        f"rules[{index}] ({rule_id}).id: duplicate rule id (first at rules[{first}])"
                    )
                else:
                    first_index[rule_id] = index
            if rule is not None:
                rules.append(rule)

    if problems:
        raise RuleSetError(problems)
    return RuleSet(
        name=cast(str, name), version=cast(int, version), rules=tuple(rules), source_sha256=source_sha256
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that notes duplicate mapping keys, which PyYAML would silently overwrite."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *defaults" merges keys that the mapping's own keys override
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            mark = key_node.start_mark
            loader.duplicates.append(f"line {mark.line + 1}: duplicate key {key!r}")
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _is_text(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value.strip())


def _parse_rule(raw: object, index: int, problems: list[str]) -> Rule | None:
    if not isinstance(raw, dict):
        problems.append(f"rules[{index}]: must be a mapping")
        return None
    rule_id = raw.get("id")
    where = f"rules[{index}] ({rule_id})" if _is_text(rule_id) else f"rules[{index}]"
    before = len(problems)

    problems.extend(f"{where}.{key}: unknown field" for key in raw if key not in _RULE_FIELDS)
    problems.extend(
        f"{where}.{key}: is required"
        for key in _REQUIRED_RULE_FIELDS
        if key not in raw and not (key == "event_types" and "sequence" in raw)
    )

    if "id" in raw and (
        not _is_text(rule_id) or len(rule_id) > _MAX_NAME_LENGTH or any(c.isspace() for c in rule_id)
    ):
        problems.append(
            f"{where}.id: must be a non-empty string without spaces, at most {_MAX_NAME_LENGTH} characters"
        )
    for key in ("title", "category", "legal_basis"):
        if key in raw and not _is_text(raw[key]):
            problems.append(f"{where}.{key}: must be a non-empty string")

    severity = raw.get("severity")
    if "severity" in raw and severity not in SEVERITIES:
        problems.append(f"{where}.severity: unknown severity {severity!r} (one of {', '.join(SEVERITIES)})")

    black_list = raw.get("black_list", False)
    if not isinstance(black_list, bool):
        problems.append(f"{where}.black_list: must be true or false")

    event_types: tuple[str, ...] = ()
    if "sequence" not in raw:
        event_types = _parse_event_types(raw.get("event_types"), f"{where}.event_types", problems)
    subject_kinds = _parse_subject_kinds(raw.get("subject_kinds"), f"{where}.subject_kinds", problems)
    window = sequence = cap = None
    if "window" in raw:
        window = _parse_window(raw["window"], f"{where}.window", problems)
    if "sequence" in raw:
        sequence = _parse_sequence(raw["sequence"], f"{where}.sequence", problems)
        problems.extend(
            f"{where}.{key}: not allowed on a sequence rule (each step has its own)"
            for key in ("event_types", "when")
            if key in raw
        )
        if "window" in raw:
            problems.append(f"{where}.sequence: a rule has a window or a sequence, not both")
    if "cap" in raw:
        cap = _parse_cap(raw["cap"], f"{where}.cap", problems)
        if "window" in raw or "sequence" in raw:
            problems.append(
                f"{where}.cap: only a per-event rule may have a cap (a window or sequence fires once per "
                "completed pattern)"
            )
    effective_from = _parse_instant(raw, "effective_from", where, problems)
    effective_to = _parse_instant(raw, "effective_to", where, problems)
    if effective_from is not None and effective_to is not None and effective_from >= effective_to:
        problems.append(f"{where}.effective_to: must be later than effective_from")

    when = None
    if sequence is not None:
        event_types = tuple(dict.fromkeys(t for step in sequence.steps for t in step.event_types))
    if raw.get("when") is not None and "sequence" not in raw:
        when = _parse_condition(raw["when"], f"{where}.when", problems, negated=False)
    points = None
    if "points" in raw:
        points = _parse_points(raw["points"], f"{where}.points", severity, problems)
    description = _parse_template(raw.get("description", ""), f"{where}.description", problems)
    reason = _parse_template(raw.get("reason"), f"{where}.reason", problems) if "reason" in raw else None
    if reason is not None and not reason.source.strip():
        problems.append(f"{where}.reason: must be a non-empty string")
    if window is not None or "sequence" in raw:
        # Checked here, where the rule form is known: a per-event rule has no {count}.
        _check_window_variables(points, f"{where}.points", problems)

    if len(problems) > before:
        return None
    assert points is not None
    assert reason is not None
    assert description is not None
    return Rule(
        id=cast(str, rule_id),
        title=raw["title"],
        description=description,
        event_types=event_types,
        subject_kinds=subject_kinds,
        when=when,
        points=points,
        category=raw["category"],
        severity=cast(Severity, severity),
        legal_basis=raw["legal_basis"],
        black_list=black_list,
        reason=reason,
        window=window,
        sequence=sequence,
        cap=cap,
        effective_from=effective_from,
        effective_to=effective_to,
    )


def _parse_duration(value: object, path: str, problems: list[str]) -> timedelta | None:
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        problems.append(
            f"{path}: must be a duration such as 90d, 12h, 30m, 45s or 2w (a whole number and a unit), "
            f"got {value!r}"
        )
        return None
    duration = timedelta(seconds=int(match[1]) * _DURATION_UNITS[match[2]])
    if not timedelta(0) < duration <= _MAX_DURATION:
        problems.append(f"{path}: must be more than 0 and at most {_MAX_DURATION.days}d")
        return None
    return duration


def _unknown_fields(node: dict[Any, Any], known: frozenset[str], path: str, problems: list[str]) -> None:
    problems.extend(f"{path}.{key}: unknown field" for key in node if key not in known)


def _required_fields(node: dict[Any, Any], required: Iterable[str], path: str, problems: list[str]) -> None:
    problems.extend(f"{path}.{key}: is required" for key in required if key not in node)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_attribute(node: dict[Any, Any], key: str, path: str, problems: list[str]) -> str | None:
    value = node.get(key)
    if value is None:
        return None
    if not _is_attribute_name(value):
        problems.append(
            f"{path}.{key}: must be an attribute name (letters, digits, underscore), got {value!r}"
        )
        return None
    return cast(str, value)


def _parse_window(node: object, path: str, problems: list[str]) -> Window | None:
    if not isinstance(node, dict):
        problems.append(f"{path}: must be a mapping {{count, within, group_by?}}")
        return None
    before = len(problems)
    _unknown_fields(node, _WINDOW_FIELDS, path, problems)
    _required_fields(node, ("count", "within"), path, problems)
    count = node.get("count")
    if "count" in node and (not _is_count(count) or not 2 <= count <= _MAX_WINDOW_COUNT):
        problems.append(
            f"{path}.count: must be an integer from 2 to {_MAX_WINDOW_COUNT} (one event is a per-event rule)"
        )
    within = _parse_duration(node["within"], f"{path}.within", problems) if "within" in node else None
    group_by = _optional_attribute(node, "group_by", path, problems)
    if len(problems) > before or within is None:
        return None
    return Window(count=cast(int, count), within=within, group_by=group_by)


def _parse_sequence(node: object, path: str, problems: list[str]) -> SequenceSpec | None:
    if not isinstance(node, dict):
        problems.append(f"{path}: must be a mapping {{steps, within, correlate_by?}}")
        return None
    before = len(problems)
    _unknown_fields(node, _SEQUENCE_FIELDS, path, problems)
    _required_fields(node, ("steps", "within"), path, problems)
    within = _parse_duration(node["within"], f"{path}.within", problems) if "within" in node else None
    correlate_by = _optional_attribute(node, "correlate_by", path, problems)
    raw_steps = node.get("steps")
    steps: list[Step] = []
    if "steps" in node:
        if not isinstance(raw_steps, list) or len(raw_steps) != 2:
            problems.append(f"{path}.steps: must be a list of exactly 2 steps (A, then B)")
        else:
            for position, raw_step in enumerate(raw_steps):
                step = _parse_step(raw_step, f"{path}.steps[{position}]", problems)
                if step is not None:
                    steps.append(step)
    if len(problems) > before or within is None:
        return None
    return SequenceSpec(steps=(steps[0], steps[1]), within=within, correlate_by=correlate_by)


def _parse_step(node: object, path: str, problems: list[str]) -> Step | None:
    if not isinstance(node, dict):
        problems.append(f"{path}: must be a mapping {{event_types, when?}}")
        return None
    before = len(problems)
    _unknown_fields(node, _STEP_FIELDS, path, problems)
    _required_fields(node, ("event_types",), path, problems)
    event_types = _parse_event_types(node.get("event_types"), f"{path}.event_types", problems)
    when = None
    if node.get("when") is not None:
        when = _parse_condition(node["when"], f"{path}.when", problems, negated=False)
    if len(problems) > before:
        return None
    return Step(event_types=event_types, when=when)


def _parse_cap(node: object, path: str, problems: list[str]) -> Cap | None:
    if not isinstance(node, dict):
        problems.append(f"{path}: must be a mapping {{points, per}}")
        return None
    before = len(problems)
    _unknown_fields(node, _CAP_FIELDS, path, problems)
    _required_fields(node, ("points", "per"), path, problems)
    points = node.get("points")
    if "points" in node and (not _is_count(points) or not 0 < points <= _MAX_POINTS):
        problems.append(f"{path}.points: must be a positive integer (the most points, in absolute value)")
    per = _parse_duration(node["per"], f"{path}.per", problems) if "per" in node else None
    if len(problems) > before or per is None:
        return None
    return Cap(points=cast(int, points), per=per)


def _parse_instant(raw: dict[Any, Any], key: str, where: str, problems: list[str]) -> datetime | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, datetime):
        problems.append(f"{where}.{key}: must be a timestamp with a timezone, e.g. 2025-01-01T00:00:00Z")
        return None
    return _timestamp(value, f"{where}.{key}", problems)


def _check_window_variables(points: object, path: str, problems: list[str]) -> None:
    if isinstance(points, PointsExpression) and points.names & {"first_at", "last_at"}:
        problems.append(f"{path}: first_at and last_at are timestamps, not numbers")


def _parse_event_types(value: object, path: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: must be a non-empty list of event type names")
        return ()
    for position, name in enumerate(value):
        if not isinstance(name, str) or not _EVENT_TYPE_NAME.fullmatch(name):
            problems.append(f"{path}[{position}]: must be a dotted event type name, got {name!r}")
        elif value.index(name) != position:
            problems.append(f"{path}[{position}]: {name!r} is listed twice")
    return tuple(value)


def _parse_subject_kinds(value: object, path: str, problems: list[str]) -> tuple[SubjectKind, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: must be a non-empty list (omit it to allow any kind)")
        return ()
    for position, kind in enumerate(value):
        if kind not in SUBJECT_KINDS:
            known = ", ".join(SUBJECT_KINDS)
            problems.append(f"{path}[{position}]: unknown subject kind {kind!r} (one of {known})")
        elif value.index(kind) != position:
            problems.append(f"{path}[{position}]: {kind!r} is listed twice")
    return tuple(value)


def _parse_condition(node: object, path: str, problems: list[str], *, negated: bool) -> Condition | None:
    if not isinstance(node, dict) or not node:
        problems.append(f"{path}: must be a comparison {{attr, op, value}} or a group {{all | any | not}}")
        return None
    groups = _GROUP_FIELDS & node.keys()
    if groups:
        if len(node) != 1:
            problems.append(f"{path}: a group has exactly one key (all, any or not), got {sorted(node)}")
            return None
        (key, value) = next(iter(node.items()))
        if key == "not":
            child = _parse_condition(value, f"{path}.not", problems, negated=not negated)
            return None if child is None else Not(child)
        if not isinstance(value, list) or not value:
            problems.append(f"{path}.{key}: must be a non-empty list of conditions")
            return None
        children = [
            _parse_condition(child, f"{path}.{key}[{position}]", problems, negated=negated)
            for position, child in enumerate(value)
        ]
        parsed = tuple(c for c in children if c is not None)
        if len(parsed) != len(children):
            return None
        return AllOf(parsed) if key == "all" else AnyOf(parsed)
    return _parse_comparison(node, path, problems, negated=negated)


def _parse_comparison(
    node: dict[Any, Any], path: str, problems: list[str], *, negated: bool
) -> Comparison | None:
    before = len(problems)
    problems.extend(f"{path}.{key}: unknown field" for key in node if key not in _LEAF_FIELDS)
    problems.extend(f"{path}.{key}: is required" for key in ("attr", "op", "value") if key not in node)
    attr, op, value = node.get("attr"), node.get("op"), node.get("value")
    if "attr" in node and not _is_attribute_name(attr):
        problems.append(f"{path}.attr: must be an attribute name (letters, digits, underscore), got {attr!r}")
    if "op" in node and op not in OPERATORS:
        problems.append(f"{path}.op: unknown operator {op!r}")
    if len(problems) > before:
        return None

    operand: AttributeScalar | tuple[AttributeScalar, ...] | None
    if op in ("eq", "ne"):
        operand = _scalar(value, f"{path}.value", problems)
    elif op in _ORDERING_OPERATORS:
        operand = _orderable(value, f"{path}.value", problems)
    elif op == "in":
        operand = _candidates(value, f"{path}.value", problems)
    elif op == "between":
        operand = _bounds(value, f"{path}.value", problems)
    else:
        operand = _pattern(value, f"{path}.value", problems)
        if negated:
            problems.append(
                f"{path}.op: 'matches' cannot be negated (durable-rules has no negated match); "
                "write the complement as a positive pattern"
            )
    if operand is None or len(problems) > before:
        return None
    return Comparison(attr=cast(str, attr), op=cast(Operator, op), value=operand)


def _is_attribute_name(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and value.isidentifier()


def _scalar(value: object, path: str, problems: list[str]) -> AttributeScalar | None:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        problems.append(f"{path}: must fit in 64 bits")
        return None
    if isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        problems.append(f"{path}: must be a finite number")
        return None
    if isinstance(value, datetime):
        return _timestamp(value, path, problems)
    if isinstance(value, date):
        problems.append(f"{path}: a date needs a time and a timezone, e.g. 2024-01-01T00:00:00Z")
        return None
    problems.append(f"{path}: must be a string, number, boolean or timestamp, got {value!r}")
    return None


def _timestamp(value: datetime, path: str, problems: list[str]) -> datetime | None:
    if value.tzinfo is None or value.utcoffset() is None:
        problems.append(f"{path}: a timestamp needs a timezone, e.g. 2024-01-01T00:00:00Z")
        return None
    return value


def _orderable(value: object, path: str, problems: list[str]) -> int | float | datetime | None:
    if isinstance(value, int | float | datetime | date) and not isinstance(value, bool):
        scalar = _scalar(value, path, problems)
        assert not isinstance(scalar, str | bool)
        return scalar
    problems.append(f"{path}: must be a number or a timestamp, got {value!r}")
    return None


def _candidates(value: object, path: str, problems: list[str]) -> tuple[AttributeScalar, ...] | None:
    if not isinstance(value, list) or not value:
        problems.append(f"{path}: must be a non-empty list of values")
        return None
    items = [_scalar(item, f"{path}[{position}]", problems) for position, item in enumerate(value)]
    parsed = tuple(item for item in items if item is not None)
    return parsed if len(parsed) == len(items) else None


def _bounds(value: object, path: str, problems: list[str]) -> tuple[AttributeScalar, ...] | None:
    if not isinstance(value, list) or len(value) != 2:
        problems.append(f"{path}: must be a list [low, high]")
        return None
    low = _orderable(value[0], f"{path}[0]", problems)
    high = _orderable(value[1], f"{path}[1]", problems)
    if low is None or high is None:
        return None
    if isinstance(low, datetime) != isinstance(high, datetime):
        problems.append(f"{path}: low and high must both be numbers or both be timestamps")
        return None
    if low > high:  # type: ignore[operator]  # same kind, checked above
        problems.append(f"{path}: low {low!r} is greater than high {high!r}")
        return None
    return (low, high)


_QUANTIFIER_START: Final = frozenset("*+?{")


def _pattern(value: object, path: str, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: must be a non-empty regular expression string")
        return None
    problem = _regex_problem(value)
    if problem is not None:
        problems.append(f"{path}: {problem}")
        return None
    return value


def _regex_problem(pattern: str) -> str | None:
    """Why durable-rules would reject or misread a pattern that Python accepts, if it would."""
    if not all(" " <= c <= "~" for c in pattern):
        return "a pattern may only contain printable ASCII (durable-rules matches bytes)"
    if "\\" in pattern:
        return "escapes (\\) are not supported by durable-rules; use a class such as [.] or [0-9]"
    if "$" in pattern or re.search(r"(?<!\[)\^", pattern):
        return "anchors (^ and $) are not supported; the whole value is always matched"
    if "(?" in pattern:
        return "(?...) groups are not supported"
    if "()" in pattern or re.search(r"\[\^?\]", pattern):
        return "empty groups and classes are not supported"
    for match in re.finditer(r"\{(\d*)(,?)(\d*)\}", pattern):
        bounds = [int(n) for n in (match[1], match[3]) if n]
        if any(n > _MAX_REGEX_INTERVAL for n in bounds):
            return f"repetition bounds may not exceed {_MAX_REGEX_INTERVAL}"
    outside_classes = re.sub(r"\[[^\]]*\]", "x", pattern)
    if re.search(r"[*+?}][*+?{]", outside_classes):
        return "a quantifier may not follow another quantifier (no lazy or possessive forms)"
    try:
        re.compile(pattern)
    except re.error as error:
        return f"invalid regular expression: {error}"
    return None


def _parse_points(
    value: object, path: str, severity: object, problems: list[str]
) -> int | PointsExpression | None:
    points: int
    if isinstance(value, int) and not isinstance(value, bool):
        points = value
    elif isinstance(value, str) and value.strip():
        expression = _compile_points(value, path, problems)
        if expression is None:
            return None
        if expression.names:
            return expression
        try:
            # A constant expression is a constant: check its sign like a literal.
            points = expression.evaluate({})
        except EvaluationProblem as problem:
            problems.append(f"{path}: {problem}")
            return None
    else:
        problems.append(f"{path}: must be an integer or an arithmetic expression over attributes")
        return None
    if points == 0:
        problems.append(f"{path}: must not be 0")
    elif abs(points) > _MAX_POINTS:
        problems.append(f"{path}: {points} is out of range")
    elif severity in SEVERITIES and (points > 0) != (severity == "positive"):
        problems.append(f"{path}: {points} contradicts severity {severity!r}: only positive rules add points")
    return points


_BINARY_OPERATORS: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY_OPERATORS: Final[dict[type[ast.unaryop], Callable[[Any], Any]]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCTIONS: Final[dict[str, tuple[Callable[..., Any], int, int | None]]] = {
    # name: (function, fewest arguments, most arguments)
    "min": (min, 2, None),
    "max": (max, 2, None),
    "abs": (abs, 1, 1),
}


def _compile_points(source: str, path: str, problems: list[str]) -> PointsExpression | None:
    if len(source) > _MAX_EXPRESSION_LENGTH:
        problems.append(f"{path}: expression longer than {_MAX_EXPRESSION_LENGTH} characters")
        return None
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as error:
        message = error.msg if isinstance(error, SyntaxError) else type(error).__name__
        problems.append(f"{path}: cannot parse {source!r}: {message}")
        return None
    names: set[str] = set()
    before = len(problems)
    evaluate = _compile_node(tree.body, names, f"{path} ({source!r})", problems)
    if evaluate is None or len(problems) > before:
        return None
    return PointsExpression(source=source, names=frozenset(names), _evaluate=evaluate)


def _compile_node(node: ast.expr, names: set[str], where: str, problems: list[str]) -> _Evaluator | None:
    """A closure computing the node, so that evaluation never walks the tree again (and never eval()s)."""
    if isinstance(node, ast.Constant):
        constant = node.value
        if isinstance(constant, bool) or not isinstance(constant, int | float):
            problems.append(f"{where}: only numbers may appear as constants, got {constant!r}")
            return None
        return lambda _attributes: constant
    if isinstance(node, ast.Name):
        if not _is_attribute_name(node.id) or node.id in _FUNCTIONS:
            problems.append(f"{where}: {node.id!r} is not an attribute name")
            return None
        names.add(node.id)
        return _attribute_reader(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left = _compile_node(node.left, names, where, problems)
        right = _compile_node(node.right, names, where, problems)
        apply = _BINARY_OPERATORS[type(node.op)]
        if left is None or right is None:
            return None
        return lambda attributes: apply(left(attributes), right(attributes))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        operand = _compile_node(node.operand, names, where, problems)
        apply_unary = _UNARY_OPERATORS[type(node.op)]
        if operand is None:
            return None
        return lambda attributes: apply_unary(operand(attributes))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        function, fewest, most = _FUNCTIONS[node.func.id]
        count = len(node.args)
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            problems.append(f"{where}: {node.func.id}() takes plain positional arguments")
            return None
        if count < fewest or (most is not None and count > most):
            wanted = f"{fewest}" if most == fewest else f"{fewest} or more"
            problems.append(f"{where}: {node.func.id}() takes {wanted} arguments")
            return None
        arguments = [_compile_node(a, names, where, problems) for a in node.args]
        compiled = [a for a in arguments if a is not None]
        if len(compiled) != count:
            return None
        return lambda attributes: function(*(a(attributes) for a in compiled))
    allowed = "numbers, attribute names, + - * / //, min, max, abs"
    problems.append(f"{where}: {ast.unparse(node)!r} is not allowed ({allowed})")
    return None


def _attribute_reader(name: str) -> _Evaluator:
    def read(attributes: Mapping[str, AttributeScalar]) -> int | float:
        value = attributes.get(name)
        if value is None:
            raise EvaluationProblem(f"attribute {name!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EvaluationProblem(f"attribute {name!r} is not a number: {value!r}")
        return value

    return read


def _parse_template(value: object, path: str, problems: list[str]) -> Template | None:
    if not isinstance(value, str):
        problems.append(f"{path}: must be a string")
        return None
    try:
        parts: list[_TemplatePart] = [
            (literal, name, format_spec or "", conversion)
            for literal, name, format_spec, conversion in string.Formatter().parse(value)
        ]
    except ValueError as error:
        problems.append(f"{path}: invalid template ({error}); write {{{{ and }}}} for literal braces")
        return None
    before = len(problems)
    for _literal, name, format_spec, _conversion in parts:
        if name is None:
            continue
        if not _is_attribute_name(name):
            problems.append(f"{path}: {{{name}}} must name an attribute (no positions, dots or indexes)")
        elif format_spec and ("{" in format_spec or "}" in format_spec):
            problems.append(f"{path}: {{{name}}} may not nest fields in its format spec")
    if len(problems) > before:
        return None
    names = frozenset(name for _literal, name, _spec, _conversion in parts if name is not None)
    return Template(source=value, names=names, _parts=tuple(parts))
