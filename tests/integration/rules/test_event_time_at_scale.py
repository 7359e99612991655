"""The rule engine in event time at scale: the seeded arrival-order properties over the seeds the unit ring
leaves out, and memory that stays bounded over 50k events and 5k subjects."""

from __future__ import annotations

import random

import pytest

from tests.support.event_time import (
    THREE_IN_30,
    UNIT_SEEDS,
    Store,
    any_arrival_order_gives_the_ledger_of_one_evaluation,
    day,
    ev,
    in_order_batches_give_the_firings_of_one_evaluation,
    retractions_in_any_order_give_the_ledger_of_the_remaining_events,
    rule,
    rule_set,
)


@pytest.mark.parametrize("seed", range(len(UNIT_SEEDS), 5))
def test_in_order_batches_give_exactly_the_firings_of_one_evaluation_of_everything(seed: int) -> None:
    in_order_batches_give_the_firings_of_one_evaluation(seed)


@pytest.mark.parametrize("seed", range(len(UNIT_SEEDS), 12))
def test_any_arrival_order_and_batching_gives_the_ledger_of_one_evaluation_in_event_time(seed: int) -> None:
    any_arrival_order_gives_the_ledger_of_one_evaluation(seed)


@pytest.mark.parametrize("seed", range(len(UNIT_SEEDS), 8))
def test_retractions_in_any_order_give_the_ledger_of_the_remaining_events(seed: int) -> None:
    retractions_in_any_order_give_the_ledger_of_the_remaining_events(seed)


def test_bounded_memory_over_50k_events_and_5k_subjects_leaves_no_session() -> None:
    store = Store(rule_set(THREE_IN_30, rule("g", window={"count": 2, "within": "5d", "group_by": "g"})))
    generator = random.Random(1)
    subjects = [f"{n:064x}" for n in range(5000)]
    events = sorted(
        (
            ev(f"s/{i}", day(generator.randrange(0, 3650) / 10), {"g": i % 3}, subject=subjects[i % 5000])
            for i in range(50_000)
        ),
        key=lambda e: (e.occurred_at, e.key),
    )
    for start in range(0, len(events), 5000):
        store.deliver(events[start : start + 5000])

    # Far more subjects than durable-rules' 1024 live sessions, and none is left behind.
    assert len(store.firings) > 1000
    assert not any(store.engine.holds_session(subject) for subject in subjects)
