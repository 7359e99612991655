"""Windows, sequences, caps and effective dating in the format: what parses, and every error's path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain.ruleset.model import Cap, Comparison, RuleSetError, SequenceSpec, Step, Window
from domain.ruleset.parsing import parse_rule_set, rule_set_from_yaml
from tests.support.event_time import rule


def errors_of(*rules: dict[str, Any]) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        parse_rule_set({"name": "test", "version": 1, "rules": list(rules)})
    return caught.value.errors


def test_the_yaml_forms_parse_into_frozen_values() -> None:
    parsed = rule_set_from_yaml(
        """
name: forms
version: 2
rules:
  - id: fares
    title: Fare evasion 3 times in 90 days
    event_types: [transport.metro.fare_evasion]
    window: {count: 3, within: 90d, group_by: station}
    points: -20
    category: transport
    severity: general
    legal_basis: Illustrative
    black_list: true
    reason: "{count} evasions at {station}"
  - id: loans
    title: Early default
    sequence:
      steps:
        - event_types: [finance.loan_taken]
        - event_types: [finance.loan_default]
          when: {attr: days_overdue, op: gt, value: 30}
      within: 26w
      correlate_by: loan_id
    points: -20
    category: finance
    severity: general
    legal_basis: Illustrative
    reason: Loan {loan_id}
  - id: hours
    title: Volunteering
    event_types: [civic.volunteer_hours]
    points: "2 * (hours // 10)"
    cap: {points: 20, per: 365d}
    effective_from: 2025-01-01T00:00:00Z
    effective_to: 2026-01-01T00:00:00+08:00
    category: civic
    severity: positive
    legal_basis: Illustrative
    reason: "{hours} hours"
"""
    )
    fares, loans, hours = parsed.rules

    assert fares.window == Window(count=3, within=timedelta(days=90), group_by="station")
    assert loans.sequence == SequenceSpec(
        steps=(
            Step(("finance.loan_taken",), None),
            Step(("finance.loan_default",), Comparison("days_overdue", "gt", 30)),
        ),
        within=timedelta(weeks=26),
        correlate_by="loan_id",
    )
    assert loans.event_types == ("finance.loan_taken", "finance.loan_default")
    assert loans.when is None
    assert hours.cap == Cap(points=20, per=timedelta(days=365))
    assert hours.effective_from == datetime(2025, 1, 1, tzinfo=UTC)
    assert hours.effective_to == datetime(2025, 12, 31, 16, tzinfo=UTC)
    assert parsed.lookback == timedelta(days=365)


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [("45s", 45), ("30m", 1800), ("12h", 43200), ("90d", 7776000), ("2w", 1209600), (" 3d ", 259200)],
)
def test_durations_are_a_whole_number_and_a_unit(duration: str, seconds: int) -> None:
    parsed = parse_rule_set(
        {"name": "t", "version": 1, "rules": [rule(window={"count": 2, "within": duration})]}
    )
    assert parsed.rules[0].window == Window(2, timedelta(seconds=seconds), None)


def test_every_error_of_the_new_forms_is_reported_at_once_with_rule_and_path() -> None:
    assert errors_of(
        rule("w1", window={"count": 1, "within": "90 days", "group_by": "a.b", "size": 3}),
        rule("w2", window=[3, "30d"]),
        rule("w3", window={}),
        rule(
            "s1",
            event_types=["a.b"],
            when={"attr": "x", "op": "eq", "value": 1},
            sequence={
                "steps": [
                    {"event_types": ["a.b"], "if": 1},
                    {"when": {"attr": "x", "op": "nope", "value": 1}},
                ],
                "within": "0d",
                "correlate_by": 5,
            },
        ),
        rule("s2", event_types=None, sequence={"steps": [{"event_types": ["a.b"]}], "within": "1d"}),
        rule("s3", event_types=None, window={"count": 2, "within": "1d"}, sequence={"within": "1d"}),
        rule("c1", cap={"points": 0, "per": "1y"}),
        rule("c2", cap={"points": 5, "per": "1d"}, window={"count": 2, "within": "1d"}),
        rule("d1", effective_from="2025-01-01", effective_to=datetime(2025, 1, 1)),
        rule(
            "d2",
            effective_from=datetime(2025, 2, 1, tzinfo=UTC),
            effective_to=datetime(2025, 1, 1, tzinfo=UTC),
        ),
        rule("p1", window={"count": 2, "within": "1d"}, points="-1 * first_at"),
    ) == [
        "rules[0] (w1).window.size: unknown field",
        "rules[0] (w1).window.count: must be an integer from 2 to 1000 (one event is a per-event rule)",
        "rules[0] (w1).window.within: must be a duration such as 90d, 12h, 30m, 45s or 2w "
        "(a whole number and a unit), got '90 days'",
        "rules[0] (w1).window.group_by: must be an attribute name (letters, digits, underscore), got 'a.b'",
        "rules[1] (w2).window: must be a mapping {count, within, group_by?}",
        "rules[2] (w3).window.count: is required",
        "rules[2] (w3).window.within: is required",
        "rules[3] (s1).sequence.within: must be more than 0 and at most 3660d",
        "rules[3] (s1).sequence.correlate_by: must be an attribute name (letters, digits, underscore), got 5",
        "rules[3] (s1).sequence.steps[0].if: unknown field",
        "rules[3] (s1).sequence.steps[1].event_types: is required",
        "rules[3] (s1).sequence.steps[1].when.op: unknown operator 'nope'",
        "rules[3] (s1).event_types: not allowed on a sequence rule (each step has its own)",
        "rules[3] (s1).when: not allowed on a sequence rule (each step has its own)",
        "rules[4] (s2).sequence.steps: must be a list of exactly 2 steps (A, then B)",
        "rules[5] (s3).sequence.steps: is required",
        "rules[5] (s3).sequence: a rule has a window or a sequence, not both",
        "rules[6] (c1).cap.points: must be a positive integer (the most points, in absolute value)",
        "rules[6] (c1).cap.per: must be a duration such as 90d, 12h, 30m, 45s or 2w "
        "(a whole number and a unit), got '1y'",
        "rules[7] (c2).cap: only a per-event rule may have a cap "
        "(a window or sequence fires once per completed pattern)",
        "rules[8] (d1).effective_from: must be a timestamp with a timezone, e.g. 2025-01-01T00:00:00Z",
        "rules[8] (d1).effective_to: a timestamp needs a timezone, e.g. 2024-01-01T00:00:00Z",
        "rules[9] (d2).effective_to: must be later than effective_from",
        "rules[10] (p1).points: first_at and last_at are timestamps, not numbers",
    ]
