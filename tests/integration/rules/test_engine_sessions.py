"""The rule engine over more subjects than durable-rules keeps sessions for (20k events, 2,500 subjects)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from domain.ruleset.parsing import load_rule_set
from services.rules.engine import RuleEngine
from tests.support.event_time import ev

SAMPLE = Path(__file__).resolve().parents[3] / "config" / "rulesets" / "sample.yaml"
AT = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def test_the_engine_keeps_no_session_even_past_durable_rules_limit_of_1024_subjects() -> None:
    """Bounded memory: durable-rules keeps a session (about 100 KB + 11 KB per rule) per
    subject it sees, and fails with MemoryError at the 1025th. Evaluating 20,000 events
    over 2,500 subjects must leave none behind."""
    engine = RuleEngine(load_rule_set(SAMPLE))
    subjects = [f"{i:064x}" for i in range(2500)]
    events = [
        ev(
            f"lib/{i}",
            AT,
            {"days_late": 31 if i % 2 == 0 else 30},
            event_type="library.book_returned_late",
            subject=subjects[i % 2500],
        )
        for i in range(20_000)
    ]

    firings = engine.evaluate(events).firings

    # Even-numbered events fire: 10,000 of them, on the 1,250 even-numbered subjects.
    assert len(firings) == 10_000
    assert len({f.subject_key for f in firings}) == 1250
    assert not any(engine.holds_session(subject) for subject in subjects)
