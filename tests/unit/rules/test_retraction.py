"""What a retraction releases and which firings a re-evaluation may emit (pure functions of
services/rules/domain.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.rules.domain import EvaluationContext, ReversedOutcome, reformed, released_by_rule, without
from services.rules.ruleset import EngineEvent, Firing

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def engine_event(key: str) -> EngineEvent:
    return EngineEvent(key, "s", "person", "transport.metro.fare_evasion", WHEN, {})


def firing(rule_id: str, *keys: str) -> Firing:
    return Firing(
        rule_id, "rs", 1, "t", "", "", keys, "s", "person", -1, "c", "minor", "r", False, WHEN, "|".join(keys)
    )


WINDOW = ReversedOutcome("w", "fare.repeated", ("m/1", "m/2", "m/3"))
EACH = ReversedOutcome("e", "fare.each", ("m/2",))


def test_a_reversed_outcome_releases_its_other_events_for_its_own_rule_only() -> None:
    assert released_by_rule([WINDOW, EACH], "m/2") == {"fare.repeated": frozenset({"m/1", "m/3"})}
    assert released_by_rule([EACH], "m/2") == {}


def test_the_re_evaluation_context_drops_the_released_and_retracted_events_and_their_consumption() -> None:
    context = EvaluationContext(
        history={"s": [engine_event(k) for k in ("m/1", "m/2", "m/3", "m/4")]},
        consumed={"fare.repeated": frozenset({"m/1", "m/2", "m/3", "m/9"}), "fare.each": frozenset({"m/4"})},
        records={},
    )
    adjusted = without(context, {"m/1", "m/3", "m/2"}, [WINDOW, EACH])
    assert [e.key for e in adjusted.history["s"]] == ["m/4"]
    assert adjusted.consumed == {"fare.repeated": frozenset({"m/9"}), "fare.each": frozenset({"m/4"})}


def test_only_firings_of_a_rule_holding_an_event_released_for_it_are_emitted() -> None:
    released = {"fare.repeated": frozenset({"m/1", "m/3"})}
    window = firing("fare.repeated", "m/1", "m/3", "m/4")
    per_event_again = firing("fare.each", "m/1")  # emitted when m/1 was first evaluated
    unrelated = firing("fare.repeated", "m/4", "m/5", "m/6")
    assert reformed([window, per_event_again, unrelated], released) == [window]
