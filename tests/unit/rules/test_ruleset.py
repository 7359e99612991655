"""The rule-set file format: loading, validation (every error at once, with paths), expressions, templates."""

from __future__ import annotations

import hashlib
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.ruleset.model import (
    WINDOW_VARIABLES,
    AllOf,
    AttributeScalar,
    Cap,
    Comparison,
    EvaluationProblem,
    Not,
    RuleSet,
    RuleSetError,
    SequenceSpec,
    Step,
    Window,
    outcome_id,
)
from domain.ruleset.parsing import load_rule_set, parse_rule_set, rule_set_from_yaml
from domain.ruleset.points import PointsExpression

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "config" / "rulesets" / "sample.yaml"


def rule(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "library.late_return",
        "title": "Book returned late",
        "event_types": ["library.book_returned_late"],
        "points": -3,
        "category": "civic",
        "severity": "minor",
        "legal_basis": "Illustrative",
        "reason": "Returned {days_late} days late",
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def parse(*rules: dict[str, Any]) -> RuleSet:
    return parse_rule_set({"name": "test", "version": 1, "rules": list(rules)})


ALLOWED = "(numbers, attribute names, + - * / //, min, max, abs)"


def errors_of(*rules: dict[str, Any]) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        parse(*rules)
    return caught.value.errors


def test_sample_rule_set_holds_every_rule_of_the_catalogue() -> None:
    rule_set = load_rule_set(SAMPLE)

    assert (rule_set.name, rule_set.version) == ("egret-sample", 2)
    assert rule_set.source_sha256 == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert {(r.id, r.points if isinstance(r.points, int) else r.points.source) for r in rule_set.rules} == {
        ("transport.bike_parked_in_fence", 1),
        ("transport.metro_fare_evasion", -10),
        ("traffic.red_light", -5),
        ("traffic.drunk_driving", -50),
        ("library.late_return", -3),
        ("civic.volunteer_hours", "2 * (hours // 10)"),
        ("civic.blood_donation", 10),
        ("finance.tax_paid_on_time", 10),
        ("finance.tax_arrears", "-10 * months"),
        ("finance.loan_default", -30),
        ("legal.judgment_defaulter", -100),
        ("utility.bill_arrears", -10),
        ("utility.theft", -60),
        ("commerce.major_food_safety_violation", -50),
        ("commerce.inspection_passed", 5),
        ("civic.public_property_damage", -100),
        ("transport.bike_parked_outside_fence_repeatedly", -5),
        ("transport.metro_fare_evasion_repeated", -20),
        ("library.returns_on_time", 5),
        ("finance.early_loan_default", -20),
    }
    assert [r.id for r in rule_set.rules if r.black_list] == [
        "legal.judgment_defaulter",
        "transport.metro_fare_evasion_repeated",
    ]
    forms = {r.id: (r.window, r.sequence, r.cap) for r in rule_set.rules if r.window or r.sequence or r.cap}
    assert forms == {
        "civic.volunteer_hours": (None, None, Cap(20, timedelta(days=365))),
        "transport.bike_parked_outside_fence_repeatedly": (Window(3, timedelta(days=30), None), None, None),
        "transport.metro_fare_evasion_repeated": (Window(3, timedelta(days=90), None), None, None),
        "library.returns_on_time": (Window(12, timedelta(days=365), None), None, None),
        "finance.early_loan_default": (
            None,
            SequenceSpec(
                steps=(
                    Step(("finance.loan_taken",), None),
                    Step(("finance.loan_default",), AllOf((Comparison("days_overdue", "gt", 30),))),
                ),
                within=timedelta(days=180),
                correlate_by="loan_id",
            ),
            None,
        ),
    }
    assert rule_set.lookback == timedelta(days=365)


def test_sample_rule_set_names_only_catalogue_event_types_and_their_attributes() -> None:
    catalogue = yaml.safe_load((REPO / "config" / "catalogue.yaml").read_text())
    schema = {t["name"]: set(t["attributes"]) for t in catalogue["event_types"]}

    for sample_rule in load_rule_set(SAMPLE).rules:
        steps = (
            sample_rule.sequence.steps
            if sample_rule.sequence
            else [Step(sample_rule.event_types, sample_rule.when)]
        )
        pattern = sample_rule.window is not None or sample_rule.sequence is not None
        quoted = sample_rule.reason.names | sample_rule.description.names
        if isinstance(sample_rule.points, PointsExpression):
            quoted |= sample_rule.points.names
        if pattern:
            quoted -= WINDOW_VARIABLES
        for step in steps:
            for event_type in step.event_types:
                assert event_type in schema, sample_rule.id
                read = _condition_attributes(step.when) if step.when is not None else set()
                assert read <= schema[event_type], sample_rule.id
        # Quoted attributes come from the latest event: the last step's, for a sequence.
        for event_type in steps[-1].event_types:
            assert quoted <= schema[event_type], sample_rule.id
        keyed = sample_rule.sequence.correlate_by if sample_rule.sequence else None
        if keyed is not None:
            assert all(keyed in schema[t] for step in steps for t in step.event_types)


def _condition_attributes(condition: object) -> set[str]:
    if isinstance(condition, Comparison):
        return {condition.attr}
    if isinstance(condition, Not):
        return _condition_attributes(condition.condition)
    assert isinstance(condition, AllOf)
    return set().union(*(_condition_attributes(c) for c in condition.conditions))


def test_a_valid_rule_parses_into_frozen_values() -> None:
    rule_set = parse(
        rule(
            when={
                "all": [
                    {"attr": "days_late", "op": "gt", "value": 30},
                    {"not": {"attr": "x", "op": "eq", "value": 1}},
                ]
            },
            subject_kinds=["person"],
            description="Came back {days_late} days late.",
        )
    )

    (parsed,) = rule_set.rules
    assert parsed.when == AllOf((Comparison("days_late", "gt", 30), Not(Comparison("x", "eq", 1))))
    assert parsed.subject_kinds == ("person",)
    assert parsed.black_list is False
    assert parsed.description.names == {"days_late"}


def test_validation_reports_every_error_at_once_each_with_its_path() -> None:
    source = textwrap.dedent(
        """
        name: broken
        version: 0
        rules:
          - id: a.one
            title: One
            event_types: [a.one]
            points: -1
            category: civic
            severity: minor
            legal_basis: x
            reason: ok
          - id: a.one
            title: ""
            event_types: [a.two]
            points: "-10 * months +"
            category: civic
            severity: grave
            legal_basis: x
            reason: "Owed {amount:.2f} for {0} months"
          - id: a.three
            title: Three
            event_types: []
            points: 5
            category: " "
            severity: positive
            legal_basis: x
            reason: ok
          - id: library.late_return
            title: Late
            event_types: [library.book_returned_late]
            when:
              all:
                - {attr: days_late, op: gtt, value: 30}
                - {any: [{attr: days_late, op: between, value: [9, 1]}]}
            points: -3
            category: civic
            severity: minor
            legal_basis: x
            reason: "Returned {days_late} days late"
            schedule: 30d
        """
    )

    with pytest.raises(RuleSetError) as caught:
        rule_set_from_yaml(source)

    assert sorted(caught.value.errors) == sorted(
        [
            "version: must be an integer from 1 to 2147483647",
            "rules[1] (a.one).id: duplicate rule id (first at rules[0])",
            "rules[1] (a.one).title: must be a non-empty string",
            "rules[1] (a.one).severity: unknown severity 'grave' (one of positive, minor, general, serious)",
            "rules[1] (a.one).points: cannot parse '-10 * months +': invalid syntax",
            "rules[1] (a.one).reason: {0} must name an attribute (no positions, dots or indexes)",
            "rules[2] (a.three).category: must be a non-empty string",
            "rules[2] (a.three).event_types: must be a non-empty list of event type names",
            "rules[3] (library.late_return).schedule: unknown field",
            "rules[3] (library.late_return).when.all[0].op: unknown operator 'gtt'",
            "rules[3] (library.late_return).when.all[1].any[0].value: low 9 is greater than high 1",
        ]
    )


def test_missing_required_fields_are_each_reported() -> None:
    assert errors_of({"id": "r"}) == [
        f"rules[0] (r).{field}: is required"
        for field in ("title", "event_types", "points", "category", "severity", "legal_basis", "reason")
    ]


def test_top_level_shape_is_checked() -> None:
    with pytest.raises(RuleSetError) as caught:
        parse_rule_set({"name": "", "version": True, "rules": [], "extra": 1})
    assert caught.value.errors == [
        "extra: unknown field",
        "name: must be a non-empty string of at most 128 characters",
        "version: must be an integer from 1 to 2147483647",
        "rules: must be a non-empty list",
    ]


def test_invalid_yaml_is_a_rule_set_error() -> None:
    with pytest.raises(RuleSetError, match="invalid YAML"):
        rule_set_from_yaml("name: [unclosed")


def test_duplicate_yaml_keys_are_reported_rather_than_silently_overwritten() -> None:
    source = textwrap.dedent(
        """
        name: n
        version: 1
        rules:
          - id: r
            title: t
            event_types: [a.b]
            points: -1
            points: -100
            category: c
            severity: minor
            legal_basis: l
            reason: r
        """
    )
    with pytest.raises(RuleSetError) as caught:
        rule_set_from_yaml(source)
    assert caught.value.errors == ["line 9: duplicate key 'points'"]


def test_yaml_anchors_and_merge_keys_share_fields_between_rules() -> None:
    source = textwrap.dedent(
        """
        name: n
        version: 1
        rules:
          - &base {id: a, title: t, event_types: [a.b], points: -1, category: c, severity: minor,
                   legal_basis: l, reason: r}
          - <<: *base
            id: b
            points: -2
        """
    )
    assert [(r.id, r.points, r.category) for r in rule_set_from_yaml(source).rules] == [
        ("a", -1, "c"),
        ("b", -2, "c"),
    ]


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"attr": "x", "op": "gt", "value": "5"}, ".value: must be a number or a timestamp, got '5'"),
        ({"attr": "x", "op": "in", "value": []}, ".value: must be a non-empty list of values"),
        ({"attr": "x", "op": "between", "value": [1]}, ".value: must be a list [low, high]"),
        (
            {"attr": "x", "op": "between", "value": [1, datetime(2024, 1, 1, tzinfo=UTC)]},
            ".value: low and high must both be numbers or both be timestamps",
        ),
        (
            {"attr": "x", "op": "eq", "value": datetime(2024, 1, 1).date()},
            ".value: a date needs a time and a timezone, e.g. 2024-01-01T00:00:00Z",
        ),
        (
            {"attr": "x", "op": "eq", "value": datetime(2024, 1, 1)},  # naive on purpose
            ".value: a timestamp needs a timezone, e.g. 2024-01-01T00:00:00Z",
        ),
        ({"attr": "x", "op": "eq", "value": float("nan")}, ".value: must be a finite number"),
        ({"attr": "x", "op": "gt", "value": 2**63}, ".value: must fit in 64 bits"),
        (
            {"attr": "x", "op": "eq", "value": [1]},
            ".value: must be a string, number, boolean or timestamp, got [1]",
        ),
        (
            {"attr": "x.y", "op": "eq", "value": 1},
            ".attr: must be an attribute name (letters, digits, underscore), got 'x.y'",
        ),
        ({"attr": "x", "op": "eq"}, ".value: is required"),
        ({"attr": "x", "op": "eq", "value": 1, "unit": "d"}, ".unit: unknown field"),
        ({"all": []}, ".all: must be a non-empty list of conditions"),
        (
            {"all": [{"attr": "x", "op": "eq", "value": 1}], "any": []},
            ": a group has exactly one key (all, any or not), got ['all', 'any']",
        ),
        ("x > 5", ": must be a comparison {attr, op, value} or a group {all | any | not}"),
    ],
)
def test_condition_values_are_checked_per_operator(condition: object, message: str) -> None:
    assert errors_of(rule(when=condition)) == [f"rules[0] (library.late_return).when{message}"]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("a\\.b", "escapes (\\) are not supported by durable-rules; use a class such as [.] or [0-9]"),
        ("^ab$", "anchors (^ and $) are not supported; the whole value is always matched"),
        ("站.*", "a pattern may only contain printable ASCII (durable-rules matches bytes)"),
        ("(?i)ab", "(?...) groups are not supported"),
        ("a()b", "empty groups and classes are not supported"),
        ("a{1,101}", "repetition bounds may not exceed 100"),
        ("a*?", "a quantifier may not follow another quantifier (no lazy or possessive forms)"),
        ("(ab", "invalid regular expression: missing ), unterminated subpattern at position 0"),
    ],
)
def test_patterns_outside_the_durable_rules_dialect_are_refused(pattern: str, problem: str) -> None:
    assert errors_of(rule(when={"attr": "s", "op": "matches", "value": pattern})) == [
        f"rules[0] (library.late_return).when.value: {problem}"
    ]


