"""Rules migration 0016 over existing rows of every table it converts, SQLite and
PostgreSQL: what the code before it stored reads back identically through today's models
(subject keys and outcome ids as the same hex, instants as the same aware UTC datetimes),
SQLite then stores bytes and integers, and the downgrade gives back the previous schema and
the very bytes stored before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kit.columns import Instant
from kit.db import as_utc, create_engine
from kit.migrations import upgrade
from services.rules.bootstrap import MIGRATIONS
from services.rules.stores.outbox import outcome_request, stored_payloads
from services.rules.stores.schema import Base
from tests.support.migrating import declared_schema, downgrade, stored_rows, write_rows

VERSION_TABLE = "rules_alembic_version"
BEFORE = "0015"
NOW = datetime(2026, 12, 7, 21, 24, 24, 123456, tzinfo=UTC)
# The digest columns 0016 converts (every other text column keeps its values as they are).
DIGESTS = {"subject_key", "outcome_id", "source_sha256"}
# Parents first: PostgreSQL enforces rules_rule_sets' foreign keys.
TABLES = (
    "rules_rule_sets",
    "rules_active_rule_set",
    "rules_rule_set_changes",
    "rules_evaluated_events",
    "rules_outcomes",
    "rules_outcome_events",
    "rules_retractions",
    "rules_dead_letters",
    "rules_backtests",
    "rules_shard_layout",
    "rules_outbox",
)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    # kit's engine, as the service migrates with: on SQLite it enforces foreign keys.
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def value(column: sa.Column[Any], n: int) -> Any:
    """Row n's value of a column as the code before 0016 stored it; row 2 leaves every
    nullable column NULL."""
    if n == 2 and column.nullable and not column.primary_key:
        return None
    kind = column.type
    if column.name in DIGESTS:
        return f"{n:02x}" + "0f" * 31
    if isinstance(kind, sa.DateTime):
        return NOW + timedelta(days=n, microseconds=n)
    if isinstance(kind, sa.Boolean):
        return n == 1
    if isinstance(kind, sa.Integer):
        return n
    if isinstance(kind, sa.LargeBinary):
        return bytes([n, 0, 255])
    return f"v{n}"


def aware(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its datetimes aware (the outbox's own, kit.outbox's, read naive on SQLite)."""
    return {c: as_utc(v) if isinstance(v, datetime) else v for c, v in row.items()}


def test_rows_stored_before_read_back_unchanged_and_the_downgrade_restores_their_bytes(
    engine: sa.Engine,
) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, BEFORE)
    written = write_rows(engine, TABLES, value, (1, 2))
    bytes_before, schema_before = stored_rows(engine, TABLES, "1, 2"), declared_schema(engine, TABLES)

    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    with engine.connect() as connection:
        for name, rows in written.items():
            table = Base.metadata.tables[name]
            key = [c.name for c in table.primary_key.columns]
            read = [r._asdict() for r in connection.execute(sa.select(table).order_by(*table.primary_key))]
            expected = sorted(rows, key=lambda r: [r[k] for k in key])
            assert [aware(r) for r in read] == [aware(r) for r in expected], name
            instants = [c.name for c in table.columns if isinstance(c.type, Instant)]
            assert all(r[c].tzinfo is UTC for r in read for c in instants if r[c] is not None)
        if engine.dialect.name == "sqlite":
            stored = connection.exec_driver_sql(
                "SELECT typeof(subject_key), length(subject_key), typeof(occurred_at), typeof(retracted_at)"
                " FROM rules_evaluated_events ORDER BY event_id"
            ).all()
            assert stored == [("blob", 32, "integer", "integer"), ("blob", 32, "integer", "null")]

    downgrade(engine, MIGRATIONS, VERSION_TABLE, BEFORE)
    assert declared_schema(engine, TABLES) == schema_before
    assert stored_rows(engine, TABLES, "1, 2") == bytes_before


def test_an_outcome_queued_before_is_still_sent_from_its_stored_bytes(engine: sa.Engine) -> None:
    """The relay joins the outbox to rules_outcomes on outcome_id: both columns move together."""
    upgrade(engine, MIGRATIONS, VERSION_TABLE, BEFORE)
    written = write_rows(engine, TABLES, value, (1, 2))
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    outbox = {r["id"]: r["outcome_id"] for r in written["rules_outbox"]}
    outcomes = {r["outcome_id"]: r["outcome"] for r in written["rules_outcomes"]}
    with Session(engine) as session:
        sent = stored_payloads(session, list(outbox))
    assert sent == {i: outcome_request(outcomes[o]) for i, o in outbox.items() if o is not None}
