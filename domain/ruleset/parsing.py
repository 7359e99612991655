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

The model is in domain/ruleset/model.py; points and templates in points.py; the regex
dialect ``matches`` accepts in regex.py. This module knows the format, not the engine: it
does not import durable-rules.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast

from domain.documents import Problems, child, is_text, item, read_strict
from domain.ruleset.conditions import aware_timestamp, parse_condition
from domain.ruleset.model import (
    Cap,
    EvaluationProblem,
    Rule,
    RuleSet,
    RuleSetError,
    SequenceSpec,
    Step,
    Window,
    is_attribute_name,
)
from domain.ruleset.points import MAX_POINTS, PointsExpression, compile_points, parse_template
from kit.safeyaml import YamlError
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS, Severity, SubjectKind

# Storage keeps rule ids and rule-set names in 128-character columns.
_MAX_NAME_LENGTH: Final = 128
# Rule-set versions are int32 on the wire (RuleSetSummary.version, Outcome.rule_set_version).
_MAX_VERSION: Final = 2**31 - 1

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
_WINDOW_FIELDS: Final = frozenset({"count", "within", "group_by"})
_SEQUENCE_FIELDS: Final = frozenset({"steps", "within", "correlate_by"})
_STEP_FIELDS: Final = frozenset({"event_types", "when"})
_CAP_FIELDS: Final = frozenset({"points", "per"})
# A window of more events would be a count, not a pattern; the bound keeps a
# subject's evaluation linear.
_MAX_WINDOW_COUNT: Final = 1000
# Ten years: the lookback bounds the history loaded for every batch.
_MAX_DURATION: Final = timedelta(days=3660)
# Like the catalogue's names (library.book_returned_late). The engine relies on no
# event type starting with "$".
_EVENT_TYPE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
        document, duplicates = read_strict(raw)
    except YamlError as error:
        raise RuleSetError([f"invalid YAML: {error}"]) from None
    return parse_rule_set(document, source_sha256=hashlib.sha256(raw).hexdigest(), errors=duplicates)


def parse_rule_set(document: object, *, source_sha256: str = "", errors: Sequence[str] = ()) -> RuleSet:
    """Validate an already-parsed document. ``errors`` are problems found earlier (e.g. by the loader)."""
    problems = Problems(errors)
    if not isinstance(document, dict):
        raise RuleSetError([*problems, "the document must be a mapping with name, version and rules"])
    problems.unknown_fields(document, _TOP_FIELDS)
    name = problems.text(document.get("name"), "name", max_length=_MAX_NAME_LENGTH)
    version = problems.whole(document.get("version"), "version", 1, _MAX_VERSION)

    raw_rules = document.get("rules")
    rules: list[Rule] = []
    if not isinstance(raw_rules, list) or not raw_rules:
        problems.add("rules", "must be a non-empty list")
    else:
        first_index: dict[str, int] = {}
        for index, raw_rule in enumerate(raw_rules):
            rule = _parse_rule(raw_rule, index, problems)
            rule_id = raw_rule.get("id") if isinstance(raw_rule, dict) else None
            if is_text(rule_id):
                if rule_id in first_index:
                    first = first_index[rule_id]
                    problems.add(
                        f"rules[{index}] ({rule_id}).id", f"duplicate rule id (first at rules[{first}])"
                    )
                else:
                    first_index[rule_id] = index
            if rule is not None:
                rules.append(rule)

    if problems:
        raise RuleSetError(problems.messages)
    return RuleSet(
        name=cast(str, name), version=cast(int, version), rules=tuple(rules), source_sha256=source_sha256
    )