def test_patterns_inside_the_dialect_are_accepted() -> None:
    for pattern in ["ST-[0-9]{3,4}", "[^x]+", "(major|minor)", ".*(fraud|theft).*", "a?b*c+"]:
        parse(rule(when={"attr": "s", "op": "matches", "value": pattern}))


def test_matches_under_an_odd_number_of_nots_is_refused() -> None:
    negated = {"not": {"any": [{"attr": "s", "op": "matches", "value": "a+"}]}}
    assert errors_of(rule(when=negated)) == [
        "rules[0] (library.late_return).when.not.any[0].op: 'matches' cannot be negated "
        "(durable-rules has no negated match); write the complement as a positive pattern"
    ]
    parse(rule(when={"not": negated}))


@pytest.mark.parametrize(
    ("points", "severity", "message"),
    [
        (-1, "positive", "-1 contradicts severity 'positive': only positive rules add points"),
        (2, "minor", "2 contradicts severity 'minor': only positive rules add points"),
        ("3 - 3", "minor", "must not be 0"),
        (0, "minor", "must not be 0"),
        (2.5, "minor", "must be an integer or an arithmetic expression over attributes"),
        (True, "minor", "must be an integer or an arithmetic expression over attributes"),
        (2**31, "positive", "2147483648 is out of range"),
    ],
)
def test_constant_points_are_non_zero_and_agree_with_severity(
    points: object, severity: str, message: str
) -> None:
    assert errors_of(rule(points=points, severity=severity)) == [
        f"rules[0] (library.late_return).points: {message}"
    ]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "__import__('os').system('true')",
            "\"__import__('os').system('true')\" is not allowed " + ALLOWED,
        ),
        ("hours ** 2", "'hours ** 2' is not allowed (numbers, attribute names, + - * / //, min, max, abs)"),
        ("hours % 10", "'hours % 10' is not allowed (numbers, attribute names, + - * / //, min, max, abs)"),
        ("event.hours", "'event.hours' is not allowed (numbers, attribute names, + - * / //, min, max, abs)"),
        (
            "round(hours)",
            "'round(hours)' is not allowed (numbers, attribute names, + - * / //, min, max, abs)",
        ),
        ("'ten'", "only numbers may appear as constants, got 'ten'"),
        ("max(hours)", "max() takes 2 or more arguments"),
        ("abs(hours, 1)", "abs() takes 1 arguments"),
        ("-min", "'min' is not an attribute name"),
    ],
)
def test_points_expressions_admit_only_arithmetic_over_attributes(expression: str, message: str) -> None:
    assert errors_of(rule(points=expression)) == [
        f"rules[0] (library.late_return).points ({expression!r}): {message}"
    ]


