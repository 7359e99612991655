"""Windows, sequences, caps and effective dating, settled in event time with history and prior outcomes.

The seeded arrival-order properties run two seeds here; tests/integration/rules/test_event_time_at_scale.py
runs the others and the 50k-event memory bound.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from domain.ruleset.model import AttributeScalar, EngineEvent
from services.rules.engine import RuleEngine, run_raw
from services.rules.evaluated import prior_outcome
from tests.support.event_time import (
    OTHER,
    PERSON,
    T0,
    THREE_IN_30,
    UNIT_SEEDS,
    Store,
    any_arrival_order_gives_the_ledger_of_one_evaluation,
    day,
    ev,
    in_order_batches_give_the_firings_of_one_evaluation,
    keys,
    retractions_in_any_order_give_the_ledger_of_the_remaining_events,
    rule,
    rule_set,
)

# --- windows -------------------------------------------------------------------------


def test_a_window_fires_on_the_event_that_completes_it_with_every_event_as_evidence() -> None:
    engine = RuleEngine(rule_set(THREE_IN_30))

    firings = engine.evaluate([ev("s/1", day(0)), ev("s/2", day(10)), ev("s/3", day(20))]).firings

    assert keys(firings) == [("s/1", "s/2", "s/3")]
    assert firings[0].occurred_at == day(20)
    assert firings[0].reason == "3 times"
    assert firings[0].points == -5


def test_a_window_spanning_exactly_its_duration_fires_and_one_second_more_does_not() -> None:
    engine = RuleEngine(rule_set(THREE_IN_30))
    exactly = [ev("a/1", day(0)), ev("a/2", day(15)), ev("a/3", day(30))]
    beyond = [
        ev("b/1", day(0), subject=OTHER),
        ev("b/2", day(15), subject=OTHER),
        ev("b/3", day(30) + timedelta(seconds=1), subject=OTHER),
    ]

    assert keys(engine.evaluate(exactly + beyond).firings) == [("a/1", "a/2", "a/3")]


def test_each_completed_window_fires_once_and_an_event_counts_in_one_window() -> None:
    engine = RuleEngine(rule_set(THREE_IN_30))
    # Seven events within 30 days: two windows (earliest first) and one left over.
    events = [ev(f"s/{i}", day(i)) for i in range(1, 8)]

    assert keys(engine.evaluate(events).firings) == [("s/1", "s/2", "s/3"), ("s/4", "s/5", "s/6")]


def test_an_event_that_cannot_start_a_window_is_passed_over_for_the_next() -> None:
    engine = RuleEngine(rule_set(THREE_IN_30))
    # day 0 has only day 25 within 30 days; days 25, 40, 50 fit in 25 days.
    events = [ev("s/0", day(0)), ev("s/25", day(25)), ev("s/40", day(40)), ev("s/50", day(50))]

    assert keys(engine.evaluate(events).firings) == [("s/25", "s/40", "s/50")]


def test_grouped_windows_count_each_attribute_value_apart_and_skip_events_without_it() -> None:
    grouped = rule(
        "station",
        window={"count": 2, "within": "90d", "group_by": "station"},
        reason="{count} at {station}",
    )
    engine = RuleEngine(rule_set(grouped))
    events = [
        ev("s/1", day(0), {"station": "Lucuo"}),
        ev("s/2", day(1), {"station": "Gaoqi"}),
        ev("s/3", day(2)),  # no station: in no group
        ev("s/4", day(3), {"station": "Lucuo"}),
        ev("s/5", day(4)),
    ]

    firings = engine.evaluate(events).firings

    assert keys(firings) == [("s/1", "s/4")]
    assert firings[0].reason == "2 at Lucuo"


def test_windows_count_only_events_that_match_the_condition_and_type() -> None:
    on_time = rule(
        "on_time",
        window={"count": 2, "within": "365d"},
        when={"attr": "on_time", "op": "eq", "value": True},
        points=5,
        severity="positive",
    )
    engine = RuleEngine(rule_set(on_time))
    events = [
        ev("s/1", day(0), {"on_time": True}),
        ev("s/2", day(1), {"on_time": False}),
        ev("s/3", day(2), {"on_time": True}, event_type="other.type"),
        ev("s/4", day(3), {"on_time": True}),
    ]

    assert keys(engine.evaluate(events).firings) == [("s/1", "s/4")]


def test_a_late_event_completes_the_window_it_belongs_to() -> None:
    store = Store(rule_set(THREE_IN_30))

    assert store.deliver([ev("s/1", day(0)), ev("s/3", day(20))]) == []
    # Arrives after day 20 was evaluated, but happened on day 10.
    late = store.deliver([ev("s/2", day(10))])

    assert keys(late) == [("s/1", "s/2", "s/3")]
    assert late[0].occurred_at == day(20)  # the window's latest event, not the late one


def test_a_late_event_outside_every_window_completes_none() -> None:
    store = Store(rule_set(THREE_IN_30))
    store.deliver([ev("s/1", day(0)), ev("s/3", day(20))])

    assert store.deliver([ev("s/2", day(-11))]) == []  # 31 days before day 20


def test_a_late_event_between_fired_events_regroups_them_as_event_time_would() -> None:
    store = Store(rule_set(THREE_IN_30))
    fired = store.deliver([ev("s/1", day(0)), ev("s/2", day(10)), ev("s/3", day(20))])
    assert keys(fired) == [("s/1", "s/2", "s/3")]

    # Lands inside the fired window: in event time the window is days 0, 5, 10, so the
    # outcome of days 0, 10, 20 is superseded and that one fires instead ...
    assert keys(store.deliver([ev("s/late", day(5))])) == [("s/1", "s/late", "s/2")]
    assert store.reversed == [fired[0].outcome_id]
    # ... and day 20 is unused: it counts towards the next window with later events.
    assert keys(store.deliver([ev("s/4", day(25)), ev("s/5", day(30))])) == [("s/3", "s/4", "s/5")]
    assert keys(store.firings) == [("s/1", "s/late", "s/2"), ("s/3", "s/4", "s/5")]


def test_repeated_evaluation_with_history_and_prior_outcomes_fires_each_window_once() -> None:
    store = Store(rule_set(THREE_IN_30))
    events = [ev(f"s/{i}", day(3 * i)) for i in range(9)]
    for event in events:
        store.deliver([event])

    assert keys(store.firings) == [("s/0", "s/1", "s/2"), ("s/3", "s/4", "s/5"), ("s/6", "s/7", "s/8")]
    # The same batch again, as after a crash before commit: the same outcome ids.
    history = {PERSON: events[:8]}
    prior = {PERSON: [prior_outcome(f) for f in store.firings[:2]]}
    again = store.engine.evaluate([events[8]], history, prior)
    assert [f.outcome_id for f in again.firings] == [store.firings[2].outcome_id]
    assert again.superseded == []


def test_firings_made_only_of_history_are_not_emitted_again() -> None:
    engine = RuleEngine(rule_set(THREE_IN_30))
    history = {PERSON: [ev("s/1", day(0)), ev("s/2", day(1)), ev("s/3", day(2))]}
    fired = engine.evaluate(history[PERSON]).firings
    prior = {PERSON: [prior_outcome(f) for f in fired]}

    result = engine.evaluate([ev("s/4", day(3))], history, prior)
    assert (result.firings, result.superseded) == ([], [])


def test_history_alone_fires_when_no_prior_outcome_holds_it() -> None:
    # What the store holds decides: a window of old events that never fired (the rule set
    # came later, or a retraction freed them) is formed when the region is settled.
    engine = RuleEngine(rule_set(THREE_IN_30))
    history = {PERSON: [ev("s/1", day(0)), ev("s/2", day(1)), ev("s/3", day(2))]}

    assert keys(engine.evaluate([ev("s/4", day(3))], history).firings) == [("s/1", "s/2", "s/3")]


@pytest.mark.parametrize("seed", UNIT_SEEDS)
def test_in_order_batches_give_exactly_the_firings_of_one_evaluation_of_everything(seed: int) -> None:
    in_order_batches_give_the_firings_of_one_evaluation(seed)


def test_a_restart_rebuilds_open_windows_from_history_and_loses_or_duplicates_nothing() -> None:
    definition = rule_set(THREE_IN_30)
    before = Store(definition)
    before.deliver([ev("s/1", day(0)), ev("s/2", day(1)), ev("s/3", day(2)), ev("s/4", day(3))])
    # A new process: a fresh engine, the same stored events and outcomes.
    after = Store(definition)
    after.evaluated, after.active = before.evaluated, before.active

    fired = after.deliver([ev("s/5", day(4)), ev("s/6", day(5))])

    assert keys(fired) == [("s/4", "s/5", "s/6")]
    assert keys(after.firings) == [("s/1", "s/2", "s/3"), ("s/4", "s/5", "s/6")]


def test_history_outside_the_lookback_of_the_subjects_new_events_is_ignored() -> None:
    engine = RuleEngine(rule_set(THREE_IN_30))
    history = {PERSON: [ev("s/old1", day(-40)), ev("s/old2", day(-35))]}

    # Within 30 days of the new event there is nothing: the far history may not count.
    assert engine.evaluate([ev("s/new", day(0))], history).firings == []


def test_window_points_and_reasons_may_use_count_and_the_latest_events_attributes() -> None:
    definition = rule_set(
        rule(
            "w",
            window={"count": 2, "within": "1d"},
            points="-2 * count - amount",
            reason="{count} between {first_at:%Y-%m-%d} and {last_at:%Y-%m-%d}, last {amount}",
        )
    )
    firings = (
        RuleEngine(definition)
        .evaluate([ev("s/1", day(0), {"amount": 1}), ev("s/2", day(0.5), {"amount": 3})])
        .firings
    )

    assert [(f.points, f.reason) for f in firings] == [(-7, "2 between 2025-01-01 and 2025-01-01, last 3")]


# --- sequences -----------------------------------------------------------------------

LOAN = rule(
    "loan",
    event_types=None,
    sequence={
        "steps": [
            {"event_types": ["finance.loan_taken"]},
            {"event_types": ["finance.loan_default"], "when": {"attr": "days", "op": "gt", "value": 30}},
        ],
        "within": "180d",
        "correlate_by": "loan_id",
    },
    points=-20,
    reason="Defaulted on {loan_id} {count} steps",
)


def taken(key: str, at: datetime, loan: str | None) -> EngineEvent:
    return ev(key, at, {"loan_id": loan} if loan else {}, event_type="finance.loan_taken")


def default(key: str, at: datetime, loan: str | None, days: int = 60) -> EngineEvent:
    attributes: dict[str, AttributeScalar] = {"days": days}
    if loan:
        attributes["loan_id"] = loan
    return ev(key, at, attributes, event_type="finance.loan_default")


def test_a_sequence_fires_on_the_second_step_correlated_with_the_first() -> None:
    engine = RuleEngine(rule_set(LOAN))
    events = [
        taken("t/1", day(0), "L1"),
        taken("t/2", day(1), "L2"),
        default("d/2", day(50), "L2"),
        default("d/9", day(60), "L9"),  # no such loan taken
        default("d/1", day(70), "L1", days=10),  # not a default by the condition
    ]

    firings = engine.evaluate(events).firings

    assert keys(firings) == [("t/2", "d/2")]
    assert firings[0].reason == "Defaulted on L2 2 steps"
    assert firings[0].occurred_at == day(50)


def test_a_sequence_holds_at_exactly_its_duration_and_not_one_second_later_nor_backwards() -> None:
    engine = RuleEngine(rule_set(LOAN))
    events = [
        taken("t/1", day(0), "L1"),
        default("d/1", day(180), "L1"),
        taken("t/2", day(0), "L2"),
        default("d/2", day(180) + timedelta(seconds=1), "L2"),
        taken("t/3", day(10), "L3"),
        default("d/3", day(5), "L3"),  # before the loan: not "then"
        taken("t/4", day(10), "L4"),
        default("d/4", day(10), "L4"),  # the same instant: not "then" either
    ]

    assert keys(engine.evaluate(events).firings) == [("t/1", "d/1")]


def test_events_without_the_correlation_attribute_correlate_with_nothing() -> None:
    engine = RuleEngine(rule_set(LOAN))

    assert engine.evaluate([taken("t/1", day(0), None), default("d/1", day(5), None)]).firings == []


def test_a_sequence_arriving_out_of_order_fires_once_when_both_steps_are_known() -> None:
    store = Store(rule_set(LOAN))

    assert store.deliver([default("d/1", day(50), "L1")]) == []
    assert keys(store.deliver([taken("t/1", day(0), "L1")])) == [("t/1", "d/1")]
    # A second default on the same loan finds the loan taken already used.
    assert store.deliver([default("d/2", day(60), "L1")]) == []


def test_each_second_step_takes_the_earliest_unused_first_step() -> None:
    engine = RuleEngine(rule_set(LOAN))
    events = [
        taken("t/1", day(0), "L1"),
        taken("t/2", day(1), "L1"),
        default("d/1", day(10), "L1"),
        default("d/2", day(11), "L1"),
        default("d/3", day(12), "L1"),
    ]

    assert keys(engine.evaluate(events).firings) == [("t/1", "d/1"), ("t/2", "d/2")]


def test_run_raw_counts_window_matches_and_sequence_joins() -> None:
    definition = rule_set(THREE_IN_30, LOAN)
    events = [
        ev("s/1", day(0)),
        ev("s/2", day(1)),
        taken("t/1", day(0), "L1"),
        default("d/1", day(5), "L1"),
        default("d/2", day(6), "L1"),
    ]

    # Two window matches and two joined pairs; evaluate() picks one pair, no window.
    assert run_raw(definition, events) == 4
    assert keys(RuleEngine(definition).evaluate(events).firings) == [("t/1", "d/1")]


# --- caps ----------------------------------------------------------------------------

CAPPED = rule(
    "volunteer",
    points="hours",
    severity="positive",
    cap={"points": 20, "per": "10d"},
    effective_from=T0,
)


def test_a_cap_limits_the_points_per_period_and_resets_at_the_period_boundary() -> None:
    engine = RuleEngine(rule_set(CAPPED))
    events = [
        ev("v/1", day(0), {"hours": 8}),
        ev("v/2", day(1), {"hours": 8}),
        ev("v/3", day(2), {"hours": 8}),  # 4 left of 20
        ev("v/4", day(3), {"hours": 8}),  # nothing left: not emitted
        ev("v/5", day(10) - timedelta(seconds=1), {"hours": 1}),  # still the first period
        ev("v/6", day(10), {"hours": 8}),  # the second period starts at T0 + 10 days
    ]

    assert [(f.event_keys[0], f.points) for f in engine.evaluate(events).firings] == [
        ("v/1", 8),
        ("v/2", 8),
        ("v/3", 4),
        ("v/6", 8),
    ]


def test_a_cap_shares_a_period_in_event_time_whatever_order_the_events_came_in() -> None:
    store = Store(rule_set(CAPPED))
    store.deliver([ev("v/3", day(3), {"hours": 15})])
    # Late, and earlier in the period: it takes 15 and day 3 keeps the 5 left.
    late = store.deliver([ev("v/1", day(1), {"hours": 15})])
    assert sorted((f.event_keys[0], f.points) for f in late) == [("v/1", 15), ("v/3", 5)]
    store.deliver([ev("v/2", day(2), {"hours": 15})])

    assert sorted((f.event_keys[0], f.points) for f in store.firings) == [("v/1", 15), ("v/2", 5)]
    assert len(store.reversed) == 2  # v/3 at 15, then v/3 at 5
    at_once = RuleEngine(rule_set(CAPPED)).evaluate(
        [ev("v/1", day(1), {"hours": 15}), ev("v/2", day(2), {"hours": 15}), ev("v/3", day(3), {"hours": 15})]
    )
    assert {f.outcome_id for f in store.firings} == {f.outcome_id for f in at_once.firings}


def test_a_negative_capped_rule_deducts_at_most_the_cap() -> None:
    engine = RuleEngine(rule_set(rule("n", points="-10 * months", cap={"points": 25, "per": "365d"})))

    firings = engine.evaluate([ev("t/1", day(0), {"months": 2}), ev("t/2", day(1), {"months": 2})]).firings

    assert [f.points for f in firings] == [-20, -5]


# --- effective dating ----------------------------------------------------------------


def test_effective_from_is_inclusive_and_effective_to_exclusive_on_occurred_at() -> None:
    dated = rule("dated", effective_from=day(10), effective_to=day(20))
    engine = RuleEngine(rule_set(dated))
    events = [
        ev("e/1", day(10) - timedelta(seconds=1)),
        ev("e/2", day(10)),
        ev("e/3", day(20) - timedelta(seconds=1)),
        ev("e/4", day(20)),
    ]

    assert keys(engine.evaluate(events).firings) == [("e/2",), ("e/3",)]


def test_a_window_counts_only_events_inside_the_effective_period() -> None:
    dated = rule("w", window={"count": 2, "within": "30d"}, effective_from=day(10))
    engine = RuleEngine(rule_set(dated))

    assert keys(engine.evaluate([ev("e/1", day(9)), ev("e/2", day(11)), ev("e/3", day(12))]).firings) == [
        ("e/2", "e/3")
    ]


# --- the rule set's lookback ---------------------------------------------------------


def test_lookback_is_the_longest_window_sequence_or_cap_period() -> None:
    assert rule_set(rule()).lookback == timedelta(0)
    assert rule_set(rule()).history_event_types == frozenset()
    definition = rule_set(THREE_IN_30, LOAN, rule("c", cap={"points": 5, "per": "2w"}, event_types=["x.y"]))
    assert definition.lookback == timedelta(days=180)
    assert definition.history_event_types == {
        "test.happened",
        "finance.loan_taken",
        "finance.loan_default",
        "x.y",
    }


@pytest.mark.parametrize("seed", UNIT_SEEDS)
def test_any_arrival_order_and_batching_gives_the_ledger_of_one_evaluation_in_event_time(seed: int) -> None:
    any_arrival_order_gives_the_ledger_of_one_evaluation(seed)


@pytest.mark.parametrize("seed", UNIT_SEEDS)
def test_retractions_in_any_order_give_the_ledger_of_the_remaining_events(seed: int) -> None:
    retractions_in_any_order_give_the_ledger_of_the_remaining_events(seed)
