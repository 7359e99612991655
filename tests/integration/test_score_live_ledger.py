"""A batch reads only the live part of each subject's ledger (services/score/live.py), and
ends exactly where reading the whole ledger ends: the same score rows, categories, history
and stored grants, with verify (a recompute from the whole ledger) finding no mismatch.
Random batches (in order, late, capped categories, expiries, disputes, retractions,
sweeps) run through two stores side by side, one reading live parts, one whole ledgers."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.score_store import StoredCategory, StoredEntry, StoredHistory, StoredScore
from domain.entries import RuleRef
from domain.intake import IncomingOutcome, IncomingReversal
from domain.policy import ActivatedPolicy, PolicyBook, policy_from_text
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.errors import FailedPrecondition
from kit.migrations import upgrade
from kit.pseudonym import Pseudonymiser
from kit.purposes import load_purposes
from services.score.bootstrap import MIGRATIONS
from services.score.due_process import OVERTURN, UPHOLD, DueProcess
from services.score.ledger import Ledger
from services.score.stores.due_process import SqlDueProcessStore
from services.score.stores.ledger import SqlLedgerStore
from services.score.stores.policies import SqlPolicyStore
from tests.support.due_process import Clock
from tests.support.outcomes import oid

ROOT = Path(__file__).parents[2]
T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
# The shipped policy with short periods, so that a few dozen batches cover many windows
# of the cap and many expiries.
POLICY_TEXT = (
    (ROOT / "config" / "policy.yaml")
    .read_text()
    .replace(
        "visibility_days: {positive: 730, minor: 90, general: 365, serious: 1095}",
        "visibility_days: {positive: 60, minor: 10, general: 30, serious: 90}",
    )
    .replace(
        "caps: {window_days: 365, positive_per_category: 50}",
        "caps: {window_days: 30, positive_per_category: 20}",
    )
    .replace(
        "caps: {window_days: 365, positive_per_category: 30}",
        "caps: {window_days: 30, positive_per_category: 12}",
    )
)
BOOK = PolicyBook(
    (ActivatedPolicy(policy_from_text(POLICY_TEXT, source="test"), T0 - DAY, "test", POLICY_TEXT),)
)
CATEGORIES = ("transport", "library", "tax")
SEVERITIES = ("positive", "positive", "positive", "minor", "general", "serious")


@dataclass
class World:
    ledger: Ledger
    due: DueProcess
    store: SqlLedgerStore
    engine: Engine


def world(url: str, clock: Callable[[], datetime], *, whole: bool) -> World:
    engine = create_engine(url)
    upgrade(engine, MIGRATIONS, "score_alembic_version")
    sessions = make_session_factory(engine)
    keys = audit.UNKEYED
    store = SqlLedgerStore(sessions, audit_keys=keys, key_id="k1", whole_ledger=whole)
    ledger = Ledger(
        policies=BOOK, store=store, policy_store=SqlPolicyStore(sessions, audit_keys=keys), clock=clock
    )
    due = DueProcess(
        ledger=ledger,
        store=SqlDueProcessStore(sessions, audit_keys=keys, key_id="k1"),
        clock=clock,
        pseudonymiser=Pseudonymiser(b"k" * 32, "k1"),
        purposes=load_purposes(ROOT / "config" / "purposes.yaml"),
    )
    return World(ledger, due, store, engine)


def outcome(
    outcome_id: str, subject: str, now: datetime, rng: random.Random, late_days: float
) -> IncomingOutcome:
    severity = rng.choice(SEVERITIES)
    return IncomingOutcome(
        outcome_id=outcome_id,
        subject_key=subject,
        subject_kind="organization" if subject.endswith("7") else "person",
        rule=RuleRef("r1", "test", 1),
        points=rng.choice((3, 5, 8, 13)) if severity == "positive" else -rng.choice((5, 10, 40)),
        category=rng.choice(CATEGORIES),
        severity=severity,
        occurred_at=now - timedelta(days=rng.uniform(0, late_days)),
        reason="",
        black_list=rng.random() < 0.02,
        snapshot=b"",
    )


def stored(engine: Engine) -> dict[str, list[Any]]:
    """Every score row (but recorded_through), category, history row and stored grant."""
    with engine.connect() as c:
        return {
            "scores": [
                tuple(r)[:-1] for r in c.execute(sa.select(StoredScore).order_by(StoredScore.subject_key))
            ],
            "categories": list(
                c.execute(
                    sa.select(StoredCategory).order_by(StoredCategory.subject_key, StoredCategory.category)
                )
            ),
            # Not history_id, nor recorded_at (the wall clock for sweeps and due-process acts).
            "history": [
                tuple(v for k, v in r._mapping.items() if k not in ("history_id", "recorded_at"))
                for r in c.execute(sa.select(StoredHistory.__table__).order_by(StoredHistory.history_id))
            ],
            "grants": list(
                c.execute(sa.select(StoredEntry.entry_id, StoredEntry.granted).order_by(StoredEntry.entry_id))
            ),
        }


def _dispute(w: World, entry_id: str) -> str | None:
    try:
        return str(w.due.file_dispute(None, entry_id, "not me").dispute_id)
    except FailedPrecondition:  # already disputed, reversed or repaired
        return None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_end_as_reading_whole_ledgers_does(
    database_url: str, database_url_factory: Callable[[str], str], seed: int
) -> None:
    rng = random.Random(seed)
    clock = Clock(T0)
    live = world(database_url, clock, whole=False)
    whole = world(database_url_factory("whole"), clock, whole=True)
    subjects = [f"{i:02d}" * 32 for i in range(12)]
    ids: list[str] = []
    disputes: list[str] = []
    for batch in range(70):
        clock.now += timedelta(days=rng.choice((0.5, 1, 2, 3, 5, 8)))
        # Mostly in event-time order; some late by up to a cap window, a few by months.
        late_days = rng.choice((0.2, 0.2, 0.2, 0.2, 5, 30, 120))
        outcomes = []
        for subject in rng.sample(subjects, rng.randrange(1, 7)):
            for _ in range(rng.randrange(1, 4)):
                ids.append(oid(f"o-{batch}-{len(ids)}"))
                outcomes.append(outcome(ids[-1], subject, clock.now, rng, late_days))
        reversals = []
        if rng.random() < 0.15:
            target = rng.choice(ids)
            reversals.append(IncomingReversal(target, "", "dept", f"ev-{target}", "wrong", clock.now, "dept"))
        for w in (live, whole):
            w.ledger.apply(outcomes, reversals)
        if rng.random() < 0.2:
            target = rng.choice(ids)
            filed = [_dispute(w, target) for w in (live, whole)]
            assert filed[0] == filed[1]
            if filed[0] is not None:
                disputes.append(filed[0])
        if disputes and rng.random() < 0.1:
            dispute = disputes.pop(rng.randrange(len(disputes)))
            decision = rng.choice((UPHOLD, OVERTURN))
            for w in (live, whole):
                w.due.resolve_dispute(None, dispute, decision, "decided")
        if rng.random() < 0.2:
            for w in (live, whole):
                w.ledger.sweep()
        assert stored(live.engine) == stored(whole.engine), f"batch {batch}"
    for w in (live, whole):
        verified = w.ledger.verify(max_mismatches=5)
        assert verified.mismatch_count == 0, verified.mismatches
    assert stored(live.engine) == stored(whole.engine)
    # Most batches read live parts (the others: first scores, late positives, ...).
    assert live.store.live_parts > 100
    assert whole.store.live_parts == 0


def test_rows_read_per_outcome_do_not_grow_with_history(database_url: str) -> None:
    clock = Clock(T0)
    w = world(database_url, clock, whole=False)
    rng = random.Random(7)
    subjects = [f"{i:02d}" * 32 for i in range(20)]
    per_batch = []
    for batch in range(80):
        clock.now += 3 * DAY
        outcomes = [outcome(oid(f"o-{batch}-{n}"), s, clock.now, rng, 0.5) for n, s in enumerate(subjects)]
        before = w.store.entries_read
        applied = w.ledger.apply(outcomes).applied
        per_batch.append((w.store.entries_read - before) / applied)
    # Reach: 90 days of visibility and a 30-day window, about 40 batches of 3 days.
    assert max(per_batch[-20:]) <= max(per_batch[40:60]) <= 45
    assert w.ledger.verify(max_mismatches=5).mismatch_count == 0
    with w.engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(StoredEntry)) == 80 * len(subjects)
