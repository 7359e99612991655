"""Ingest's store: the durable event log and the outbox to rules, written together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from egret.common.v1 import event_pb2
from kit.db import make_metadata
from kit.outbox import BigId, OutboxMixin, outbox_rows
from kit.protoconv import SUBJECT_KIND_VALUES, to_attribute_value, to_timestamp
from kit.sharding import shard_of
from services.ingest.domain import NewEvent


class Base(DeclarativeBase):
    metadata = make_metadata()


class StoredEvent(Base):
    """One accepted event. `record` is its RecordedEvent (without `sequence`, kept in its own column)."""

    __tablename__ = "ingest_events"
    __table_args__ = (sa.UniqueConstraint("source", "event_id"),)

    sequence: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(sa.String(64))
    event_id: Mapped[str] = mapped_column(sa.String(128))
    event_type: Mapped[str] = mapped_column(sa.String(128))
    subject_key: Mapped[str] = mapped_column(sa.String(64), index=True)
    subject_key_id: Mapped[str] = mapped_column(sa.String(32))
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)
    recorded_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    record: Mapped[bytes] = mapped_column(sa.LargeBinary)


class Outbox(Base, OutboxMixin):
    """Recorded events waiting to be relayed to the rules service, each to its subject's shard."""

    __tablename__ = "ingest_outbox"
    # Each shard's relay claims its rows in id order through this index.
    __table_args__ = (sa.Index("ix_ingest_outbox_shard_id", "shard", "id"),)

    # The rules shard that owns the event's subject (kit.sharding); 0 when unsharded.
    shard: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")


def recorded_event(event: NewEvent, recorded_at: datetime) -> event_pb2.RecordedEvent:
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source=event.source, event_id=event.event_id),
        event_type=event.event_type,
        subject_key=event.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[event.subject_kind],
        occurred_at=to_timestamp(event.occurred_at),
        recorded_at=to_timestamp(recorded_at),
        attributes={name: to_attribute_value(value) for name, value in event.attributes.items()},
        evidence_uri=event.evidence_uri,
        subject_key_id=event.subject_key_id,
    )


class SqlEventStore:
    """EventStore on SQLAlchemy: one transaction per batch, bulk statements only.

    `rules_shards` is the number of rules shards; each outbox row is written for the
    shard that owns its subject, so each shard's relay sends only its own rows.
    """

    def __init__(self, sessions: sessionmaker[Session], rules_shards: int = 1) -> None:
        self._sessions = sessions
        self._rules_shards = rules_shards

    def record(self, events: Sequence[NewEvent], recorded_at: datetime) -> Mapping[tuple[str, str], str]:
        try:
            return self._record(events, recorded_at)
        except IntegrityError:
            # A concurrent writer stored one of these keys between our read and our
            # insert (PostgreSQL with several writers); the retry sees it as existing.
            return self._record(events, recorded_at)

    def _record(self, events: Sequence[NewEvent], recorded_at: datetime) -> Mapping[tuple[str, str], str]:
        with self._sessions() as session, session.begin():
            existing = self._existing(session, events)
            fresh = [e for e in events if e.key not in existing]
            if not fresh:
                return existing
            messages = [recorded_event(e, recorded_at) for e in fresh]
            sequences = session.scalars(
                sa.insert(StoredEvent).returning(StoredEvent.sequence, sort_by_parameter_order=True),
                [
                    {
                        "source": e.source,
                        "event_id": e.event_id,
                        "event_type": e.event_type,
                        "subject_key": e.subject_key,
                        "subject_key_id": e.subject_key_id,
                        "occurred_at": e.occurred_at,
                        "recorded_at": recorded_at,
                        "fingerprint": e.fingerprint,
                        "record": m.SerializeToString(),
                    }
                    for e, m in zip(fresh, messages, strict=True)
                ],
            ).all()
            # The sequence is only known after the insert; the relayed copy carries it.
            records = []
            for message, sequence in zip(messages, sequences, strict=True):
                message.sequence = sequence
                records.append(message.SerializeToString())
            rows = outbox_rows(records, recorded_at)
            for row, event in zip(rows, fresh, strict=True):
                row["shard"] = shard_of(event.subject_key, self._rules_shards)
            session.execute(sa.insert(Outbox), rows)
        return existing

    def stranded_shards(self) -> list[int]:
        """Shards of waiting outbox rows that no relay of this configuration serves: rows
        written when there were more rules shards, which would otherwise wait forever."""
        with self._sessions() as session:
            query = sa.select(Outbox.shard).where(Outbox.shard >= self._rules_shards).distinct()
            return sorted(session.scalars(query))

    @staticmethod
    def _existing(session: Session, events: Sequence[NewEvent]) -> dict[tuple[str, str], str]:
        found: dict[tuple[str, str], str] = {}
        by_source: dict[str, list[str]] = {}
        for e in events:
            by_source.setdefault(e.source, []).append(e.event_id)
        for source, ids in by_source.items():
            rows = session.execute(
                sa.select(StoredEvent.event_id, StoredEvent.fingerprint).where(
                    StoredEvent.source == source, StoredEvent.event_id.in_(ids)
                )
            )
            found.update({(source, r.event_id): r.fingerprint for r in rows})
        return found
