"""What a retraction settles its subject with (pure functions of services/rules/domain.py)
and what the settling does to the subject's outcomes (the engine, in event time)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain.ruleset.model import EngineEvent
from domain.ruleset.parsing import parse_rule_set
from services.rules.batch import EvaluationContext, without
from services.rules.engine import RuleEngine
from services.rules.evaluated import prior_outcome
from services.rules.windows import PriorOutcome

WHEN = datetime(2026, 1, 1, tzinfo=UTC)
SUBJECT = "s"
RULES = parse_rule_set(
    {
        "name": "test",
        "version": 1,
        "rules": [
            {
                "id": "fare.repeated",
                "title": "Repeated fare evasion",
                "event_types": ["transport.metro.fare_evasion"],
                "window": {"count": 3, "within": "90d"},
                "points": -10,
                "category": "transport",
                "severity": "general",
                "legal_basis": "Illustrative",
                "reason": "{count} fare evasions",
            }
        ],
    }
)


def engine_event(key: str, days: int = 0) -> EngineEvent:
    return EngineEvent(
        key, SUBJECT, "person", "transport.metro.fare_evasion", WHEN + timedelta(days=days), {}
    )


def outcome(outcome_id: str, *keys: str) -> PriorOutcome:
    return PriorOutcome(outcome_id, "fare.repeated", SUBJECT, keys, WHEN, WHEN, -10)


def test_the_settling_context_drops_the_retracted_event_and_the_outcomes_it_reverses() -> None:
    context = EvaluationContext(
        history={SUBJECT: [engine_event(k) for k in ("m/1", "m/2", "m/3", "m/4")]},
        prior={SUBJECT: [outcome("w", "m/1", "m/2", "m/3"), outcome("v", "m/4", "m/5", "m/6")]},
        records={},
    )
    adjusted = without(context, "m/2", {"w"})
    assert [e.key for e in adjusted.history[SUBJECT]] == ["m/1", "m/3", "m/4"]
    assert [o.outcome_id for o in adjusted.prior[SUBJECT]] == ["v"]


def test_settling_after_a_retraction_re_forms_the_window_the_rest_of_the_events_make() -> None:
    # Days 0, 10, 20 and 60 of "3 within 90 days": {0, 10, 20} fired and day 60 waits.
    engine = RuleEngine(RULES)
    days = {"m/0": 0, "m/10": 10, "m/20": 20, "m/60": 60}
    events = [engine_event(key, at) for key, at in days.items()]
    (fired,) = engine.evaluate(events).firings
    assert fired.event_keys == ("m/0", "m/10", "m/20")

    # Day 10 is retracted: its outcome is reversed and the subject settled from day 10 on.
    settled = engine.evaluate(
        [],
        history={SUBJECT: [e for e in events if e.key != "m/10"]},
        prior={SUBJECT: []},
        since={SUBJECT: WHEN + timedelta(days=10)},
    )
    assert [f.event_keys for f in settled.firings] == [("m/0", "m/20", "m/60")]
    assert settled.superseded == []


def test_settling_supersedes_a_later_window_the_retraction_regroups() -> None:
    # "3 within 90 days" on days 0, 10, 20, 30, 40, 50: {0, 10, 20} and {30, 40, 50}.
    engine = RuleEngine(RULES)
    events = [engine_event(f"m/{d}", d) for d in (0, 10, 20, 30, 40, 50)]
    first, second = engine.evaluate(events).firings
    # Day 10 retracted: in event time the windows are now {0, 20, 30}, and 40, 50 wait.
    settled = engine.evaluate(
        [],
        history={SUBJECT: [e for e in events if e.key != "m/10"]},
        prior={SUBJECT: [prior_outcome(second)]},
        since={SUBJECT: WHEN + timedelta(days=10)},
    )
    assert [f.event_keys for f in settled.firings] == [("m/0", "m/20", "m/30")]
    assert [s.outcome.outcome_id for s in settled.superseded] == [second.outcome_id]
    assert first.outcome_id not in {f.outcome_id for f in settled.firings}