def _parse_rule(raw: object, index: int, problems: Problems) -> Rule | None:
    if not isinstance(raw, dict):
        problems.add(item("rules", index), "must be a mapping")
        return None
    rule_id = raw.get("id")
    where = f"rules[{index}] ({rule_id})" if is_text(rule_id) else item("rules", index)
    before = len(problems)

    problems.unknown_fields(raw, _RULE_FIELDS, where)
    problems.required(
        raw, (key for key in _REQUIRED_RULE_FIELDS if not (key == "event_types" and "sequence" in raw)), where
    )
    if "id" in raw and (
        not is_text(rule_id) or len(rule_id) > _MAX_NAME_LENGTH or any(c.isspace() for c in rule_id)
    ):
        problems.add(
            child(where, "id"),
            f"must be a non-empty string without spaces, at most {_MAX_NAME_LENGTH} characters",
        )
    for key in ("title", "category", "legal_basis"):
        if key in raw:
            problems.text(raw[key], child(where, key))

    severity = raw.get("severity")
    if "severity" in raw and severity not in SEVERITIES:
        problems.add(
            child(where, "severity"), f"unknown severity {severity!r} (one of {', '.join(SEVERITIES)})"
        )
    black_list = raw.get("black_list", False)
    problems.flag(black_list, child(where, "black_list"))

    event_types: tuple[str, ...] = ()
    if "sequence" not in raw:
        event_types = _parse_event_types(raw.get("event_types"), child(where, "event_types"), problems)
    subject_kinds = _parse_subject_kinds(raw.get("subject_kinds"), child(where, "subject_kinds"), problems)
    window = sequence = cap = None
    if "window" in raw:
        window = _parse_window(raw["window"], child(where, "window"), problems)
    if "sequence" in raw:
        sequence = _parse_sequence(raw["sequence"], child(where, "sequence"), problems)
        for key in ("event_types", "when"):
            if key in raw:
                problems.add(child(where, key), "not allowed on a sequence rule (each step has its own)")
        if "window" in raw:
            problems.add(child(where, "sequence"), "a rule has a window or a sequence, not both")
    if "cap" in raw:
        cap = _parse_cap(raw["cap"], child(where, "cap"), problems)
        if "window" in raw or "sequence" in raw:
            problems.add(
                child(where, "cap"),
                "only a per-event rule may have a cap (a window or sequence fires once per "
                "completed pattern)",
            )
    effective_from = _parse_instant(raw, "effective_from", where, problems)
    effective_to = _parse_instant(raw, "effective_to", where, problems)
    if effective_from is not None and effective_to is not None and effective_from >= effective_to:
        problems.add(child(where, "effective_to"), "must be later than effective_from")

    when = None
    if sequence is not None:
        event_types = tuple(dict.fromkeys(t for step in sequence.steps for t in step.event_types))
    if raw.get("when") is not None and "sequence" not in raw:
        when = parse_condition(raw["when"], child(where, "when"), problems, negated=False)
    points = None
    if "points" in raw:
        points = _parse_points(raw["points"], child(where, "points"), severity, problems)
    description = parse_template(raw.get("description", ""), child(where, "description"), problems)
    reason = parse_template(raw.get("reason"), child(where, "reason"), problems) if "reason" in raw else None
    if reason is not None and not reason.source.strip():
        problems.add(child(where, "reason"), "must be a non-empty string")
    if window is not None or "sequence" in raw:
        # Checked here, where the rule form is known: a per-event rule has no {count}.
        _check_window_variables(points, child(where, "points"), problems)

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


def _optional_attribute(node: dict[Any, Any], key: str, path: str, problems: Problems) -> str | None:
    value = node.get(key)
    if value is None:
        return None
    if not is_attribute_name(value):
        problems.add(
            child(path, key), f"must be an attribute name (letters, digits, underscore), got {value!r}"
        )
        return None
    return cast(str, value)


def _duration(node: dict[Any, Any], key: str, path: str, problems: Problems) -> timedelta | None:
    if key not in node:
        return None
    return problems.duration(node[key], child(path, key), most=_MAX_DURATION)


def _parse_window(value: object, path: str, problems: Problems) -> Window | None:
    before = len(problems)
    node = problems.mapping(
        value,
        path,
        _WINDOW_FIELDS,
        ("count", "within"),
        message="must be a mapping {count, within, group_by?}",
    )
    if node is None:
        return None
    count = node.get("count")
    if "count" in node:
        problems.whole(
            count,
            child(path, "count"),
            2,
            _MAX_WINDOW_COUNT,
            message=f"must be an integer from 2 to {_MAX_WINDOW_COUNT} (one event is a per-event rule)",
        )
    within = _duration(node, "within", path, problems)
    group_by = _optional_attribute(node, "group_by", path, problems)
    if len(problems) > before or within is None:
        return None
    return Window(count=cast(int, count), within=within, group_by=group_by)


