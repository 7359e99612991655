"""Score migration 0011 over existing rows, SQLite and PostgreSQL: keys, entry ids and
instants written at 0010 read back the same through the contract's models (Hex, Instant)
after the upgrade (the contract's schema: test_score_store_contract.py), and the downgrade
gives 0010's schema and stored values back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from contracts.score_store import Base, consent_at, load_entry_facts
from kit.db import as_utc
from kit.migrations import upgrade
from services.score.bootstrap import MIGRATIONS
from tests.support.migrating import declared_schema, downgrade, stored_rows, write_rows

VERSION_TABLE = "score_alembic_version"
AT = datetime(2026, 12, 7, 21, 24, 24, 123456, tzinfo=UTC)
KEYS = ("0f" * 32, "ab" * 32)  # in order, as the rows are read
IDS = ("00ff" * 8, "1234abcd" * 4)
# Columns 0011 stores as bytes; every DATETIME column becomes an Instant.
HEX = {"subject_key", "entry_id", "outcome_id"}
TABLES = (
    "score_ledger",
    "score_subjects",
    "score_history",
    "score_categories",
    "score_disputes",
    "score_repairs",
    "score_reversals",
    "score_consents",
    "score_policies",
)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


def value(column: sa.Column[Any], n: int) -> Any:
    """Row `n`'s value of a 0010 column: the second row leaves every nullable column NULL."""
    if n == 1 and column.nullable:
        return None
    if column.name in HEX:
        return (IDS if column.name != "subject_key" else KEYS)[n]
    if column.name == "status":
        return "active"
    kind = column.type.python_type
    if kind is datetime:
        return AT + timedelta(days=n, microseconds=n)
    if kind is bool:
        return n == 0
    if kind is int:
        return n + 1
    if kind is bytes:
        return bytes([n, 255, 0])
    return f"{column.name}-{n}"


def test_rows_written_at_0010_read_the_same_after_0011_and_come_back_on_downgrade(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0010")
    schema_before = declared_schema(engine, TABLES)
    written = write_rows(engine, TABLES, value, (0, 1))
    raw_before = stored_rows(engine, TABLES)

    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0011")
    with engine.connect() as connection:
        for name in TABLES:
            table = Base.metadata.tables[name]
            first = next(iter(table.primary_key.columns))
            rows = [dict(r._mapping) for r in connection.execute(sa.select(table).order_by(first))]
            expected = [
                {k: as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}
                for row in written[name]
            ]
            assert rows == expected, name
            assert all(v.tzinfo is UTC for row in rows for v in row.values() if isinstance(v, datetime))
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            raw = connection.exec_driver_sql(
                "SELECT typeof(entry_id), length(entry_id), typeof(subject_key), length(subject_key), "
                "typeof(occurred_at) FROM score_ledger"
            ).all()
        assert set(raw) == {("blob", 16, "blob", 32, "integer")}
    with Session(engine) as session:
        facts = load_entry_facts(session, IDS[0])
        assert facts is not None
        assert facts.entry.subject_key == KEYS[0]
        assert facts.entry.occurred_at == AT
        assert facts.disputes[0].filed_at == AT
        assert facts.reversals[0].reversed_at == AT
        consent = consent_at(session, KEYS[1], AT + timedelta(days=2))
        assert consent is not None
        assert consent.effective_at == AT + timedelta(days=1, microseconds=1)

    downgrade(engine, MIGRATIONS, VERSION_TABLE, "0010")
    assert declared_schema(engine, TABLES) == schema_before
    assert stored_rows(engine, TABLES) == raw_before
