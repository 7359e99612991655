"""Ingest 0010 and rules 0014, on SQLite and PostgreSQL, with rows in the outbox: per-row
claims give way to one lease per slice. Rows claimed or in backoff under the old scheme
are neither lost nor doubled: a relay of the new code sends each once, in id order. On
PostgreSQL the outbox gets its autovacuum settings. A downgrade keeps every row, unclaimed
and due, and drops the leases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from kit.db import create_engine, make_session_factory
from kit.migrations import alembic_config, upgrade
from kit.outbox import OutboxLeaseMixin, OutboxMixin, outbox_rows
from kit.outbox_migrations import OUTBOX_AUTOVACUUM
from services.ingest.bootstrap import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.stores import events as ingest_schema
from services.rules.bootstrap import MIGRATIONS as RULES_MIGRATIONS
from services.rules.stores import schema as rules_schema
from tests.support.outbox import outbox_relay, relay_until_sent

NOW = datetime.now(UTC)
LATER = NOW + timedelta(hours=1)  # a live lease, or a backoff not over
CLAIM_COLUMNS = {"attempts", "claimed_by", "claim_generation"}


@dataclass(frozen=True)
class Service:
    name: str
    migrations: Path
    before: str  # the revision before per-slice leases
    table: type[OutboxMixin]
    leases: type[OutboxLeaseMixin]

    @property
    def version_table(self) -> str:
        return f"{self.name}_alembic_version"

    @property
    def outbox(self) -> str:
        return f"{self.name}_outbox"


SERVICES = [
    Service("ingest", INGEST_MIGRATIONS, "0009", ingest_schema.Outbox, ingest_schema.OutboxLease),
    Service("rules", RULES_MIGRATIONS, "0013", rules_schema.Outbox, rules_schema.OutboxLease),
]


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def downgrade(engine: sa.Engine, service: Service) -> None:
    config = alembic_config(service.migrations, service.version_table)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, service.before)


def columns(engine: sa.Engine, table: str) -> set[str]:
    return {str(c["name"]) for c in sa.inspect(engine).get_columns(table)}


def autovacuum(engine: sa.Engine, table: str) -> set[str]:
    """The table's storage parameters on PostgreSQL (none on SQLite)."""
    if engine.dialect.name != "postgresql":
        return set()
    with engine.connect() as connection:
        options = connection.scalar(
            sa.text("SELECT reloptions FROM pg_class WHERE relname = :t"), {"t": table}
        )
    return set(options or [])


def old_rows(count: int) -> list[dict[str, Any]]:
    """Rows as per-row claims left them: two claimed by a replica whose lease is live, one in
    backoff after two failed sends, the rest free."""
    rows: list[dict[str, Any]] = []
    for i in range(count):
        row: dict[str, Any] = {
            "payload": f"row-{i}".encode(),
            "traceparent": "",
            "attempts": 0,
            "available_at": NOW,
            "claimed_by": None,
            "claim_generation": None,
            "created_at": NOW - timedelta(seconds=count - i),
        }
        if i < 2:
            row |= {
                "claimed_by": "old-pod",
                "claim_generation": "g1",
                "available_at": NOW + timedelta(hours=1),
            }
        elif i == 2:
            row |= {"attempts": 2, "available_at": NOW + timedelta(hours=1)}
        rows.append(row)
    return rows


@pytest.mark.parametrize("service", SERVICES, ids=[s.name for s in SERVICES])
async def test_rows_claimed_per_row_are_sent_once_each_in_order_after_the_upgrade(
    engine: sa.Engine, service: Service
) -> None:
    upgrade(engine, service.migrations, service.version_table, service.before)
    rows = old_rows(6)
    table = sa.table(service.outbox, *(sa.column(c) for c in rows[0]))
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)

    upgrade(engine, service.migrations, service.version_table)
    assert not CLAIM_COLUMNS & columns(engine, service.outbox)
    postgres = engine.dialect.name == "postgresql"
    expected = {f"{k}={v}" for k, v in OUTBOX_AUTOVACUUM.items()} if postgres else set()
    assert autovacuum(engine, service.outbox) == expected
    delivered: list[bytes] = []

    async def send(batch: list[bytes]) -> None:
        delivered.extend(batch)

    relay = outbox_relay(
        make_session_factory(engine),
        service.table,
        service.leases,
        instance="new-pod",
        send=send,
        batch_size=4,
    )
    await relay_until_sent([relay], len(rows))
    assert delivered == [r["payload"] for r in rows]
    assert relay.pending() == 0


@pytest.mark.parametrize("service", SERVICES, ids=[s.name for s in SERVICES])
def test_a_downgrade_keeps_every_row_unclaimed_and_due(engine: sa.Engine, service: Service) -> None:
    upgrade(engine, service.migrations, service.version_table)
    payloads = [f"row-{i}".encode() for i in range(5)]
    with engine.begin() as connection:
        connection.execute(sa.insert(service.table), outbox_rows(payloads, NOW))
    relay = outbox_relay(make_session_factory(engine), service.table, service.leases, instance="pod")
    claimed = relay.claim()
    assert claimed is not None
    assert claimed.ids == [1, 2, 3]  # held by a lease when the downgrade runs

    downgrade(engine, service)
    assert f"{service.outbox}_leases" not in sa.inspect(engine).get_table_names()
    assert not autovacuum(engine, service.outbox)
    with engine.connect() as connection:
        kept = connection.execute(
            sa.text(
                f"SELECT payload, attempts, claimed_by, claim_generation, available_at FROM {service.outbox}"
                " ORDER BY id"
            )
        ).all()
    assert [bytes(r[0]) for r in kept] == payloads
    assert {(r[1], r[2], r[3]) for r in kept} == {(0, None, None)}

    upgrade(engine, service.migrations, service.version_table)  # and up again, over the same rows
    assert relay.pending() == len(payloads)
