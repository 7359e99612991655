"""Ingest's store: the durable event log, the departments' retractions, the outbox to rules
and the audit log, written together.

Each outbox row is one serialized EvaluateEventsRequest holding exactly one event or one
retraction; the relay merges a claim's rows into one request (services/ingest/bootstrap.py).
An event's row holds the bytes stored as its record, with its sequence appended
(services.ingest.wire): each event is serialized once. Events and outbox rows go in with
one executemany per batch each.
A retraction's row is written after its event's, for the same subject and so the same
shard, so rules always receives the event first.

Every stored subject key carries its generation (`KEYED`, kit.rekey), and so does each
event's fingerprint, which moves along the key chain with it (services.ingest.domain).
The outbox's messages carry their generation too and are not re-keyed: rules moves them
forward on arrival. The audit log keeps the keys it was written with (docs/security.md,
"Rotating the subject key").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from egret.common.v1 import due_process_pb2, event_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from kit import audit
from kit.audit import AuditHeadMixin, AuditMixin
from kit.columns import Hex, Instant
from kit.db import make_metadata
from kit.errors import AlreadyExists, FailedPrecondition, NotFound
from kit.outbox import BigId, OutboxLeaseMixin, OutboxMixin, outbox_rows
from kit.packing import Packed
from kit.protoconv import to_timestamp
from kit.rekey import GenerationMixin, KeyedColumn, KeyedStore, rewrite_recorded_event
from kit.sharding import shard_of
from services.ingest import wire
from services.ingest.domain import (
    FINGERPRINT_CANONICAL,
    FINGERPRINT_JSON,
    NewEvent,
    Retracted,
    Retraction,
    RetractionRequest,
    StoredFingerprint,
    same_payload,
)


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
    # Not indexed, nor is occurred_at: ingest reads events by (source, event_id) only
    # (migration 0009 dropped the two indexes no query used).
    # Subject keys and fingerprints are SHA-256 hex digests (kit.pseudonym, services.ingest.domain),
    # stored as their bytes (kit.columns.Hex); instants as kit.columns.Instant (migration 0012).
    subject_key: Mapped[str] = mapped_column(Hex)
    subject_key_id: Mapped[str] = mapped_column(sa.String(32))
    occurred_at: Mapped[datetime] = mapped_column(Instant)
    recorded_at: Mapped[datetime] = mapped_column(Instant)
    fingerprint: Mapped[str] = mapped_column(Hex)
    # The generation of `fingerprint` (NULL: the root's, from before generations).
    fingerprint_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    # How `fingerprint` was taken (services.ingest.domain; NULL: FINGERPRINT_JSON).
    fingerprint_version: Mapped[int | None] = mapped_column(sa.SmallInteger)
    record: Mapped[bytes] = mapped_column(Packed)


class StoredRetraction(Base):
    """A department's retraction of one of its events (the event itself stays, never deleted)."""

    __tablename__ = "ingest_retractions"

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    subject_key: Mapped[str] = mapped_column(Hex, index=True)
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    reason: Mapped[str] = mapped_column(sa.Text)
    retracted_at: Mapped[datetime] = mapped_column(Instant)
    retracted_by: Mapped[str] = mapped_column(sa.String(256))
    # For a correction, the replacement event (same source).
    replaced_by_source: Mapped[str | None] = mapped_column(sa.String(64))
    replaced_by_event_id: Mapped[str | None] = mapped_column(sa.String(128))


class IngestAuditLog(Base, AuditMixin):
    """The hash-chained audit log of ingest's audited acts (retractions, corrections)."""

    __tablename__ = "ingest_audit_log"


class IngestAuditHead(Base, AuditHeadMixin):
    __tablename__ = "ingest_audit_head"


class IngestSubjectKeyGeneration(Base, GenerationMixin):
    """The generation ingest's stored subject keys are in (kit.rekey)."""

    __tablename__ = "ingest_subject_key_generation"


# What ingest stores under subject keys, for the re-keying job: the events (with their
# stored RecordedEvent and their fingerprint) and the retractions.
_EVENTS = Base.metadata.tables["ingest_events"]
KEYED = KeyedStore(
    IngestSubjectKeyGeneration,
    [
        KeyedColumn(_EVENTS, payload="record", rewrite=rewrite_recorded_event),
        KeyedColumn(_EVENTS, key="fingerprint", key_id="fingerprint_key_id"),
        KeyedColumn(Base.metadata.tables["ingest_retractions"]),
    ],
    IngestAuditLog,
    IngestAuditHead,
)


