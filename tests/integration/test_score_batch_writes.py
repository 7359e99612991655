"""A batch writes each new ledger entry once, inserted with its grant: no statement of the
batch updates a row it inserted (issue 18). A first score reads from the database only
what was stored under the subject's key before the batch, which for a new subject is
nothing, and a subject whose entries were stored without a score row is scored from them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.score_store import StoredCategory, StoredEntry, StoredScore
from domain.entries import RuleRef
from domain.intake import IncomingOutcome
from domain.policy import ActivatedPolicy, PolicyBook, policy_from_text
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.migrations import upgrade
from services.score.bootstrap import MIGRATIONS
from services.score.ledger import Ledger
from services.score.stores.ledger import SqlLedgerStore, entry_row
from services.score.stores.policies import SqlPolicyStore
from tests.support.due_process import Clock
from tests.support.outcomes import oid

ROOT = Path(__file__).parents[2]
T0 = datetime(2024, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)
# The shipped policy: a person's positives are capped at +50 per category in 365 days.
POLICY_TEXT = (ROOT / "config" / "policy.yaml").read_text()
BOOK = PolicyBook(
    (ActivatedPolicy(policy_from_text(POLICY_TEXT, source="test"), T0 - 400 * DAY, "test", POLICY_TEXT),)
)


@dataclass
class World:
    ledger: Ledger
    store: SqlLedgerStore
    engine: Engine
    clock: Clock


@pytest.fixture
def w(database_url: str) -> Iterator[World]:
    engine = create_engine(database_url)
    upgrade(engine, MIGRATIONS, "score_alembic_version")
    sessions = make_session_factory(engine)
    store = SqlLedgerStore(sessions, audit_keys=audit.UNKEYED, key_id="k1")
    clock = Clock(T0)
    ledger = Ledger(
        policies=BOOK,
        store=store,
        policy_store=SqlPolicyStore(sessions, audit_keys=audit.UNKEYED),
        clock=clock,
    )
    yield World(ledger, store, engine, clock)
    engine.dispose()


S1, S2, S3 = "a1" * 32, "b2" * 32, "c3" * 32


def outcome(outcome_id: str, subject: str, occurred_at: datetime, points: int) -> IncomingOutcome:
    return IncomingOutcome(
        outcome_id=outcome_id,
        subject_key=subject,
        subject_kind="person",
        rule=RuleRef("r1", "test", 1),
        points=points,
        category="library",
        severity="positive" if points > 0 else "general",
        occurred_at=occurred_at,
        reason="",
        black_list=False,
        snapshot=b"",
    )


def grants(engine: Engine) -> dict[str, int | None]:
    with engine.connect() as c:
        return {
            r.entry_id: r.granted for r in c.execute(sa.select(StoredEntry.entry_id, StoredEntry.granted))
        }


@contextmanager
def listening(engine: Engine, listener: Callable[..., None]) -> Iterator[None]:
    """`listener` sees every statement the engine runs, before it runs, in this block."""
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)


def _as_text(value: Any) -> str | None:
    """A bound string, or bytes (psycopg wraps them in Binary) as their hex."""
    value = getattr(value, "obj", value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return value if isinstance(value, str) else None


class Statements:
    """The string parameters of every statement starting with `prefix` (e.g. "UPDATE
    score_ledger") that the engine runs while listening; bytes (a key, an id) as their hex."""

    def __init__(self, engine: Engine, prefix: str = "UPDATE score_ledger") -> None:
        self.values: set[str] = set()
        self._engine = engine
        self._prefix = prefix.upper()

    def __enter__(self) -> Statements:
        sa.event.listen(self._engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool) -> None:
        if not statement.lstrip().upper().startswith(self._prefix):
            return
        for params in parameters if many else [parameters]:
            values = params.values() if isinstance(params, dict) else params
            self.values |= {t for t in map(_as_text, values) if t is not None}


def test_a_batch_inserts_each_new_entry_with_its_grant_and_never_updates_it(w: World) -> None:
    # Four positives of 20 in one window: grants 20, 20, 10, 0.
    old = [outcome(oid(f"old-{i}"), S1, T0 - (10 - i) * DAY, 20) for i in range(4)]
    w.ledger.apply(old)
    assert [grants(w.engine)[oid(f"old-{i}")] for i in range(4)] == [20, 20, 10, 0]
    w.clock.now += DAY
    batch = [
        # Earlier than the old positives: it takes 20 of the allowance first, so two old
        # grants change (20 -> 10, 10 -> 0) and are updated.
        outcome(oid("late"), S1, T0 - 30 * DAY, 20),
        outcome(oid("later"), S1, T0, 20),
        outcome(oid("minus"), S1, T0, -10),
        # A first score: grants 30 and 20.
        outcome(oid("new-a"), S2, T0 - 2 * DAY, 30),
        outcome(oid("new-b"), S2, T0 - DAY, 30),
    ]
    with Statements(w.engine) as seen:
        assert w.ledger.apply(batch).applied == 5
    assert seen.values & {o.outcome_id for o in batch} == set()
    # The listener sees updates: those of the old entries whose grant changed.
    assert seen.values & {o.outcome_id for o in old} == {oid("old-1"), oid("old-2")}
    stored = grants(w.engine)
    assert [stored[oid(f"old-{i}")] for i in range(4)] == [20, 10, 0, 0]
    assert (stored[oid("late")], stored[oid("later")], stored[oid("minus")]) == (20, 0, None)
    assert (stored[oid("new-a")], stored[oid("new-b")]) == (30, 20)
    assert w.ledger.verify(max_mismatches=5).mismatch_count == 0


def test_a_first_score_reads_no_ledger_row(w: World) -> None:
    batch = [outcome(oid(f"o-{s[:2]}-{i}"), s, T0 - i * DAY, 20) for s in (S1, S2) for i in range(3)]
    batch.append(outcome(oid("o-minus"), S2, T0, -40))
    assert w.ledger.apply(batch).applied == 7
    assert w.store.entries_read == 0
    with w.engine.connect() as c:
        scores = {
            r.subject_key: r.score for r in c.execute(sa.select(StoredScore.subject_key, StoredScore.score))
        }
    assert scores == {S1: 1050, S2: 1010}
    assert w.ledger.verify(max_mismatches=5).mismatch_count == 0


def test_a_first_score_inserts_its_row_whole_and_an_existing_row_is_only_updated(w: World) -> None:
    w.ledger.apply([outcome(oid("o-old"), S1, T0 - DAY, 20)])
    w.clock.now += DAY
    batch = [
        outcome(oid("o-1"), S1, T0, -5),
        outcome(oid("o-2"), S2, T0, 30),
        outcome(oid("o-3"), S3, T0, -20),
    ]
    with (
        Statements(w.engine, "UPDATE score_subjects") as updated,
        Statements(w.engine, "INSERT INTO score_subjects") as inserted,
    ):
        assert w.ledger.apply(batch).applied == 3
    subjects = {S1, S2, S3}
    assert updated.values & subjects == {S1}
    assert inserted.values & subjects == {S2, S3}
    with w.engine.connect() as c:
        scores = {
            r.subject_key: (r.score, r.subject_kind, r.subject_key_id)
            for r in c.execute(
                sa.select(
                    StoredScore.subject_key,
                    StoredScore.score,
                    StoredScore.subject_kind,
                    StoredScore.subject_key_id,
                )
            )
        }
    assert scores == {
        S1: (1015, "person", "k1"),
        S2: (1030, "person", "k1"),
        S3: (980, "person", "k1"),
    }
    assert w.ledger.verify(max_mismatches=5).mismatch_count == 0


def test_entries_stored_without_a_score_row_are_read_for_a_first_score(w: World) -> None:
    # A re-keying moves each table's keys in its own transaction (kit.rekey), so a subject
    # can have entries under its key and no score row: a first score must read them.
    w.ledger.apply([outcome(oid(f"o-{i}"), S1, T0 - i * DAY, 20) for i in range(2)])
    with w.engine.begin() as c:
        c.execute(sa.delete(StoredScore))
        c.execute(sa.delete(StoredCategory))
    read = w.store.entries_read
    w.clock.now += DAY
    assert w.ledger.apply([outcome(oid("o-new"), S1, T0, -5)]).applied == 1
    assert w.store.entries_read - read == 2
    with w.engine.connect() as c:
        assert c.scalar(sa.select(StoredScore.score)) == 1035
    assert w.ledger.verify(max_mismatches=5).mismatch_count == 0


def test_an_entry_another_writer_stores_during_the_batch_counts_once(w: World, database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: no other can store an entry during a batch")
    entry = outcome(oid("o-1"), S1, T0, 20)
    fired: list[str] = []

    def other_writer(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # While the batch holds its subject's lock, before it inserts its entries.
        if "FOR UPDATE" in statement and not fired:
            fired.append(statement)
            row = entry_row(w.ledger._entry(entry, w.clock.now), "k1")
            with w.engine.begin() as c:
                c.execute(sa.insert(StoredEntry), [row])

    with listening(w.engine, other_writer):
        result = w.ledger.apply([entry])
    assert fired
    assert (result.applied, result.duplicate) == (0, 1)
    with w.engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(StoredEntry)) == 1


def test_a_unit_of_work_that_takes_entries_and_saves_no_rescore_stores_nothing(w: World) -> None:
    entry = w.ledger._entry(outcome(oid("o-1"), S1, T0, 20), T0)
    with pytest.raises(RuntimeError, match="saved no rescore"), w.store.unit_of_work() as uow:
        assert uow.add_entries([entry]) == [entry]
    with w.engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(StoredEntry)) == 0
        assert c.scalar(sa.select(sa.func.count()).select_from(StoredScore)) == 0


def test_a_first_score_another_writer_stores_during_the_batch_is_tried_again_and_counts_both(
    w: World, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: no other can store a first score during a batch")
    fired: list[str] = []

    def other_writer(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # After the batch found no row to lock for s-1, before it inserts: another replica's
        # batch stores s-1's first score from another entry and commits.
        if statement.lstrip().upper().startswith("INSERT INTO SCORE_LEDGER") and not fired:
            fired.append(statement)
            w.ledger.apply([outcome(oid("o-other"), S1, T0 - DAY, 20)])

    with listening(w.engine, other_writer):
        result = w.ledger.apply([outcome(oid("o-mine"), S1, T0, 30)])
    assert fired
    assert (result.applied, result.duplicate) == (1, 0)
    with w.engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(StoredEntry)) == 2
        assert c.scalar(sa.select(StoredScore.score)) == 1050
    assert w.ledger.verify(max_mismatches=5).mismatch_count == 0
