"""The live part of a ledger (services/score/live.py) replays exactly as the whole ledger
does, whenever `live_part` accepts it; it refuses a late positive, a missing grant, an
entry recorded after the stored instant and a live positive too old for the range."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from domain.entries import DISPUTE, REPAIR, EntryStatus, Pause, ScoredEntry, known_at
from domain.history import replay
from domain.policy import Caps
from domain.scoring import granted_points
from services.score.live import cutoff, grants_to_store, live_part, reach
from tests.unit.score.test_domain import PERSON

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
# Short periods, so that random ledgers hold dead entries, pins and live ones.
CAPPED = replace(
    PERSON,
    visibility_days={"positive": 60, "minor": 10, "general": 30, "serious": 90},
    caps=Caps(window_days=30, positive_per_category=12),
)
CATEGORIES = ("transport", "library", "tax")


def entry(i: int, rng: random.Random, occurred: datetime, recorded: datetime) -> ScoredEntry:
    severity = rng.choice(("positive", "positive", "minor", "general", "serious"))
    pauses: tuple[Pause, ...] = ()
    if rng.random() < 0.08:
        start = recorded + timedelta(days=rng.uniform(0, 40))
        end = None if rng.random() < 0.3 else start + timedelta(days=rng.uniform(1, 30))
        pauses = (Pause(start, end, False, DISPUTE, str(i)),)
    elif rng.random() < 0.03:
        pauses = (Pause(recorded + timedelta(days=rng.uniform(0, 40)), None, False, REPAIR, str(i)),)
    return ScoredEntry(
        entry_id=f"e{i:04d}",
        points=rng.choice((3, 5, 8, 13)) if severity == "positive" else -rng.choice((5, 10, 40)),
        category=rng.choice(CATEGORIES),
        severity=severity,
        status=EntryStatus.ACTIVE,
        occurred_at=occurred,
        recorded_at=recorded,
        black_list=rng.random() < 0.05,
        pauses=pauses,
    )


def test_replay_of_the_live_part_equals_replay_of_the_whole_ledger() -> None:
    accepted = 0
    for seed in range(300):
        rng = random.Random(seed)
        since = T0 + timedelta(days=rng.uniform(100, 600))
        history = []
        for i in range(rng.randrange(5, 80)):
            recorded = T0 + (since - T0) * rng.random()
            history.append(entry(i, rng, recorded - timedelta(days=rng.choice((0, 0, 0, 3, 40))), recorded))
        now = since + timedelta(days=rng.choice((0, 0.5, 2, 20, 90)))
        added = []
        for i in range(100, 100 + rng.randrange(1, 4)):
            late = rng.choice((0, 0, 0, 1, 10))
            added.append(entry(i, rng, now - timedelta(days=late), now))
        whole = [*history, *added]
        # What the rescore at `since` stored: every grant then.
        allowed = granted_points([e for e in history if known_at(e, since)], CAPPED)
        stored = {e.entry_id: allowed.get(e.entry_id, 0) for e in history}
        before = replay(history, CAPPED, before=None, since=None, until=since)[1].state
        floor = cutoff(CAPPED, stored_version=CAPPED.version, since=since, recorded_through=since, now=now)
        assert floor is not None
        read = [(e, stored[e.entry_id]) for e in history if e.occurred_at >= floor or e.pauses]
        ids = [e.entry_id for e in added]
        found = live_part([*read, *((e, None) for e in added)], CAPPED, since=since, floor=floor, added=ids)
        if found is None:
            continue
        accepted += 1
        part, live = found
        expected = replay(whole, CAPPED, before=before, since=since, until=now, added=ids)
        assert replay(part, CAPPED, before=before, since=since, until=now, added=ids) == expected, seed
        # What the batch writes keeps every live entry's stored grant true at `now`.
        counted = {c.entry_id: c.points for c in expected[1].counted}
        written, _ = grants_to_store(
            part, CAPPED, now, added=ids, stored=live, recorded_through=since, counted=counted
        )
        everything = dict.fromkeys((e.entry_id for e in whole), None)
        truth, _ = grants_to_store(
            whole, CAPPED, now, added=None, stored=everything, recorded_through=None, counted={}
        )
        assert {k: written.get(k, live[k]) for k in live if k in truth} == {
            k: truth[k] for k in live if k in truth
        }
    assert accepted > 150


def test_the_live_part_is_refused_where_the_proof_does_not_hold() -> None:
    rng = random.Random(3)
    since = T0 + 200 * DAY
    old = replace(entry(1, rng, since - 5 * DAY, since - 5 * DAY), points=8, severity="positive")
    floor = since - reach(CAPPED)

    def part(*read: tuple[ScoredEntry, int | None], added: tuple[str, ...] = ("n",)) -> object:
        return live_part(read, CAPPED, since=since, floor=floor, added=added)

    new = replace(old, entry_id="n", occurred_at=since, recorded_at=since + DAY)
    assert part((old, 8), (new, None)) is not None
    # Before a live positive of its category: the live one is scored again, its grant rewritten.
    assert part((old, 8), (replace(new, occurred_at=since - 6 * DAY), None)) is not None
    # Before a dead positive of its category, whose stored grant would no longer hold.
    gone = replace(old, entry_id="g", occurred_at=since - 65 * DAY, recorded_at=since - 65 * DAY)
    assert part((gone, 8), (replace(new, occurred_at=since - 66 * DAY), None)) is None
    # An entry recorded after the stored instant, not by this batch.
    assert part((replace(old, recorded_at=since + DAY), 8), (new, None)) is None
    # A dead positive in the window of a live one, with no stored grant.
    dead = replace(old, entry_id="d", occurred_at=since - 70 * DAY, recorded_at=since - 70 * DAY)
    alive = replace(old, occurred_at=since - 50 * DAY, recorded_at=since - 50 * DAY)
    assert part((dead, None), (alive, 8), (new, None)) is None
    assert part((dead, 3), (alive, 8), (new, None)) is not None
    # A live positive whose window reaches before the range.
    assert part((replace(new, occurred_at=floor + DAY), None)) is None
    # The stored row: of another policy, older than its ledger, or later than now.
    args = {"since": since, "recorded_through": since, "now": since}
    assert cutoff(CAPPED, stored_version="other", **args) is None
    assert cutoff(CAPPED, stored_version=CAPPED.version, **(args | {"recorded_through": since + DAY})) is None
    assert cutoff(CAPPED, stored_version=CAPPED.version, **(args | {"now": since - DAY})) is None
