"""Ingest's store on SQLite and PostgreSQL: an event stored before canonical fingerprints
is still a duplicate when resent after the upgrade, and two writers submitting the same
event at once store it once (one accepted, one duplicate)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from egret.common.v1 import event_pb2, subject_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from kit.audit import UNKEYED
from kit.columns import microseconds
from kit.db import as_utc, create_engine, make_session_factory
from kit.migrations import upgrade
from kit.protoconv import to_attribute_value, to_timestamp
from kit.pseudonym import Pseudonymiser
from services.ingest.bootstrap import MIGRATIONS
from services.ingest.domain import EventStatus, NewEvent, StoredFingerprint, json_fingerprint
from services.ingest.stores.events import Outbox, SqlEventStore, StoredEvent
from tests.support.intake import NOW, MemoryStore, late, make_intake

VERSION_TABLE = "ingest_alembic_version"
CHAIN = Pseudonymiser(b"k" * 32, "k1")


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def statuses(results: Sequence[object]) -> list[EventStatus]:
    return [r.status for r in results]  # type: ignore[attr-defined]


def store_as_before_the_upgrade(engine: sa.Engine, event_id: str, days: int) -> None:
    """The row the code before canonical fingerprints wrote (schema revision 0007)."""
    event = late(event_id, days)
    assert event.subject_kind is not None
    assert event.occurred_at is not None
    key = CHAIN.generation_keys(event.subject_kind, event.id_scheme, event.id_value)[0][1]
    record = event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source="library", event_id=event_id),
        event_type=event.event_type,
        subject_key=key,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=to_timestamp(event.occurred_at),
        recorded_at=to_timestamp(NOW),
        attributes={"days_late": to_attribute_value(days)},
        subject_key_id="k1",
    )
    columns = ("source", "event_id", "event_type", "subject_key", "subject_key_id")
    table = sa.table(
        "ingest_events",
        *(sa.column(name, sa.String()) for name in (*columns, "fingerprint", "fingerprint_key_id")),
        sa.column("occurred_at", sa.DateTime(timezone=True)),
        sa.column("recorded_at", sa.DateTime(timezone=True)),
        sa.column("record", sa.LargeBinary()),
    )
    with engine.begin() as connection:
        connection.execute(
            sa.insert(table).values(
                source="library",
                event_id=event_id,
                event_type=event.event_type,
                subject_key=key,
                subject_key_id="k1",
                occurred_at=event.occurred_at,
                recorded_at=NOW,
                fingerprint=json_fingerprint(event, key),
                fingerprint_key_id=None,
                record=record.SerializeToString(),
            )
        )


def test_an_event_stored_before_the_upgrade_is_a_duplicate_when_resent_after_it(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0007")
    store_as_before_the_upgrade(engine, "old", 40)
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    intake = make_intake(SqlEventStore(make_session_factory(engine), audit_keys=UNKEYED), CHAIN)
    batch = [late("old", 40), late("old", 41), late("new", 3)]
    expected = [EventStatus.DUPLICATE, EventStatus.CONFLICT, EventStatus.ACCEPTED]
    assert statuses(intake.submit("library", batch, validate_only=True)) == expected
    assert statuses(intake.submit("library", batch)) == expected
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT event_id, fingerprint_version FROM ingest_events ORDER BY sequence")
        ).all()
    assert [tuple(r) for r in rows] == [("old", None), ("new", 2)]
    assert statuses(intake.submit("library", [late("new", 3), late("new", 4)])) == [
        EventStatus.DUPLICATE,
        EventStatus.CONFLICT,
    ]


class RacingStore(SqlEventStore):
    """Holds each writer's first read until the other has read too: both find nothing and
    both insert, the way two streams submitting one event at once may."""

    def __init__(self, sessions: sessionmaker[Session], barrier: threading.Barrier) -> None:
        super().__init__(sessions, audit_keys=UNKEYED)
        self._barrier = barrier
        self._held = threading.local()
        self.reads = 0

    def _existing(  # type: ignore[override]
        self, session: Session, events: Sequence[NewEvent]
    ) -> dict[tuple[str, str], StoredFingerprint]:
        found = super()._existing(session, events)
        self.reads += 1
        if not getattr(self._held, "once", False):
            self._held.once = True
            self._barrier.wait(timeout=30)
        return found


def test_two_writers_submitting_the_same_event_at_once_store_it_once(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    store = RacingStore(make_session_factory(engine), threading.Barrier(2))
    intake = make_intake(store, CHAIN)
    batch = [late("same", 40), late("other", 2)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: statuses(intake.submit("library", batch)), range(2)))
    # Both inserted; the second writer's insert failed on the unique key and its retry read again.
    assert store.reads == 3
    assert sorted(outcomes, key=str) == [
        [EventStatus.ACCEPTED, EventStatus.ACCEPTED],
        [EventStatus.DUPLICATE, EventStatus.DUPLICATE],
    ]
    with engine.connect() as connection:
        events = connection.execute(sa.text("SELECT event_id, sequence FROM ingest_events")).all()
        payloads = connection.scalars(sa.text("SELECT payload FROM ingest_outbox ORDER BY id")).all()
    assert sorted(e.event_id for e in events) == ["other", "same"]
    relayed = [rules_pb.EvaluateEventsRequest.FromString(p).events[0] for p in payloads]
    assert [(e.ref.event_id, e.sequence) for e in relayed] == sorted(
        ((e.event_id, e.sequence) for e in events), key=lambda e: e[1]
    )
    assert all(e.recorded_at.ToDatetime(tzinfo=NOW.tzinfo) - NOW < timedelta(days=1) for e in relayed)


def test_each_batch_stores_its_own_recording_time_as_the_column_type_writes_it(engine: sa.Engine) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    memory = MemoryStore()
    make_intake(memory, CHAIN).submit("library", [late(f"e{i}", 40 + i) for i in range(6)])
    events = list(memory.events.values())
    store = SqlEventStore(make_session_factory(engine), audit_keys=UNKEYED)
    # The recording time is bound once per batch: a later batch's own time, even one equal
    # to an earlier batch's in another object, must never come out as an earlier one.
    times = [NOW, NOW + timedelta(microseconds=1), datetime(2026, 11, 1, tzinfo=UTC)]
    for i, at in enumerate(times):
        store.record(events[2 * i : 2 * i + 2], at)
    with engine.connect() as connection:
        stored = connection.execute(sa.select(StoredEvent.recorded_at).order_by(StoredEvent.sequence))
        outbox = connection.execute(sa.select(Outbox.available_at, Outbox.created_at).order_by(Outbox.id))
        assert [as_utc(at) for (at,) in stored] == [t for t in times for _ in range(2)]
        rows = [(as_utc(available), as_utc(created)) for available, created in outbox if created is not None]
        assert rows == [(t, t) for t in times for _ in range(2)]
        if engine.dialect.name == "sqlite":
            # What the column's type writes (kit.columns.Instant), as an unshared binding would.
            raw = connection.execute(sa.text("SELECT DISTINCT recorded_at FROM ingest_events ORDER BY 1"))
            assert [r for (r,) in raw] == [microseconds(t) for t in sorted(set(times))]