class Outbox(Base, OutboxMixin):
    """Events and retractions waiting to be relayed to the rules service, each to its
    subject's shard: one serialized EvaluateEventsRequest per row."""

    __tablename__ = "ingest_outbox"
    # Each shard's relay claims its rows in id order through this index.
    __table_args__ = (sa.Index("ix_ingest_outbox_shard_id", "shard", "id"),)

    # The rules shard that owns the event's subject (kit.sharding); 0 when unsharded.
    shard: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")


class OutboxLease(Base, OutboxLeaseMixin):
    """Which relay is sending each shard's slice of the outbox, and until when (kit.outbox_lease)."""

    __tablename__ = "ingest_outbox_leases"


# Batches go into these Core tables with executemany, without the ORM's per-row bookkeeping.
_OUTBOX = Base.metadata.tables["ingest_outbox"]


class _Shared(sa.types.TypeDecorator[datetime]):
    """A column's own datetime type, bound for a value that every row of an executemany
    shares (the batch's recording time): the type's bind processing (on SQLite, Instant's
    microseconds or the outbox's DateTime string) runs once per batch rather than once per
    row. The driver receives exactly what the column's type makes of the value, so the
    stored bytes are the same.

    It overrides bind_processor rather than the usual process_bind_param, whose result
    TypeDecorator hands to the impl's processor for every row: that form cost ingest about
    4 µs more CPU per event (docs/benchmarks.md, issue 18)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def __init__(self, column_type: sa.types.TypeEngine[datetime]) -> None:
        super().__init__()
        self.column_type = column_type

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        return self.column_type

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        process = self.impl_instance.bind_processor(dialect)
        if process is None:
            return None
        # The last value and what it became; a tuple, so that threads never see a torn pair.
        # It holds a time, never an identifier.
        last: tuple[Any, Any] = (None, None)

        def once(value: Any) -> Any:
            nonlocal last
            seen = last
            if value is seen[0] and value is not None:
                return seen[1]
            processed = process(value)
            last = (value, processed)
            return processed

        return once


def _shared(column: sa.Column[datetime]) -> sa.BindParameter[datetime]:
    return sa.bindparam(column.name, type_=_Shared(column.type))


# One recording time per batch: events' recorded_at, the outbox rows' available_at and created_at.
_INSERT_EVENTS = sa.insert(_EVENTS).values(recorded_at=_shared(_EVENTS.c.recorded_at))
_INSERT_OUTBOX = sa.insert(_OUTBOX).values(
    available_at=_shared(_OUTBOX.c.available_at), created_at=_shared(_OUTBOX.c.created_at)
)


_EVENTS_FIELD = rules_pb.EvaluateEventsRequest.EVENTS_FIELD_NUMBER


def event_payload(record: bytes, sequence: int) -> bytes:
    """The outbox row of a stored event: an EvaluateEventsRequest holding its record, the
    stored bytes as they are, with its sequence."""
    return wire.length_delimited(_EVENTS_FIELD, record + wire.sequence(sequence))


def retraction_message(retraction: Retraction) -> due_process_pb2.Retraction:
    message = due_process_pb2.Retraction(
        ref=event_pb2.EventRef(source=retraction.source, event_id=retraction.event_id),
        subject_key=retraction.subject_key,
        reason=retraction.reason,
        retracted_at=to_timestamp(retraction.retracted_at),
        retracted_by=retraction.retracted_by,
        subject_key_id=retraction.subject_key_id,
    )
    if retraction.replaced_by is not None:
        source, event_id = retraction.replaced_by
        message.replaced_by.CopyFrom(event_pb2.EventRef(source=source, event_id=event_id))
    return message


def _retraction(row: StoredRetraction) -> Retraction:
    replaced_by = (
        (row.replaced_by_source, row.replaced_by_event_id)
        if row.replaced_by_source is not None and row.replaced_by_event_id is not None
        else None
    )
    return Retraction(
        source=row.source,
        event_id=row.event_id,
        subject_key=row.subject_key,
        reason=row.reason,
        retracted_at=row.retracted_at,  # aware UTC on both dialects (kit.columns.Instant)
        retracted_by=row.retracted_by,
        replaced_by=replaced_by,
        subject_key_id=row.subject_key_id or "",
    )


class SqlEventStore:
    """EventStore on SQLAlchemy: one transaction per batch, bulk statements only.

    `rules_shards` is the number of rules shards; each outbox row is written for the
    shard that owns its subject, so each shard's relay sends only its own rows.
    """

    def __init__(
        self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys, rules_shards: int = 1
    ) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys
        self._rules_shards = rules_shards

    def record(
        self, events: Sequence[NewEvent], recorded_at: datetime
    ) -> Mapping[tuple[str, str], StoredFingerprint]:
        try:
            return self._record(events, recorded_at)
        except IntegrityError:
            # A concurrent writer stored one of these keys between our read and our
            # insert (PostgreSQL with several writers); the retry sees it as existing.
            return self._record(events, recorded_at)

    def _record(
        self, events: Sequence[NewEvent], recorded_at: datetime
    ) -> Mapping[tuple[str, str], StoredFingerprint]:
        with self._sessions() as session, session.begin():
            existing = self._existing(session, events)
            fresh = [e for e in events if e.key not in existing]
            if fresh:
                self._insert(session, fresh, recorded_at)
        return existing

    def _insert(self, session: Session, fresh: Sequence[NewEvent], recorded_at: datetime) -> None:
        """Store new events and their outbox rows, in the caller's transaction: one
        executemany each, and one read of the sequences the database gave the events."""
        at = wire.recorded_at(recorded_at)
        records = [e.body + wire.subject(e.subject_key, e.subject_key_id) + at for e in fresh]
        session.execute(
            _INSERT_EVENTS,
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
                    "fingerprint_key_id": e.subject_key_id,
                    "fingerprint_version": FINGERPRINT_CANONICAL,
                    "record": record,
                }
                for e, record in zip(fresh, records, strict=True)
            ],
        )
        # The sequence is only known after the insert; the relayed copy carries it.
        sequences = self._sequences(session, [e.key for e in fresh])
        rows = outbox_rows(
            [event_payload(r, sequences[e.key]) for e, r in zip(fresh, records, strict=True)], recorded_at
        )
        for row, event in zip(rows, fresh, strict=True):
            row["shard"] = shard_of(event.subject_key, self._rules_shards)
        session.execute(_INSERT_OUTBOX, rows)

    @staticmethod
    def _sequences(session: Session, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], int] = {}
        for source, ids in _by_source(keys).items():
            rows = session.execute(
                sa.select(_EVENTS.c.event_id, _EVENTS.c.sequence).where(
                    _EVENTS.c.source == source, _EVENTS.c.event_id.in_(ids)
                )
            )
            found.update({(source, event_id): sequence for event_id, sequence in rows})
        return found

    def fingerprints(self, keys: Sequence[tuple[str, str]]) -> Mapping[tuple[str, str], StoredFingerprint]:
        with self._sessions() as session:
            return self._fingerprints(session, keys)

    def retract(self, request: RetractionRequest) -> Retracted:
        try:
            return self._retract(request)
        except IntegrityError:
            # A concurrent retraction of the same event won; the retry returns it.
            return self._retract(request)

    def _retract(self, request: RetractionRequest) -> Retracted:
        with self._sessions() as session, session.begin():
            subject = self._subject_of(session, request)
            earlier = self._retraction(session, request.source, request.event_id)
            if earlier is not None:
                return Retracted(earlier, already_retracted=True)
            retraction = self._add_retraction(session, request, subject, None, "event.retract")
            return Retracted(retraction, already_retracted=False)

    def correct(
        self, request: RetractionRequest, replacement: NewEvent
    ) -> tuple[Retracted, StoredFingerprint | None]:
        try:
            return self._correct(request, replacement)
        except IntegrityError:
            return self._correct(request, replacement)

    def _correct(
        self, request: RetractionRequest, replacement: NewEvent
    ) -> tuple[Retracted, StoredFingerprint | None]:
        with self._sessions() as session, session.begin():
            subject = self._subject_of(session, request)
            stored = self._existing(session, [replacement]).get(replacement.key)
            if stored is not None and not same_payload(stored, replacement):
                raise AlreadyExists(
                    f"replacement event_id {replacement.event_id!r} was submitted earlier with a "
                    "different payload",
                    reason="EVENT_ID_CONFLICT",
                )
            earlier = self._retraction(session, request.source, request.event_id)
            if earlier is not None:
                if earlier.replaced_by == replacement.key and stored is not None:
                    return Retracted(earlier, already_retracted=True), stored
                raise FailedPrecondition(
                    f"event {request.source}/{request.event_id} was already retracted at "
                    f"{earlier.retracted_at.isoformat()}"
                    + (
                        f" and replaced by {'/'.join(earlier.replaced_by)}"
                        if earlier.replaced_by is not None
                        else ""
                    )
                )
            # The retraction's row first: rules reverses the original, then evaluates the
            # replacement (order matters only on one shard; either order converges).
            retraction = self._add_retraction(session, request, subject, replacement.key, "event.correct")
            if stored is None:
                self._insert(session, [replacement], request.at)
            return Retracted(retraction, already_retracted=False), stored

    @staticmethod
    def _subject_of(session: Session, request: RetractionRequest) -> tuple[str, str]:
        """The retracted event's subject key and its generation, which its retraction carries."""
        row = session.execute(
            sa.select(StoredEvent.subject_key, StoredEvent.subject_key_id).where(
                StoredEvent.source == request.source, StoredEvent.event_id == request.event_id
            )
        ).one_or_none()
        if row is None:
            raise NotFound(f"source {request.source!r} sent no event {request.event_id!r}")
        return row.subject_key, row.subject_key_id

    @staticmethod
    def _retraction(session: Session, source: str, event_id: str) -> Retraction | None:
        row = session.scalars(
            sa.select(StoredRetraction).where(
                StoredRetraction.source == source, StoredRetraction.event_id == event_id
            )
        ).one_or_none()
        return None if row is None else _retraction(row)

    def _add_retraction(
        self,
        session: Session,
        request: RetractionRequest,
        subject: tuple[str, str],
        replaced_by: tuple[str, str] | None,
        action: str,
    ) -> Retraction:
        subject_key, subject_key_id = subject
        retraction = Retraction(
            source=request.source,
            event_id=request.event_id,
            subject_key=subject_key,
            reason=request.reason,
            retracted_at=request.at,
            retracted_by=request.actor,
            replaced_by=replaced_by,
            subject_key_id=subject_key_id,
        )
        session.execute(
            sa.insert(StoredRetraction).values(
                source=retraction.source,
                event_id=retraction.event_id,
                subject_key=subject_key,
                subject_key_id=subject_key_id,
                reason=retraction.reason,
                retracted_at=retraction.retracted_at,
                retracted_by=retraction.retracted_by,
                replaced_by_source=replaced_by[0] if replaced_by else None,
                replaced_by_event_id=replaced_by[1] if replaced_by else None,
            )
        )
        payload = rules_pb.EvaluateEventsRequest(retractions=[retraction_message(retraction)])
        (row,) = outbox_rows([payload.SerializeToString()], request.at)
        row["shard"] = shard_of(subject_key, self._rules_shards)
        session.execute(sa.insert(_OUTBOX), [row])
        detail: dict[str, object] = {"reason": retraction.reason}
        if replaced_by is not None:
            detail["replaced_by"] = "/".join(replaced_by)
        audit.append(
            session,
            IngestAuditLog,
            IngestAuditHead,
            [
                audit.record(
                    action,
                    request.at,
                    subject_key=subject_key,
                    target=f"event:{retraction.source}/{retraction.event_id}",
                    detail=detail,
                    claimed_actor=request.actor,
                )
            ],
            keys=self._audit_keys,
        )
        return retraction

    def stranded_shards(self) -> list[int]:
        """Shards of waiting outbox rows that no relay of this configuration serves: rows
        written when there were more rules shards, which would otherwise wait forever."""
        with self._sessions() as session:
            query = sa.select(Outbox.shard).where(Outbox.shard >= self._rules_shards).distinct()
            return sorted(session.scalars(query))

    @classmethod
    def _existing(
        cls, session: Session, events: Sequence[NewEvent]
    ) -> dict[tuple[str, str], StoredFingerprint]:
        return cls._fingerprints(session, [e.key for e in events])

    @staticmethod
    def _fingerprints(
        session: Session, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], StoredFingerprint]:
        found: dict[tuple[str, str], StoredFingerprint] = {}
        for source, ids in _by_source(keys).items():
            rows = session.execute(
                sa.select(_EVENTS.c.event_id, _EVENTS.c.fingerprint, _EVENTS.c.fingerprint_version).where(
                    _EVENTS.c.source == source, _EVENTS.c.event_id.in_(ids)
                )
            )
            found.update(
                {
                    (source, event_id): StoredFingerprint(value, version or FINGERPRINT_JSON)
                    for event_id, value, version in rows
                }
            )
        return found


def _by_source(keys: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for source, event_id in keys:
        grouped.setdefault(source, []).append(event_id)
    return grouped