def _parse_sequence(value: object, path: str, problems: Problems) -> SequenceSpec | None:
    before = len(problems)
    node = problems.mapping(
        value,
        path,
        _SEQUENCE_FIELDS,
        ("steps", "within"),
        message="must be a mapping {steps, within, correlate_by?}",
    )
    if node is None:
        return None
    within = _duration(node, "within", path, problems)
    correlate_by = _optional_attribute(node, "correlate_by", path, problems)
    raw_steps = node.get("steps")
    steps: list[Step] = []
    if "steps" in node:
        if not isinstance(raw_steps, list) or len(raw_steps) != 2:
            problems.add(child(path, "steps"), "must be a list of exactly 2 steps (A, then B)")
        else:
            for position, raw_step in enumerate(raw_steps):
                step = _parse_step(raw_step, item(child(path, "steps"), position), problems)
                if step is not None:
                    steps.append(step)
    if len(problems) > before or within is None:
        return None
    return SequenceSpec(steps=(steps[0], steps[1]), within=within, correlate_by=correlate_by)


def _parse_step(value: object, path: str, problems: Problems) -> Step | None:
    before = len(problems)
    node = problems.mapping(
        value, path, _STEP_FIELDS, ("event_types",), message="must be a mapping {event_types, when?}"
    )
    if node is None:
        return None
    event_types = _parse_event_types(node.get("event_types"), child(path, "event_types"), problems)
    when = None
    if node.get("when") is not None:
        when = parse_condition(node["when"], child(path, "when"), problems, negated=False)
    if len(problems) > before:
        return None
    return Step(event_types=event_types, when=when)


def _parse_cap(value: object, path: str, problems: Problems) -> Cap | None:
    before = len(problems)
    node = problems.mapping(
        value, path, _CAP_FIELDS, ("points", "per"), message="must be a mapping {points, per}"
    )
    if node is None:
        return None
    points = node.get("points")
    if "points" in node:
        problems.whole(
            points,
            child(path, "points"),
            1,
            MAX_POINTS,
            message="must be a positive integer (the most points, in absolute value)",
        )
    per = _duration(node, "per", path, problems)
    if len(problems) > before or per is None:
        return None
    return Cap(points=cast(int, points), per=per)


def _parse_instant(raw: dict[Any, Any], key: str, where: str, problems: Problems) -> datetime | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, datetime):
        problems.add(child(where, key), "must be a timestamp with a timezone, e.g. 2025-01-01T00:00:00Z")
        return None
    return aware_timestamp(value, child(where, key), problems)


def _check_window_variables(points: object, path: str, problems: Problems) -> None:
    if isinstance(points, PointsExpression) and points.names & {"first_at", "last_at"}:
        problems.add(path, "first_at and last_at are timestamps, not numbers")


def _parse_event_types(value: object, path: str, problems: Problems) -> tuple[str, ...]:
    if value is None:
        return ()
    return problems.distinct(
        value, path, empty="must be a non-empty list of event type names", wrong=_event_type_problem
    )


def _event_type_problem(name: object) -> str | None:
    if isinstance(name, str) and _EVENT_TYPE_NAME.fullmatch(name):
        return None
    return f"must be a dotted event type name, got {name!r}"


def _parse_subject_kinds(value: object, path: str, problems: Problems) -> tuple[SubjectKind, ...]:
    if value is None:
        return ()
    return problems.distinct(
        value, path, empty="must be a non-empty list (omit it to allow any kind)", wrong=_subject_kind_problem
    )


def _subject_kind_problem(kind: object) -> str | None:
    if kind in SUBJECT_KINDS:
        return None
    return f"unknown subject kind {kind!r} (one of {', '.join(SUBJECT_KINDS)})"


def _parse_points(
    value: object, path: str, severity: object, problems: Problems
) -> int | PointsExpression | None:
    points: int
    if isinstance(value, int) and not isinstance(value, bool):
        points = value
    elif isinstance(value, str) and value.strip():
        expression = compile_points(value, path, problems)
        if expression is None:
            return None
        if expression.names:
            return expression
        try:
            # A constant expression is a constant: check its sign like a literal.
            points = expression.evaluate({})
        except EvaluationProblem as problem:
            problems.add(path, str(problem))
            return None
    else:
        problems.add(path, "must be an integer or an arithmetic expression over attributes")
        return None
    if points == 0:
        problems.add(path, "must not be 0")
    elif abs(points) > MAX_POINTS:
        problems.add(path, f"{points} is out of range")
    elif severity in SEVERITIES and (points > 0) != (severity == "positive"):
        problems.add(path, f"{points} contradicts severity {severity!r}: only positive rules add points")
    return points
