"""Score migration 0009 over existing entries, SQLite and PostgreSQL: the rule's texts and
the reason, stored before as columns beside the outcome snapshot, read the same from the
snapshot after it; an entry whose copy differs from its snapshot stops the upgrade before
anything is dropped; the downgrade writes the columns back from the snapshots."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from contracts.score_store import load_entry_facts
from egret.common.v1 import outcome_pb2
from kit.columns import Hex, Instant
from kit.migrations import upgrade
from kit.packing import MARK, Packed
from services.score.bootstrap import MIGRATIONS
from tests.support import migrating

VERSION_TABLE = "score_alembic_version"
NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
TEXTS = ("rule_title", "rule_description", "legal_basis", "reason")


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


def snapshot(entry_id: str, title: str, reason: str) -> bytes:
    return outcome_pb2.Outcome(
        outcome_id=entry_id,
        rule=outcome_pb2.RuleRef(
            rule_id="metro.fare_evasion",
            rule_set="egret-sample",
            rule_set_version=2,
            title=title,
            description=f"{title}, at station S-{entry_id}.",
            legal_basis="Metro passenger rules, art. 12 (illustrative)",
        ),
        points=-10,
        reason=reason,
    ).SerializeToString()


def store_as_before_0009(
    engine: sa.Engine, entry_id: str, texts: tuple[str, str, str, str], outcome: bytes
) -> None:
    """A ledger row as the code before 0009 wrote it: the texts beside the snapshot."""
    ledger = sa.table(
        "score_ledger",
        *(sa.column(c) for c in ("entry_id", "subject_key", "subject_key_id", "subject_kind", "rule_id")),
        *(sa.column(c) for c in ("rule_set", "rule_set_version", "points", "category", "severity", "status")),
        *(sa.column(c, sa.DateTime(timezone=True)) for c in ("occurred_at", "recorded_at", "visible_until")),
        *(sa.column(c) for c in TEXTS),
        sa.column("black_list", sa.Boolean()),
        sa.column("outcome", sa.LargeBinary()),
    )
    with engine.begin() as connection:
        connection.execute(
            ledger.insert(),
            {**ledger_row(entry_id, outcome), **dict(zip(TEXTS, texts, strict=True))},
        )


def texts_of(outcome: bytes) -> tuple[str, str, str, str]:
    o = outcome_pb2.Outcome.FromString(outcome)
    return o.rule.title, o.rule.description, o.rule.legal_basis, o.reason


def ledger_row(entry_id: str, outcome: bytes) -> dict[str, Any]:
    """A score_ledger row as score wrote it at 0008 to 0010, its texts aside."""
    return {
        "entry_id": entry_id,
        "subject_key": "a" * 64,
        "subject_key_id": "k1",
        "subject_kind": "person",
        "rule_id": "metro.fare_evasion",
        "rule_set": "egret-sample",
        "rule_set_version": 2,
        "points": -10,
        "category": "transport",
        "severity": "general",
        "status": "active",
        "occurred_at": NOW,
        "recorded_at": NOW,
        "visible_until": NOW + timedelta(days=365),
        "black_list": False,
        "outcome": outcome,
    }


def downgrade(engine: sa.Engine, revision: str) -> None:
    migrating.downgrade(engine, MIGRATIONS, VERSION_TABLE, revision)


def columns(engine: sa.Engine) -> set[str]:
    return {str(c["name"]) for c in sa.inspect(engine).get_columns("score_ledger")}


def test_entries_stored_before_read_the_same_texts_from_their_snapshot(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0008")
    stored = {}
    for i, (title, reason) in enumerate(
        [("Fare evasion", "Passed gate G3 without a fare"), ("乘车逃票", "")]
    ):
        entry_id = f"e{i}"
        stored[entry_id] = snapshot(entry_id, title, reason)
        store_as_before_0009(engine, entry_id, texts_of(stored[entry_id]), stored[entry_id])

    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    assert not set(TEXTS) & columns(engine)
    with Session(engine) as session:
        for entry_id, outcome in stored.items():
            facts = load_entry_facts(session, entry_id)
            assert facts is not None
            entry = facts.entry
            rule = entry.rule
            assert (rule.title, rule.description, rule.legal_basis, entry.reason) == texts_of(outcome)
            assert entry.snapshot == outcome

    downgrade(engine, "0008")
    with engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT entry_id, {', '.join(TEXTS)} FROM score_ledger")).all()
    assert {r[0]: tuple(r[1:]) for r in rows} == {i: texts_of(o) for i, o in stored.items()}


def test_an_entry_whose_texts_differ_from_its_snapshot_stops_the_upgrade(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0008")
    same = snapshot("same", "Fare evasion", "r")
    store_as_before_0009(engine, "same", texts_of(same), same)
    other = snapshot("other", "Fare evasion", "r")
    store_as_before_0009(engine, "other", ("Edited title", *texts_of(other)[1:]), other)

    with pytest.raises(RuntimeError, match=r"1 entries whose rule texts or reason differ.*other"):
        upgrade(engine, MIGRATIONS, VERSION_TABLE)
    assert set(TEXTS) <= columns(engine)
    with engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT rule_title FROM score_ledger WHERE entry_id = 'other'")) == (
            "Edited title"
        )


def test_entries_stored_packed_are_unpacked_before_the_texts_are_written_back(engine: sa.Engine) -> None:
    """An entry the current code stored (its snapshot packed, kit.packing) goes down through
    score 0011, 0010, which unpacks it, and 0009, which reads its texts from the snapshot."""
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    outcome = snapshot("e0", "Fare evasion", "Passed gate G3 without a fare")
    # As the current code writes it: keys and ids as bytes, instants as Instant (score 0011).
    ledger = sa.table(
        "score_ledger",
        *(sa.column(c, Hex()) for c in ("entry_id", "subject_key")),
        *(sa.column(c) for c in ("subject_key_id", "subject_kind", "rule_id")),
        *(sa.column(c) for c in ("rule_set", "rule_set_version", "points", "category", "severity", "status")),
        *(sa.column(c, Instant()) for c in ("occurred_at", "recorded_at", "visible_until")),
        sa.column("black_list", sa.Boolean()),
        sa.column("outcome", Packed()),
    )
    with engine.begin() as connection:
        connection.execute(
            ledger.insert(),
            ledger_row("e0", outcome),
        )
    with engine.connect() as connection:
        raw = connection.scalar(sa.text("SELECT outcome FROM score_ledger"))
    assert bytes(raw).startswith(MARK)

    downgrade(engine, "0008")
    with engine.connect() as connection:
        row = connection.execute(sa.text(f"SELECT outcome, {', '.join(TEXTS)} FROM score_ledger")).one()
    assert bytes(row[0]) == outcome
    assert tuple(row[1:]) == texts_of(outcome)
