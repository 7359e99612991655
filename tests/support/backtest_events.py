"""Events, rule sets and a policy for the backtest tests."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from domain.policy import ScorePolicy, parse_policy
from domain.ruleset.model import AttributeScalar, EngineEvent, RuleSet
from domain.ruleset.parsing import rule_set_from_yaml

DAY = timedelta(days=1)
T0 = datetime(2026, 3, 1, tzinfo=UTC)
AS_OF = datetime(2026, 6, 1, tzinfo=UTC)
ALICE = "a" * 64
BOB = "b" * 64
ACME = "c" * 64

RULES = """\
name: test
version: {version}
rules:
  - id: traffic.red_light
    title: Red light
    description: Ran a red light.
    event_types: [traffic.red_light]
    points: {red}
    category: traffic
    severity: minor
    legal_basis: Road law (test)
    reason: Ran a red light
  - id: civic.blood_donation
    title: Blood donation
    description: Donated blood.
    event_types: [civic.blood_donation]
    points: {blood}
    category: civic
    severity: positive
    legal_basis: Health law (test)
    reason: Donated blood
  - id: transport.fare_evasion_repeated
    title: Fare evasion twice in 30 days
    description: Evaded the fare twice.
    event_types: [transport.metro.fare_evasion]
    window: {{count: 2, within: 30d}}
    points: -20
    category: transport
    severity: general
    legal_basis: Metro law (test)
    reason: Evaded the fare {{count}} times
"""


def rule_set(version: int, red: str = "-5", blood: str = "10") -> RuleSet:
    return rule_set_from_yaml(RULES.format(version=version, red=red, blood=blood))


def policy() -> ScorePolicy:
    kind = {
        "base": 1000,
        "bounds": {"min": 0, "max": 2000},
        "tiers": [{"name": "A", "min": 1000}, {"name": "B", "min": 990}, {"name": "C", "min": 0}],
        "visibility_days": {"positive": 730, "minor": 365, "general": 365, "serious": 1095},
        "caps": {"window_days": 365, "positive_per_category": 50},
        "lists": {
            "red": {"tiers": ["A"], "no_active_negative": True},
            "black": {"tiers": ["C"], "flagged_entries": True},
        },
        "consent_required": False,
    }
    return parse_policy({"version": "test-1", "policies": {"person": kind, "organization": kind}})


def event(
    key: str,
    subject: str,
    event_type: str,
    day: int,
    attributes: Mapping[str, AttributeScalar] | None = None,
    kind: str = "person",
) -> EngineEvent:
    return EngineEvent(
        key=f"src/{key}",
        subject_key=subject,
        subject_kind=kind,
        event_type=event_type,
        occurred_at=T0 + day * DAY,
        attributes=dict(attributes or {}),
    )