@pytest.mark.parametrize(
    ("expression", "attributes", "points"),
    [
        ("2 * (hours // 10)", {"hours": 25}, 4),
        ("2 * (hours // 10)", {"hours": 9}, 0),
        ("-10 * months", {"months": 3}, -30),
        ("-amount / 4", {"amount": 10}, -3),  # -2.5 rounds away from zero
        ("amount / 4", {"amount": 10.0}, 3),  # 2.5 rounds away from zero
        ("amount / 3", {"amount": 10}, 3),
        ("max(1, min(hours, 5)) - abs(-2)", {"hours": 9}, 3),
        ("-(x + 1) * +2", {"x": 1.5}, -5),
    ],
)
def test_points_expressions_compute_rounded_integer_points(
    expression: str, attributes: dict[str, int | float], points: int
) -> None:
    (parsed,) = parse(rule(points=expression, severity="positive")).rules
    assert parsed.points_for(attributes) == points


@pytest.mark.parametrize(
    ("expression", "attributes", "problem"),
    [
        ("-10 * months", {}, "attribute 'months' is missing"),
        ("-10 * months", {"months": "3"}, "attribute 'months' is not a number: '3'"),
        ("-10 * months", {"months": True}, "attribute 'months' is not a number: True"),
        ("-10 // months", {"months": 0}, "points '-10 // months': division by zero"),
        ("-10 * months", {"months": 10**12}, "points '-10 * months': -10000000000000 is out of range"),
        (
            "-amount * 1e308 * 10",
            {"amount": 1},
            "points '-amount * 1e308 * 10': result is not a finite number",
        ),
    ],
)
def test_points_that_cannot_be_computed_are_evaluation_problems(
    expression: str, attributes: dict[str, Any], problem: str
) -> None:
    (parsed,) = parse(rule(points=expression)).rules
    with pytest.raises(EvaluationProblem) as caught:
        parsed.points_for(attributes)
    assert str(caught.value) == problem


