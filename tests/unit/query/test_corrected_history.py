"""The corrected history computed incrementally gives exactly the rows of its definition
(every instant scored from scratch), on random ledgers with caps, expiry, disputes,
repairs, reversals, late recordings, ties and policy changes."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domain.entries import CORRECTION, DISPUTE, OVERTURN, REPAIR, EntryStatus, Pause, ScoredEntry
from domain.policy import ActivatedPolicy, Caps, ListCriteria, PolicyBook, load_policy
from services.query.corrected import corrected_history, corrected_history_by_definition

POLICY = load_policy(Path(__file__).parents[3] / "config" / "policy.yaml")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SEVERITIES = ("positive", "minor", "general", "serious")


def random_entry(rng: random.Random, i: int) -> ScoredEntry:
    # Whole days, so that event times, expiries and pause boundaries often coincide.
    occurred = T0 + rng.randrange(0, 900) * DAY
    severity = rng.choice(SEVERITIES)
    points = rng.choice((5, 10, 20, 40)) if severity == "positive" else -rng.choice((5, 10, 30, 80, 200))
    pauses: list[Pause] = []
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        start = occurred + rng.randrange(0, 400) * DAY
        kind = rng.choice((DISPUTE, DISPUTE, REPAIR, OVERTURN, CORRECTION))
        if kind == DISPUTE:
            end = rng.choice((None, start + rng.randrange(1, 60) * DAY))
            pauses.append(Pause(start, end, False, DISPUTE, str(i)))
        else:
            pauses.append(Pause(start, None, kind in (OVERTURN, CORRECTION), kind, str(i)))
    return ScoredEntry(
        entry_id=f"e{rng.randrange(10**6):06d}-{i}",
        points=points,
        category=rng.choice(("transport", "library", "tax")),
        severity=severity,
        status=EntryStatus.ACTIVE,
        occurred_at=occurred,
        recorded_at=occurred + rng.randrange(0, 200) * DAY,
        black_list=severity == "serious" and rng.random() < 0.3,
        pauses=tuple(sorted(pauses, key=lambda p: (p.start, p.kind, p.ref))),
    )


def random_book(rng: random.Random) -> PolicyBook:
    """The shipped policy, then a few changes of visibility, caps, tiers' base and lists."""
    activations = [ActivatedPolicy(POLICY, T0 - 10 * DAY, "test", "")]
    for n in range(rng.randrange(0, 4)):
        person = POLICY.for_kind("person")
        changed = replace(
            person,
            version=f"test-{n}",
            base=person.base + rng.choice((-150, 0, 60)),
            visibility_days={s: d + rng.choice((-30, 0, 45)) for s, d in person.visibility_days.items()},
            caps=Caps(window_days=rng.choice((30, 365)), positive_per_category=rng.choice((None, 20, 50))),
            lists=ListCriteria(
                red_tiers=frozenset({"AAA", "AA"}),
                black_tiers=frozenset({"D"}),
                black_on_flag=rng.random() < 0.5,
            ),
        )
        policy = replace(POLICY, version=f"test-{n}", kinds={**POLICY.kinds, "person": changed})
        at = T0 + rng.randrange(1, 1200) * DAY + rng.choice((timedelta(0), timedelta(hours=7)))
        activations.append(ActivatedPolicy(policy, at, "test", ""))
    activations.sort(key=lambda a: a.activated_at)
    return PolicyBook(tuple(activations))


@pytest.mark.parametrize("seed", range(60))
def test_the_incremental_corrected_history_equals_its_definition(seed: int) -> None:
    rng = random.Random(seed)
    entries = [random_entry(rng, i) for i in range(rng.choice((1, 5, 30, 120)))]
    book = random_book(rng)
    until = T0 + rng.randrange(100, 1600) * DAY
    expected = corrected_history_by_definition(entries, book, "person", until)
    assert corrected_history(entries, book, "person", until) == expected


def test_an_empty_or_wholly_void_ledger_has_no_corrected_history() -> None:
    book = PolicyBook((ActivatedPolicy(POLICY, T0, "test", ""),))
    void = replace(random_entry(random.Random(1), 0), pauses=(Pause(T0, None, True, CORRECTION, "x"),))
    assert corrected_history([], book, "person", T0 + DAY) == []
    assert corrected_history([void], book, "person", T0 + 999 * DAY) == []
