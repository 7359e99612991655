"""Ingest migration 0012 over existing rows, SQLite and PostgreSQL: events and retractions
written at 0011 read back the same through the models after the upgrade (digests stored
as their bytes, instants as integers on SQLite), the store still finds and retracts them
with indexes and constraints kept, and the downgrade gives the stored values back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kit.audit import UNKEYED
from kit.columns import microseconds
from kit.db import create_engine, make_session_factory
from kit.migrations import upgrade
from services.ingest.bootstrap import MIGRATIONS
from services.ingest.domain import (
    FINGERPRINT_CANONICAL,
    FINGERPRINT_JSON,
    RetractionRequest,
    StoredFingerprint,
)
from services.ingest.stores.events import SqlEventStore, StoredEvent, StoredRetraction
from tests.support.migrating import declared_schema, downgrade

VERSION_TABLE = "ingest_alembic_version"
AT = datetime(2026, 12, 7, 21, 24, 24, 123456, tzinfo=UTC)
KEYS = [hashlib.sha256(name.encode()).hexdigest() for name in ("alice", "bob")]
FINGERPRINTS = [hashlib.sha256(f"event {i}".encode()).hexdigest() for i in range(2)]
OCCURRED = [AT - timedelta(days=3), datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]
RETRACTED = AT + timedelta(minutes=5)
TABLES = {"ingest_events": "sequence", "ingest_retractions": "source, event_id"}


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def store_as_at_0011(engine: sa.Engine) -> None:
    """Two events and a retraction of the first, as the code of revision 0011 wrote them."""
    text = ("source", "event_id", "event_type", "subject_key", "subject_key_id", "fingerprint")
    events = sa.table(
        "ingest_events",
        *(sa.column(name, sa.String()) for name in (*text, "fingerprint_key_id")),
        sa.column("fingerprint_version", sa.SmallInteger()),
        *(sa.column(name, sa.DateTime(timezone=True)) for name in ("occurred_at", "recorded_at")),
        sa.column("record", sa.LargeBinary()),
    )
    retractions = sa.table(
        "ingest_retractions",
        *(sa.column(name, sa.String()) for name in ("source", "event_id", "subject_key", "subject_key_id")),
        *(sa.column(name, sa.String()) for name in ("reason", "retracted_by")),
        sa.column("retracted_at", sa.DateTime(timezone=True)),
    )
    with engine.begin() as connection:
        connection.execute(
            events.insert(),
            [
                {
                    "source": "library",
                    "event_id": f"e{i}",
                    "event_type": "library.late_return",
                    "subject_key": KEYS[i],
                    "subject_key_id": "k1",
                    "fingerprint": FINGERPRINTS[i],
                    "fingerprint_key_id": "k1" if i else None,
                    "fingerprint_version": FINGERPRINT_CANONICAL if i else None,
                    "occurred_at": OCCURRED[i],
                    "recorded_at": AT,
                    "record": b"\x0a\x00",
                }
                for i in range(2)
            ],
        )
        connection.execute(
            retractions.insert().values(
                source="library",
                event_id="e0",
                subject_key=KEYS[0],
                subject_key_id="k1",
                reason="entered in error",
                retracted_by="clerk",
                retracted_at=RETRACTED,
            )
        )


def stored(engine: sa.Engine) -> dict[str, set[tuple[Any, ...]]]:
    """Every stored value of both tables, as the driver returns it."""
    with engine.connect() as connection:
        return {
            table: {tuple(row) for row in connection.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {key}")}
            for table, key in TABLES.items()
        }


def test_rows_written_before_read_back_the_same_and_the_downgrade_restores_them(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0011")
    store_as_at_0011(engine)
    before, declared = stored(engine), declared_schema(engine, tuple(TABLES))

    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    with Session(engine) as session:
        events = session.scalars(sa.select(StoredEvent).order_by(StoredEvent.sequence)).all()
        assert [(e.subject_key, e.fingerprint, e.occurred_at, e.recorded_at) for e in events] == [
            (KEYS[i], FINGERPRINTS[i], OCCURRED[i], AT) for i in range(2)
        ]
        retraction = session.scalars(sa.select(StoredRetraction)).one()
        assert (retraction.subject_key, retraction.retracted_at) == (KEYS[0], RETRACTED)
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            raw = connection.exec_driver_sql(
                "SELECT typeof(subject_key), length(subject_key), typeof(fingerprint), length(fingerprint),"
                " occurred_at, recorded_at FROM ingest_events ORDER BY sequence"
            ).all()
        assert raw == [("blob", 32, "blob", 32, microseconds(o), microseconds(AT)) for o in OCCURRED]
    kept = declared_schema(engine, tuple(TABLES))
    assert kept["ingest_retractions"][1] == [("ix_ingest_retractions_subject_key", ("subject_key",))]
    assert kept["ingest_events"][3] == [("source", "event_id")]

    store = SqlEventStore(make_session_factory(engine), audit_keys=UNKEYED)
    assert store.fingerprints([("library", "e0"), ("library", "e1")]) == {
        ("library", "e0"): StoredFingerprint(FINGERPRINTS[0], FINGERPRINT_JSON),
        ("library", "e1"): StoredFingerprint(FINGERPRINTS[1], FINGERPRINT_CANONICAL),
    }
    again = store.retract(RetractionRequest("library", "e0", "again", "clerk", AT + timedelta(hours=1)))
    assert again.already_retracted
    assert (again.retraction.subject_key, again.retraction.retracted_at) == (KEYS[0], RETRACTED)
    fresh = store.retract(RetractionRequest("library", "e1", "entered in error", "clerk", AT))
    assert not fresh.already_retracted
    assert fresh.retraction.subject_key == KEYS[1]

    downgrade(engine, MIGRATIONS, VERSION_TABLE, "0011")
    after = stored(engine)
    assert declared_schema(engine, tuple(TABLES)) == declared
    assert after["ingest_events"] == before["ingest_events"]
    assert before["ingest_retractions"] < after["ingest_retractions"]
