"""Rule sets, events and a stand-in for the storage side, for the event-time tests of the rule engine."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from domain.ruleset.model import AttributeScalar, EngineEvent, Firing, RuleSet
from domain.ruleset.parsing import parse_rule_set
from services.rules.engine import RuleEngine
from services.rules.evaluated import prior_outcome
from services.rules.windows import PriorOutcome

T0 = datetime(2025, 1, 1, tzinfo=UTC)
PERSON = "a1" * 32
OTHER = "c3" * 32


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def ev(
    key: str,
    at: datetime,
    attributes: Mapping[str, AttributeScalar] | None = None,
    *,
    event_type: str = "test.happened",
    subject: str = PERSON,
) -> EngineEvent:
    return EngineEvent(
        key=key,
        subject_key=subject,
        subject_kind="person",
        event_type=event_type,
        occurred_at=at,
        attributes=attributes or {},
    )


def rule(rule_id: str = "r", **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": rule_id,
        "title": "A rule",
        "event_types": ["test.happened"],
        "points": -1,
        "category": "civic",
        "severity": "minor",
        "legal_basis": "Illustrative",
        "reason": "It happened",
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def rule_set(*rules: dict[str, Any]) -> RuleSet:
    return parse_rule_set({"name": "test", "version": 1, "rules": list(rules)})


def keys(firings: Sequence[Firing]) -> list[tuple[str, ...]]:
    return [f.event_keys for f in firings]


class Store:
    """What the storage side does around the engine: history from the lookback on, the
    active outcomes as prior outcomes, reversals of the superseded ones, retractions."""

    def __init__(self, definition: RuleSet) -> None:
        self.engine = RuleEngine(definition)
        self.evaluated: dict[str, EngineEvent] = {}
        self.active: dict[str, Firing] = {}
        self.reversed: list[str] = []

    @property
    def firings(self) -> list[Firing]:
        return list(self.active.values())

    def deliver(self, events: Sequence[EngineEvent]) -> list[Firing]:
        fresh = [e for e in events if e.key not in self.evaluated]
        if not fresh:
            return []
        ordered = sorted(fresh, key=lambda e: (e.occurred_at, e.key))
        since: dict[str, datetime] = {}
        for e in ordered:
            since.setdefault(e.subject_key, e.occurred_at)
        firings = self._settle(ordered, since)
        self.evaluated.update((e.key, e) for e in fresh)
        return firings

    def retract(self, key: str) -> list[Firing]:
        event = self.evaluated.pop(key)
        for outcome_id in [i for i, f in self.active.items() if key in f.event_keys]:
            del self.active[outcome_id]
            self.reversed.append(outcome_id)
        return self._settle([], {event.subject_key: event.occurred_at}, since=True)

    def _settle(
        self, ordered: Sequence[EngineEvent], instants: Mapping[str, datetime], *, since: bool = False
    ) -> list[Firing]:
        lookback = self.engine.rule_set.lookback
        history: dict[str, list[EngineEvent]] = {subject: [] for subject in instants}
        prior: dict[str, list[PriorOutcome]] = {subject: [] for subject in instants}
        for e in self.evaluated.values():
            if e.subject_key in history and e.occurred_at >= instants[e.subject_key] - lookback:
                history[e.subject_key].append(e)
        for f in self.active.values():
            if f.subject_key in prior:
                prior[f.subject_key].append(prior_outcome(f))
        result = self.engine.evaluate(ordered, history, prior, since=instants if since else {})
        for gone in result.superseded:
            del self.active[gone.outcome.outcome_id]
            self.reversed.append(gone.outcome.outcome_id)
        for firing in result.firings:
            self.active[firing.outcome_id] = firing
        return result.firings


THREE_IN_30 = rule("three", window={"count": 3, "within": "30d"}, points=-5, reason="{count} times")


GROUPED = rule("grouped", window={"count": 2, "within": "10d", "group_by": "g"})
PAIRED = rule(
    "seq",
    event_types=None,
    sequence={
        "steps": [{"event_types": ["test.happened"]}, {"event_types": ["test.closed"]}],
        "within": "20d",
        "correlate_by": "g",
    },
)


# --- arrival order -------------------------------------------------------------------

MIXED = rule_set(
    THREE_IN_30,
    GROUPED,
    PAIRED,
    rule("capped", points="hours", severity="positive", cap={"points": 20, "per": "10d"}),
    rule("each", event_types=["test.closed"], points=-2),
)


def population(generator: random.Random, size: int) -> list[EngineEvent]:
    return [
        ev(
            f"s/{i}",
            day(generator.randrange(0, 1200) / 10),
            {"g": generator.choice("xy"), "hours": generator.randrange(1, 12)},
            event_type=generator.choice(["test.happened", "test.happened", "test.closed"]),
            subject=generator.choice([PERSON, OTHER]),
        )
        for i in range(size)
    ]


def ledger(firings: Sequence[Firing]) -> set[tuple[str, tuple[str, ...], int]]:
    return {(f.rule_id, f.event_keys, f.points) for f in firings}


# The seeded properties below run these seeds in the unit ring and the rest in the integration ring.
UNIT_SEEDS = range(2)


def in_order_batches_give_the_firings_of_one_evaluation(seed: int) -> None:
    """Delivering events in order, batch by batch, settles to what one evaluation of them all fires."""
    generator = random.Random(seed)
    definition = rule_set(THREE_IN_30, GROUPED, PAIRED)
    events = sorted(
        (
            ev(
                f"s/{i}",
                day(generator.randrange(0, 2000) / 10),
                {"g": generator.choice("xyz")},
                event_type=generator.choice(["test.happened", "test.happened", "test.closed"]),
                subject=generator.choice([PERSON, OTHER]),
            )
            for i in range(300)
        ),
        key=lambda e: (e.occurred_at, e.key),
    )
    at_once = {f.outcome_id for f in RuleEngine(definition).evaluate(events).firings}

    store = Store(definition)
    position = 0
    while position < len(events):
        size = generator.randrange(1, 25)
        store.deliver(events[position : position + size])
        position += size

    assert {f.outcome_id for f in store.firings} == at_once
    assert len(store.firings) == len(at_once)


def any_arrival_order_gives_the_ledger_of_one_evaluation(seed: int) -> None:
    """Shuffled arrival in random batches settles to the ledger of one evaluation in event time."""
    generator = random.Random(seed)
    print(f"seed {seed}")
    events = population(generator, 160)
    at_once = RuleEngine(MIXED).evaluate(sorted(events, key=lambda e: (e.occurred_at, e.key))).firings

    arrival = events[:]
    generator.shuffle(arrival)
    store = Store(MIXED)
    position = 0
    while position < len(arrival):
        size = generator.randrange(1, 20)
        store.deliver(arrival[position : position + size])
        position += size

    assert ledger(store.firings) == ledger(at_once)
    assert {f.outcome_id for f in store.firings} == {f.outcome_id for f in at_once}


def retractions_in_any_order_give_the_ledger_of_the_remaining_events(seed: int) -> None:
    """Retracting events at random later points settles to the ledger of the events that remain."""
    generator = random.Random(1000 + seed)
    print(f"seed {1000 + seed}")
    events = population(generator, 120)
    withdrawn = {e.key for e in generator.sample(events, 25)}
    remaining = sorted((e for e in events if e.key not in withdrawn), key=lambda e: (e.occurred_at, e.key))
    expected = RuleEngine(MIXED).evaluate(remaining).firings

    arrival = events[:]
    generator.shuffle(arrival)
    store = Store(MIXED)
    pending = set(withdrawn)
    for event in arrival:
        store.deliver([event])
        # A retraction follows its event, at some later point of the stream.
        for key in [k for k in sorted(pending) if k in store.evaluated and generator.random() < 0.3]:
            store.retract(key)
            pending.discard(key)
    for key in sorted(pending):
        store.retract(key)

    assert ledger(store.firings) == ledger(expected)