def test_templates_quote_attributes_with_their_format_specs() -> None:
    (parsed,) = parse(
        rule(
            reason="{amount:.2f} yuan at {station}, on time: {on_time}, when {at}, {{literal}}, {station!r}",
            description="No fields at all {{x}}",
        )
    ).rules
    attributes: dict[str, AttributeScalar] = {
        "amount": 3.456,
        "station": "Lucuo",
        "on_time": False,
        "at": datetime(2025, 3, 1, 8, 30, tzinfo=timezone(timedelta(hours=8))),
    }

    assert parsed.reason.render(attributes) == (
        "3.46 yuan at Lucuo, on time: false, when 2025-03-01T08:30:00+08:00, {literal}, 'Lucuo'"
    )
    assert parsed.description.render({}) == "No fields at all {x}"


def test_templates_that_fail_on_an_event_are_evaluation_problems() -> None:
    (parsed,) = parse(rule(reason="{amount:.2f} owed")).rules
    with pytest.raises(EvaluationProblem, match="attribute 'amount' is missing"):
        parsed.reason.render({})
    with pytest.raises(EvaluationProblem, match=r"cannot format 'many' with '\.2f'"):
        parsed.reason.render({"amount": "many"})


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{}", "{} must name an attribute (no positions, dots or indexes)"),
        ("{event.days}", "{event.days} must name an attribute (no positions, dots or indexes)"),
        ("{days[0]}", "{days[0]} must name an attribute (no positions, dots or indexes)"),
        ("{days:{width}}", "{days} may not nest fields in its format spec"),
        (
            "unbalanced { brace",
            "invalid template (expected '}' before end of string); write {{ and }} for literal braces",
        ),
    ],
)
def test_templates_may_only_name_attributes(template: str, message: str) -> None:
    assert errors_of(rule(reason=template)) == [f"rules[0] (library.late_return).reason: {message}"]


def test_subject_kinds_and_event_types_are_checked() -> None:
    assert errors_of(rule(subject_kinds=["people"], event_types=["a.b", "a.b", "has space"])) == [
        "rules[0] (library.late_return).event_types[1]: 'a.b' is listed twice",
        "rules[0] (library.late_return).event_types[2]: must be a dotted event type name, got 'has space'",
        "rules[0] (library.late_return).subject_kinds[0]: "
        "unknown subject kind 'people' (one of person, organization)",
    ]


def test_outcome_id_is_a_sha256_prefix_of_rule_and_sorted_event_keys() -> None:
    expected = hashlib.sha256(b"egret-sample|1|library.late_return|lib/1|lib/2").hexdigest()[:32]

    assert outcome_id("egret-sample", 1, "library.late_return", ["lib/2", "lib/1"]) == expected
    assert outcome_id("egret-sample", 1, "library.late_return", ["lib/1", "lib/2"]) == expected
    assert outcome_id("egret-sample", 2, "library.late_return", ["lib/1", "lib/2"]) != expected
    assert len(expected) == 32
