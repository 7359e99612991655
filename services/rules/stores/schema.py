"""Rules' store: evaluated events, outcomes and the events they consumed, the outbox to
score, dead letters, retractions, and the rule sets with their audit trail.

Evaluation writes in one transaction per batch: an event is either evaluated with its
outcomes queued for score (or recorded as failed), or not at all. Every per-batch
statement is a bulk one; no query runs per event.

An evaluation or a retraction that settles a subject again in event time reverses the
outcomes it superseded in the same transaction: each is marked (only if still active,
otherwise the transaction yields to the evaluation that got there first), its consumed
events released and a reversal queued for score. A retraction also records itself (the
inbox of retractions) and marks the event retracted (it leaves every later history read).
Each outbox row is one serialized ApplyOutcomesRequest holding one outcome or one
reversal; the relay merges a claim's rows into one request.

Every stored subject key has its generation next to it (`subject_key_id`; NULL in rows
from before generations were recorded: the root generation), and every key written is
of the instance's current generation; `KEYED` is what the re-keying job moves (kit.rekey,
docs/security.md "Rotating the subject key"). The audit log and the outbox keep the keys
they were written with.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from egret.common.v1 import due_process_pb2, event_pb2, outcome_pb2
from egret.score.v1 import score_service_pb2 as score_pb
from kit import audit
from kit.audit import AuditHeadMixin, AuditMixin, AuditRecord
from kit.auth import current_principal
from kit.db import as_utc, make_metadata
from kit.errors import FailedPrecondition
from kit.outbox import BigId, OutboxMixin, outbox_rows
from kit.protoconv import SEVERITY_VALUES, SUBJECT_KIND_VALUES, to_timestamp
from kit.rekey import GenerationMixin, KeyedColumn, KeyedStore, rewrite_outcome, rewrite_recorded_event
from services.rules.domain import (
    BatchState,
    DeadLetter,
    EvaluationContext,
    Failure,
    RetractionContext,
    RetractionNotice,
    ReversedOutcome,
    split_key,
)
from services.rules.engine import Evaluated
from services.rules.lifecycle import (
    ActivePointer,
    Change,
    RecordedChange,
    State,
    Status,
    StoredRuleSet,
    source_sha256,
)
from services.rules.records import engine_event_from_record
from services.rules.ruleset import EngineEvent, Firing, RuleSet, reissued_id
from services.rules.windows import PriorOutcome

# Keeps IN lists well below SQLite's and PostgreSQL's bound-parameter limits.
_CHUNK: Final = 5000
# The active pointer is one row: one rule set is active for the whole service.
_ACTIVE_SLOT: Final = 1


class Base(DeclarativeBase):
    metadata = make_metadata()


class EvaluatedEvent(Base):
    """An event rules has evaluated (the inbox), with its record for later replays and as history."""

    __tablename__ = "rules_evaluated_events"
    # History reads one subject's events within an event-time range.
    __table_args__ = (sa.Index("ix_rules_evaluated_events_subject_time", "subject_key", "occurred_at"),)

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(64))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    event_type: Mapped[str] = mapped_column(sa.String(128))
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    evaluated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    record: Mapped[bytes] = mapped_column(sa.LargeBinary)
    # Set when the department retracted the event: it stays for the record but takes part
    # in no later window, sequence, cap or history read (backtests skip it too).
    retracted_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class EmittedOutcome(Base):
    """An outcome rules emitted: the rules-side record of every firing."""

    __tablename__ = "rules_outcomes"

    outcome_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(64), index=True)
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    rule_id: Mapped[str] = mapped_column(sa.String(128))
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    points: Mapped[int] = mapped_column(sa.Integer)
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    emitted_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    outcome: Mapped[bytes] = mapped_column(sa.LargeBinary)
    # Set when a retraction of one of its events reversed it (reversed_by: that event's key).
    reversed_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    reversed_by: Mapped[str | None] = mapped_column(sa.String(193))


class OutcomeEvent(Base):
    """Which events an outcome used, so that a rule never counts one event in two windows."""

    __tablename__ = "rules_outcome_events"
    __table_args__ = (sa.Index("ix_rules_outcome_events_subject_time", "subject_key", "occurred_at"),)

    outcome_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_key: Mapped[str] = mapped_column(sa.String(193), primary_key=True)
    rule_id: Mapped[str] = mapped_column(sa.String(128))
    subject_key: Mapped[str] = mapped_column(sa.String(64))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    # The event's occurred_at, so consumed keys are read within the same lookback as history.
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


class RetractionRow(Base):
    """A retraction rules has applied (the inbox of retractions): applied once, whatever
    the redeliveries. Also keeps an event that arrives after its retraction from being
    evaluated."""

    __tablename__ = "rules_retractions"

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(64))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    applied_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    # How many outcomes it reversed and how many it re-formed from the released events.
    reversed: Mapped[int] = mapped_column(sa.Integer)
    reformed: Mapped[int] = mapped_column(sa.Integer)
    # The Retraction as ingest sent it (egret.common.v1.Retraction).
    record: Mapped[bytes] = mapped_column(sa.LargeBinary)


class DeadLetterRow(Base):
    """An event whose evaluation failed: retried while parked_at is NULL, parked after."""

    __tablename__ = "rules_dead_letters"
    __table_args__ = (sa.UniqueConstraint("source", "event_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(sa.String(64))
    event_id: Mapped[str] = mapped_column(sa.String(128))
    subject_key: Mapped[str] = mapped_column(sa.String(64))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(sa.Integer)
    reason: Mapped[str] = mapped_column(sa.Text)
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    first_failed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    last_failed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    parked_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True), index=True)
    record: Mapped[bytes] = mapped_column(sa.LargeBinary)


class RuleSetRow(Base):
    """A stored rule set: its source and lifecycle (whether it is active is RuleSetActive's)."""

    __tablename__ = "rules_rule_sets"
    # NULL until published, and NULLs never collide: many drafts may share a name and
    # version, one published rule set may have them.
    __table_args__ = (sa.UniqueConstraint("name", "published_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(128))
    version: Mapped[int] = mapped_column(sa.Integer)
    published_version: Mapped[int | None] = mapped_column(sa.Integer)
    state: Mapped[str] = mapped_column(sa.String(16))
    source: Mapped[str] = mapped_column(sa.Text)
    source_sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(sa.String(128))
    published_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    published_by: Mapped[str | None] = mapped_column(sa.String(128))
    activated_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    activated_by: Mapped[str | None] = mapped_column(sa.String(128))
    retired_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    retired_by: Mapped[str | None] = mapped_column(sa.String(128))


class RuleSetActive(Base):
    """The one active rule set: a single row, read by every batch and swapped by ActivateRuleSet."""

    __tablename__ = "rules_active_rule_set"

    slot: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    rule_set_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("rules_rule_sets.id"))
    activated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    activated_by: Mapped[str] = mapped_column(sa.String(128))


class RuleSetChangeRow(Base):
    """The audit trail: who changed which rule set, when, and how."""

    __tablename__ = "rules_rule_set_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rule_set_id: Mapped[int | None] = mapped_column(BigId, sa.ForeignKey("rules_rule_sets.id"), index=True)
    action: Mapped[str] = mapped_column(sa.String(32))
    actor: Mapped[str] = mapped_column(sa.String(128))
    changed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    detail: Mapped[str] = mapped_column(sa.Text)


class RulesAuditLog(Base, AuditMixin):
    """The hash-chained audit log of rules' audited acts: rule-set lifecycle changes and
    dead-letter redrives (the rule-set change table stays, for ListRuleSetChanges)."""

    __tablename__ = "rules_audit_log"


class RulesAuditHead(Base, AuditHeadMixin):
    __tablename__ = "rules_audit_head"


class Outbox(Base, OutboxMixin):
    """Outcomes and reversals waiting to be relayed to the score service: one serialized
    ApplyOutcomesRequest per row."""

    __tablename__ = "rules_outbox"


class BacktestJobRow(Base):
    """A backtest run in the background (StartBacktest): its state, progress and report.

    ``report`` is a serialized BacktestRuleSetResponse, with subjects only when the start
    stated a purpose; they are keys of generation ``subject_key_id``. ``heartbeat_at`` is
    written while the job runs, so that a job whose instance died is seen as such."""

    __tablename__ = "rules_backtests"
    __table_args__ = (sa.Index("ix_rules_backtests_state_heartbeat", "state", "heartbeat_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    backtest_id: Mapped[str] = mapped_column(sa.String(36), unique=True)
    rule_set_id: Mapped[int] = mapped_column(BigId, index=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    events_replayed: Mapped[int] = mapped_column(sa.BigInteger)
    events_total: Mapped[int] = mapped_column(sa.BigInteger)
    started_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    started_by: Mapped[str] = mapped_column(sa.String(128))
    # EGRET_INSTANCE of the instance running it: that instance fails it when it restarts.
    instance: Mapped[str] = mapped_column(sa.String(200))
    subject_key_id: Mapped[str] = mapped_column(sa.String(32))
    request: Mapped[bytes] = mapped_column(sa.LargeBinary)
    report: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    error: Mapped[str] = mapped_column(sa.Text)
    # Who stopped it (CancelBacktest); empty unless its state is "cancelled".
    cancelled_by: Mapped[str] = mapped_column(sa.String(128), server_default="")


class RulesSubjectKeyGeneration(Base, GenerationMixin):
    """The generation rules' stored subject keys are in (kit.rekey's marker)."""

    __tablename__ = "rules_subject_key_generation"


def rewrite_retraction(payload: bytes, key: str, key_id: str) -> bytes:
    """A stored Retraction with its subject key moved (kit.rekey.Rewrite)."""
    retraction = due_process_pb2.Retraction.FromString(payload)
    retraction.subject_key, retraction.subject_key_id = key, key_id
    return retraction.SerializeToString(deterministic=True)


def _table(model: type[Base]) -> sa.Table:
    return cast(sa.Table, model.__table__)


# Every stored subject key of rules, with the stored messages that embed it.
KEYED: Final = KeyedStore(
    RulesSubjectKeyGeneration,
    [
        KeyedColumn(_table(EvaluatedEvent), payload="record", rewrite=rewrite_recorded_event),
        KeyedColumn(_table(EmittedOutcome), payload="outcome", rewrite=rewrite_outcome),
        KeyedColumn(_table(OutcomeEvent)),
        KeyedColumn(_table(RetractionRow), payload="record", rewrite=rewrite_retraction),
        KeyedColumn(_table(DeadLetterRow), payload="record", rewrite=rewrite_recorded_event),
    ],
    RulesAuditLog,
    RulesAuditHead,
)


def outcome_payload(outcome: outcome_pb2.Outcome) -> bytes:
    return score_pb.ApplyOutcomesRequest(outcomes=[outcome]).SerializeToString()


def reversal_payload(outcome_id: str, retraction: due_process_pb2.Retraction, key_id: str) -> bytes:
    """The reversal of an outcome by a retraction, whose key the servicer moved to `key_id`."""
    reversal = score_pb.Reversal(
        outcome_id=outcome_id,
        retraction=retraction,
        cause=score_pb.REVERSAL_CAUSE_RETRACTION,
        subject_key=retraction.subject_key,
        subject_key_id=key_id,
    )
    return score_pb.ApplyOutcomesRequest(reversals=[reversal]).SerializeToString()


def regrouped_payload(outcome_id: str, subject_key: str, late_event: str, key_id: str) -> bytes:
    source, event_id = split_key(late_event)
    reversal = score_pb.Reversal(
        outcome_id=outcome_id,
        cause=score_pb.REVERSAL_CAUSE_REGROUPED,
        late_event=event_pb2.EventRef(source=source, event_id=event_id),
        subject_key=subject_key,
        subject_key_id=key_id,
    )
    return score_pb.ApplyOutcomesRequest(reversals=[reversal]).SerializeToString()


class _Superseded(Exception):
    """An outcome to reverse was reversed meanwhile: another evaluation settled the subject."""


def outcome_message(firing: Firing, records: Mapping[str, bytes], key_id: str) -> outcome_pb2.Outcome:
    """The Outcome sent to score, with the firing events as its evidence snapshot. Every
    stored key is of generation `key_id` (the guard keeps it so), the evidence's too, even
    when its stored copy predates generations."""
    events = [event_pb2.RecordedEvent.FromString(records[key]) for key in firing.event_keys]
    for event in events:
        event.subject_key_id = key_id
    return outcome_pb2.Outcome(
        outcome_id=firing.outcome_id,
        rule=outcome_pb2.RuleRef(
            rule_id=firing.rule_id,
            rule_set=firing.rule_set,
            rule_set_version=firing.rule_set_version,
            title=firing.title,
            description=firing.description,
            legal_basis=firing.legal_basis,
        ),
        subject_key=firing.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[firing.subject_kind],
        points=firing.points,
        category=firing.category,
        severity=SEVERITY_VALUES[firing.severity],
        occurred_at=to_timestamp(firing.occurred_at),
        reason=firing.reason,
        black_list=firing.black_list,
        events=events,
        subject_key_id=key_id,
    )


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _keys_by_source(keys: Sequence[str]) -> dict[str, list[str]]:
    by_source: dict[str, list[str]] = {}
    for key in keys:
        source, event_id = split_key(key)
        by_source.setdefault(source, []).append(event_id)
    return by_source


def _key_filter(table: Any, keys: Sequence[str]) -> Any:
    """WHERE (source, event_id) is one of `keys`, as one OR of IN lists per source."""
    return sa.or_(
        *(
            sa.and_(table.source == source, table.event_id.in_(ids))
            for source, ids in _keys_by_source(keys).items()
        )
    )


class SqlEvaluationStore:
    """Inbox, outcomes, outbox and dead letters on SQLAlchemy, bulk statements only.
    `key_id`: the current generation of subject keys, stored next to every key written."""

    def __init__(self, sessions: sessionmaker[Session], *, key_id: str) -> None:
        self._sessions = sessions
        self._key_id = key_id

    def batch_state(self, keys: Sequence[str]) -> BatchState:
        if not keys:
            return BatchState()
        evaluated: set[str] = set()
        parked: set[str] = set()
        retracted: set[str] = set()
        attempts: dict[str, int] = {}
        with self._sessions() as session:
            for chunk in _chunks(list(dict.fromkeys(keys))):
                rows = session.execute(
                    sa.select(EvaluatedEvent.source, EvaluatedEvent.event_id).where(
                        _key_filter(EvaluatedEvent, chunk)
                    )
                )
                evaluated.update(f"{r.source}/{r.event_id}" for r in rows)
                gone = session.execute(
                    sa.select(RetractionRow.source, RetractionRow.event_id).where(
                        _key_filter(RetractionRow, chunk)
                    )
                )
                retracted.update(f"{r.source}/{r.event_id}" for r in gone)
                letters = session.execute(
                    sa.select(
                        DeadLetterRow.source,
                        DeadLetterRow.event_id,
                        DeadLetterRow.attempts,
                        DeadLetterRow.parked_at,
                    ).where(_key_filter(DeadLetterRow, chunk))
                )
                for r in letters:
                    key = f"{r.source}/{r.event_id}"
                    if r.parked_at is not None:
                        parked.add(key)
                    else:
                        attempts[key] = r.attempts
        return BatchState(frozenset(evaluated), frozenset(parked), attempts, frozenset(retracted))

    def context(self, since: Mapping[str, datetime], event_types: frozenset[str]) -> EvaluationContext:
        history: dict[str, list[EngineEvent]] = {}
        records: dict[str, bytes] = {}
        prior: dict[str, list[PriorOutcome]] = {}
        if not since:
            return EvaluationContext({}, {}, {})
        # One bound for the whole statement (the index on subject and time bounds it),
        # then each subject's own instant in Python.
        low = min(since.values())
        subjects = list(since)

        def reaches(subject: str, occurred_at: datetime) -> bool:
            return as_utc(occurred_at) >= since[subject]

        with self._sessions() as session:
            for chunk in _chunks(subjects):
                rows = session.execute(
                    sa.select(EvaluatedEvent.subject_key, EvaluatedEvent.occurred_at, EvaluatedEvent.record)
                    .where(
                        EvaluatedEvent.subject_key.in_(chunk),
                        EvaluatedEvent.occurred_at >= low,
                        EvaluatedEvent.event_type.in_(sorted(event_types)),
                        EvaluatedEvent.retracted_at.is_(None),
                    )
                    .order_by(EvaluatedEvent.occurred_at, EvaluatedEvent.source, EvaluatedEvent.event_id)
                )
                for row in rows:
                    if reaches(row.subject_key, row.occurred_at):
                        event = engine_event_from_record(row.record)
                        history.setdefault(row.subject_key, []).append(event)
                        records[event.key] = row.record
                # Every active outcome with an event from the subject's instant on, whole
                # (an outcome that starts earlier decides what its region may reuse).
                reaching = (
                    sa.select(OutcomeEvent.outcome_id)
                    .where(OutcomeEvent.subject_key.in_(chunk), OutcomeEvent.occurred_at >= low)
                    .scalar_subquery()
                )
                uses = session.execute(
                    sa.select(
                        OutcomeEvent.outcome_id,
                        OutcomeEvent.rule_id,
                        OutcomeEvent.subject_key,
                        OutcomeEvent.event_key,
                        OutcomeEvent.occurred_at,
                        EmittedOutcome.points,
                    )
                    .join(EmittedOutcome, EmittedOutcome.outcome_id == OutcomeEvent.outcome_id)
                    .where(OutcomeEvent.outcome_id.in_(reaching))
                    .order_by(OutcomeEvent.outcome_id, OutcomeEvent.occurred_at, OutcomeEvent.event_key)
                )
                grouped: dict[str, list[Any]] = {}
                for use in uses:
                    grouped.setdefault(use.outcome_id, []).append(use)
                for outcome_id, events in grouped.items():
                    first, last = events[0], events[-1]
                    if not reaches(first.subject_key, last.occurred_at):
                        continue
                    prior.setdefault(first.subject_key, []).append(
                        PriorOutcome(
                            outcome_id=outcome_id,
                            rule_id=first.rule_id,
                            subject_key=first.subject_key,
                            event_keys=tuple(e.event_key for e in events),
                            first_at=as_utc(first.occurred_at),
                            last_at=as_utc(last.occurred_at),
                            points=first.points,
                        )
                    )
        return EvaluationContext(history=history, prior=prior, records=records)

    def commit_evaluation(
        self,
        events: Sequence[EngineEvent],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        failures: Sequence[Failure] = (),
        cleared: Sequence[str] = (),
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        occurred = {e.key: e.occurred_at for e in events}
        try:
            with self._sessions() as session, session.begin():
                if events:
                    session.execute(
                        sa.insert(EvaluatedEvent),
                        [
                            {
                                "source": split_key(e.key)[0],
                                "event_id": split_key(e.key)[1],
                                "subject_key": e.subject_key,
                                "subject_key_id": self._key_id,
                                "event_type": e.event_type,
                                "occurred_at": e.occurred_at,
                                "evaluated_at": now,
                                "rule_set": rule_set.name,
                                "rule_set_version": rule_set.version,
                                "record": records[e.key],
                            }
                            for e in events
                        ],
                    )
                self._supersede(
                    session,
                    [
                        (
                            s.outcome.outcome_id,
                            regrouped_payload(
                                s.outcome.outcome_id, s.outcome.subject_key, s.by, self._key_id
                            ),
                        )
                        for s in evaluated.superseded
                    ],
                    by={s.outcome.outcome_id: s.by for s in evaluated.superseded},
                    now=now,
                )
                self._emit(session, evaluated.firings, records, occurred, rule_set=rule_set, now=now)
                if cleared:
                    for chunk in _chunks(list(cleared)):
                        session.execute(sa.delete(DeadLetterRow).where(_key_filter(DeadLetterRow, chunk)))
                if failures:
                    self._record_failures(session, failures, records, rule_set, now)
        except (IntegrityError, _Superseded):
            return False
        return True

    @staticmethod
    def _supersede(
        session: Session, reversals: Sequence[tuple[str, bytes]], *, by: Mapping[str, str], now: datetime
    ) -> None:
        """Reverse active outcomes (id, reversal payload): mark them, release their events,
        queue the reversals. Raises _Superseded if one is no longer active."""
        if not reversals:
            return
        ids = [outcome_id for outcome_id, _ in reversals]
        table = cast(sa.Table, EmittedOutcome.__table__)
        marked = session.connection().execute(
            sa.update(table)
            .where(table.c.outcome_id == sa.bindparam("b_id"), table.c.reversed_at.is_(None))
            .values(reversed_at=now, reversed_by=sa.bindparam("b_by")),
            [{"b_id": i, "b_by": by[i]} for i in ids],
        )
        if marked.rowcount != len(ids):
            raise _Superseded
        # Releases the events they consumed (their evidence stays in the outcome's record).
        for chunk in _chunks(ids):
            session.execute(sa.delete(OutcomeEvent).where(OutcomeEvent.outcome_id.in_(chunk)))
        session.execute(sa.insert(Outbox), outbox_rows([payload for _, payload in reversals], now))

    def _emit(
        self,
        session: Session,
        firings: Sequence[Firing],
        records: Mapping[str, bytes],
        occurred: Mapping[str, datetime],
        *,
        rule_set: RuleSet,
        now: datetime,
    ) -> None:
        """Record the firings not emitted before, their consumed events and outbox rows."""
        firings = self._reissued(session, firings)
        outcomes = {f.outcome_id: outcome_message(f, records, self._key_id) for f in firings}
        fresh = self._not_yet_emitted(session, list(outcomes))
        if fresh:
            by_id = {f.outcome_id: f for f in firings}
            payloads = [outcomes[i].SerializeToString() for i in fresh]
            session.execute(
                sa.insert(EmittedOutcome),
                [
                    {
                        "outcome_id": i,
                        "subject_key": by_id[i].subject_key,
                        "subject_key_id": self._key_id,
                        "rule_id": by_id[i].rule_id,
                        "rule_set": rule_set.name,
                        "rule_set_version": rule_set.version,
                        "points": by_id[i].points,
                        "occurred_at": by_id[i].occurred_at,
                        "emitted_at": now,
                        "outcome": payload,
                    }
                    for i, payload in zip(fresh, payloads, strict=True)
                ],
            )
            session.execute(
                sa.insert(OutcomeEvent),
                [
                    {
                        "outcome_id": i,
                        "event_key": key,
                        "rule_id": by_id[i].rule_id,
                        "subject_key": by_id[i].subject_key,
                        "subject_key_id": self._key_id,
                        "occurred_at": occurred.get(key) or self._occurred(records, key),
                    }
                    for i in fresh
                    for key in dict.fromkeys(by_id[i].event_keys)
                ],
            )
            session.execute(
                sa.insert(Outbox), outbox_rows([outcome_payload(outcomes[i]) for i in fresh], now)
            )

    def retraction_context(self, notice: RetractionNotice) -> RetractionContext | None:
        source, event_id = split_key(notice.key)
        with self._sessions() as session:
            applied = session.scalar(
                sa.select(RetractionRow.source).where(
                    RetractionRow.source == source, RetractionRow.event_id == event_id
                )
            )
            if applied is not None:
                return None
            record = session.scalar(
                sa.select(EvaluatedEvent.record).where(
                    EvaluatedEvent.source == source, EvaluatedEvent.event_id == event_id
                )
            )
            if record is None:
                # Never evaluated (parked, or still failing): it caused nothing to reverse.
                return RetractionContext((), None)
            event = engine_event_from_record(record)
            # The subject's index bounds this; a subject has few outcomes per event.
            used_by = list(
                session.scalars(
                    sa.select(OutcomeEvent.outcome_id).where(
                        OutcomeEvent.subject_key == event.subject_key, OutcomeEvent.event_key == notice.key
                    )
                )
            )
            rules_of = {
                row.outcome_id: row.rule_id
                for row in session.execute(
                    sa.select(EmittedOutcome.outcome_id, EmittedOutcome.rule_id).where(
                        EmittedOutcome.outcome_id.in_(used_by), EmittedOutcome.reversed_at.is_(None)
                    )
                )
            }
            keys_of: dict[str, list[str]] = {}
            for outcome_id, key in session.execute(
                sa.select(OutcomeEvent.outcome_id, OutcomeEvent.event_key)
                .where(OutcomeEvent.outcome_id.in_(list(rules_of)))
                .order_by(OutcomeEvent.outcome_id, OutcomeEvent.occurred_at, OutcomeEvent.event_key)
            ):
                keys_of.setdefault(outcome_id, []).append(key)
        reversed_outcomes = tuple(
            ReversedOutcome(outcome_id, rules_of[outcome_id], tuple(keys_of.get(outcome_id, ())))
            for outcome_id in sorted(rules_of)
        )
        return RetractionContext(reversed_outcomes, event)

    def commit_retraction(
        self,
        notice: RetractionNotice,
        reversed_ids: Sequence[str],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        source, event_id = split_key(notice.key)
        retraction = due_process_pb2.Retraction.FromString(notice.record)
        try:
            with self._sessions() as session, session.begin():
                # First: a concurrent application of the same retraction fails here, on the key.
                session.execute(
                    sa.insert(RetractionRow).values(
                        source=source,
                        event_id=event_id,
                        subject_key=notice.subject_key,
                        subject_key_id=self._key_id,
                        applied_at=now,
                        reversed=len(reversed_ids) + len(evaluated.superseded),
                        reformed=len(evaluated.firings),
                        record=notice.record,
                    )
                )
                session.execute(
                    sa.update(EvaluatedEvent)
                    .where(EvaluatedEvent.source == source, EvaluatedEvent.event_id == event_id)
                    .values(retracted_at=now)
                )
                # A parked or failing copy of the event must never be redriven.
                session.execute(
                    sa.delete(DeadLetterRow).where(
                        DeadLetterRow.source == source, DeadLetterRow.event_id == event_id
                    )
                )
                ids = [*reversed_ids, *(s.outcome.outcome_id for s in evaluated.superseded)]
                self._supersede(
                    session,
                    [(i, reversal_payload(i, retraction, self._key_id)) for i in ids],
                    by=dict.fromkeys(ids, notice.key),
                    now=now,
                )
                self._emit(session, evaluated.firings, records, {}, rule_set=rule_set, now=now)
        except (IntegrityError, _Superseded):
            return False
        return True

    @staticmethod
    def _occurred(records: Mapping[str, bytes], key: str) -> datetime:
        return engine_event_from_record(records[key]).occurred_at

    def _record_failures(
        self,
        session: Session,
        failures: Sequence[Failure],
        records: Mapping[str, bytes],
        rule_set: RuleSet,
        now: datetime,
    ) -> None:
        keys = [f.event.key for f in failures]
        existing = {
            f"{r.source}/{r.event_id}": r.id
            for r in session.execute(
                sa.select(DeadLetterRow.id, DeadLetterRow.source, DeadLetterRow.event_id).where(
                    _key_filter(DeadLetterRow, keys)
                )
            )
        }
        new = [f for f in failures if f.event.key not in existing]
        if new:
            session.execute(
                sa.insert(DeadLetterRow),
                [
                    {
                        "source": split_key(f.event.key)[0],
                        "event_id": split_key(f.event.key)[1],
                        "subject_key": f.event.subject_key,
                        "subject_key_id": self._key_id,
                        "occurred_at": f.event.occurred_at,
                        "attempts": f.attempts,
                        "reason": f.reason,
                        "rule_set": rule_set.name,
                        "rule_set_version": rule_set.version,
                        "first_failed_at": now,
                        "last_failed_at": now,
                        "parked_at": now if f.parked else None,
                        "record": records[f.event.key],
                    }
                    for f in new
                ],
            )
        table = cast(sa.Table, DeadLetterRow.__table__)
        again = [f for f in failures if f.event.key in existing]
        if again:
            # Executemany of one UPDATE keyed by id: COALESCE keeps the first parking time.
            session.connection().execute(
                sa.update(table)
                .where(table.c.id == sa.bindparam("b_id"))
                .values(
                    attempts=sa.bindparam("b_attempts"),
                    reason=sa.bindparam("b_reason"),
                    rule_set=rule_set.name,
                    rule_set_version=rule_set.version,
                    last_failed_at=now,
                    parked_at=sa.func.coalesce(table.c.parked_at, sa.bindparam("b_parked_at")),
                ),
                [
                    {
                        "b_id": existing[f.event.key],
                        "b_attempts": f.attempts,
                        "b_reason": f.reason,
                        "b_parked_at": now if f.parked else None,
                    }
                    for f in again
                ],
            )

    @staticmethod
    def _reissued(session: Session, firings: Sequence[Firing]) -> list[Firing]:
        """The firings, each whose id belongs to a reversed outcome under the next id of
        its line (reissued_id): the same events can form an outcome again after it was
        reversed (a late event regrouped them, then was retracted), and a reversed id
        must stay reversed at score. An id already active stays as it is (a redelivery)."""
        result = list(firings)
        originals = {i: f.outcome_id for i, f in enumerate(result)}
        current = dict(originals)
        generation = 0
        while current:
            reversed_ids: set[str] = set()
            for chunk in _chunks(list(set(current.values()))):
                reversed_ids.update(
                    session.scalars(
                        sa.select(EmittedOutcome.outcome_id).where(
                            EmittedOutcome.outcome_id.in_(chunk), EmittedOutcome.reversed_at.is_not(None)
                        )
                    )
                )
            generation += 1
            current = {
                i: reissued_id(originals[i], generation) for i, oid in current.items() if oid in reversed_ids
            }
            for i, oid in current.items():
                result[i] = dataclasses.replace(result[i], outcome_id=oid)
        return result

    @staticmethod
    def _not_yet_emitted(session: Session, outcome_ids: list[str]) -> list[str]:
        if not outcome_ids:
            return []
        existing: set[str] = set()
        for chunk in _chunks(outcome_ids):
            existing.update(
                session.scalars(
                    sa.select(EmittedOutcome.outcome_id).where(EmittedOutcome.outcome_id.in_(chunk))
                )
            )
        return [i for i in outcome_ids if i not in existing]

    def dead_letters(self, ids: Sequence[int]) -> Sequence[DeadLetter]:
        if not ids:
            return []
        with self._sessions() as session:
            rows = session.scalars(
                sa.select(DeadLetterRow)
                .where(DeadLetterRow.id.in_(list(ids)), DeadLetterRow.parked_at.is_not(None))
                .order_by(DeadLetterRow.id)
            ).all()
            return [_dead_letter(r) for r in rows]

    def parked_count(self) -> int:
        with self._sessions() as session:
            query = sa.select(sa.func.count()).where(DeadLetterRow.parked_at.is_not(None))
            return int(session.scalar(query) or 0)

    def parked_ids(self, after: int | None, limit: int) -> Sequence[int]:
        with self._sessions() as session:
            query = sa.select(DeadLetterRow.id).where(DeadLetterRow.parked_at.is_not(None))
            if after is not None:
                query = query.where(DeadLetterRow.id > after)
            return list(session.scalars(query.order_by(DeadLetterRow.id).limit(limit)))

    def list_dead_letters(self, after: int | None, limit: int) -> Sequence[DeadLetter]:
        with self._sessions() as session:
            query = sa.select(DeadLetterRow).where(DeadLetterRow.parked_at.is_not(None))
            if after is not None:
                query = query.where(DeadLetterRow.id > after)
            rows = session.scalars(query.order_by(DeadLetterRow.id).limit(limit)).all()
            return [_dead_letter(r) for r in rows]


def _dead_letter(row: DeadLetterRow) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=row.id,
        event=engine_event_from_record(row.record),
        record=row.record,
        reason=row.reason,
        attempts=row.attempts,
        rule_set=row.rule_set,
        rule_set_version=row.rule_set_version,
        first_failed_at=as_utc(row.first_failed_at),
        last_failed_at=as_utc(row.last_failed_at),
        parked_at=as_utc(row.parked_at) if row.parked_at is not None else None,
    )


def _optional_utc(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def _stored(row: RuleSetRow, active_id: int | None, *, with_source: bool = True) -> StoredRuleSet:
    return StoredRuleSet(
        rule_set_id=row.id,
        name=row.name,
        version=row.version,
        state=cast(State, row.state),
        active=row.id == active_id,
        source=row.source if with_source else "",
        source_sha256=row.source_sha256,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        published_at=_optional_utc(row.published_at),
        published_by=row.published_by,
        activated_at=_optional_utc(row.activated_at),
        activated_by=row.activated_by,
        retired_at=_optional_utc(row.retired_at),
        retired_by=row.retired_by,
    )


class SqlLifecycleUnit:
    """One transaction of lifecycle changes (services.rules.lifecycle.LifecycleUnit)."""

    def __init__(self, session: Session, audit_keys: audit.AuditKeys) -> None:
        self._session = session
        self._audit_keys = audit_keys
        self._locking = session.get_bind().dialect.name == "postgresql"

    def get(self, rule_set_id: int, *, lock: bool = False) -> StoredRuleSet | None:
        query = sa.select(RuleSetRow).where(RuleSetRow.id == rule_set_id)
        if lock and self._locking:
            query = query.with_for_update()
        row = self._session.scalars(query).one_or_none()
        return None if row is None else _stored(row, self.active_id())

    def find_published(self, name: str, version: int) -> StoredRuleSet | None:
        row = self._session.scalars(
            sa.select(RuleSetRow).where(RuleSetRow.name == name, RuleSetRow.published_version == version)
        ).one_or_none()
        return None if row is None else _stored(row, self.active_id())

    def latest_published_version(self, name: str) -> int | None:
        return self._session.scalar(
            sa.select(sa.func.max(RuleSetRow.published_version)).where(RuleSetRow.name == name)
        )

    def active_id(self, *, lock: bool = False) -> int | None:
        query = sa.select(RuleSetActive.rule_set_id).where(RuleSetActive.slot == _ACTIVE_SLOT)
        if lock and self._locking:
            query = query.with_for_update()
        return self._session.scalar(query)

    def add_draft(self, rule_set: RuleSet, source: str, actor: str, now: datetime) -> int:
        row = RuleSetRow(
            name=rule_set.name,
            version=rule_set.version,
            published_version=None,
            state="draft",
            source=source,
            source_sha256=source_sha256(source),
            created_at=now,
            created_by=actor,
        )
        self._session.add(row)
        self._session.flush()
        return row.id

    def mark_published(self, rule_set_id: int, actor: str, now: datetime) -> None:
        self._session.execute(
            sa.update(RuleSetRow)
            .where(RuleSetRow.id == rule_set_id)
            .values(
                state="published", published_version=RuleSetRow.version, published_at=now, published_by=actor
            )
        )
        self._session.flush()

    def set_active(self, rule_set_id: int, actor: str, now: datetime) -> None:
        values = {"rule_set_id": rule_set_id, "activated_at": now, "activated_by": actor}
        updated = self._session.execute(
            sa.update(RuleSetActive).where(RuleSetActive.slot == _ACTIVE_SLOT).values(**values)
        )
        if cast(Any, updated).rowcount == 0:
            # The first activation; a concurrent first one fails on the primary key.
            self._session.execute(sa.insert(RuleSetActive).values(slot=_ACTIVE_SLOT, **values))
        self._session.execute(
            sa.update(RuleSetRow)
            .where(RuleSetRow.id == rule_set_id)
            .values(activated_at=now, activated_by=actor)
        )
        self._session.flush()

    def mark_retired(self, rule_set_id: int, actor: str, now: datetime) -> None:
        self._session.execute(
            sa.update(RuleSetRow)
            .where(RuleSetRow.id == rule_set_id)
            .values(state="retired", retired_at=now, retired_by=actor)
        )
        self._session.flush()

    def record(self, change: Change) -> None:
        _record(self._session, change, self._audit_keys)


# Each lifecycle change is also an act of rules' audit log.
_AUDIT_ACTIONS: Final = {
    "create_draft": "ruleset.draft",
    "publish": "ruleset.publish",
    "activate": "ruleset.activate",
    "retire": "ruleset.retire",
    "import": "ruleset.import",
    "redrive": "deadletter.redrive",
}


def audit_record(change: Change) -> AuditRecord:
    """The audit record of a lifecycle change: the authenticated principal when there is one;
    the service itself ("system:...") at start-up; else the claimed actor."""
    action = _AUDIT_ACTIONS[change.action]
    target = f"rule_set:{change.rule_set_id}" if change.rule_set_id is not None else "dead_letters"
    detail = dict(change.detail)
    if current_principal() is None and change.actor.startswith("system:"):
        return AuditRecord(action, change.actor, "system", change.at, target=target, detail=detail)
    return audit.record(action, change.at, target=target, detail=detail, claimed_actor=change.actor)


def _record(session: Session, change: Change, audit_keys: audit.AuditKeys) -> None:
    """The change row and its audit record, in the caller's transaction."""
    audit.append(session, RulesAuditLog, RulesAuditHead, [audit_record(change)], keys=audit_keys)
    session.execute(
        sa.insert(RuleSetChangeRow).values(
            rule_set_id=change.rule_set_id,
            action=change.action,
            actor=change.actor,
            changed_at=change.at,
            detail=json.dumps(dict(change.detail), sort_keys=True, default=str),
        )
    )


class SqlLifecycleStore:
    """Rule sets, the active pointer and the audit trail (services.rules.lifecycle.LifecycleStore)."""

    def __init__(self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys

    @contextmanager
    def unit(self) -> Iterator[SqlLifecycleUnit]:
        try:
            with self._sessions() as session, session.begin():
                yield SqlLifecycleUnit(session, self._audit_keys)
        except IntegrityError as error:
            # Two changes raced (two publications of one version, two first activations).
            raise FailedPrecondition("a concurrent change to the rule sets won; read them again") from error

    def get(self, rule_set_id: int) -> StoredRuleSet | None:
        with self._sessions() as session:
            return SqlLifecycleUnit(session, self._audit_keys).get(rule_set_id)

    def active(self) -> ActivePointer | None:
        """One primary-key read: every batch calls it to notice an activation."""
        with self._sessions() as session:
            row = session.execute(
                sa.select(RuleSetActive.rule_set_id, RuleSetActive.activated_at).where(
                    RuleSetActive.slot == _ACTIVE_SLOT
                )
            ).one_or_none()
        return None if row is None else ActivePointer(row.rule_set_id, as_utc(row.activated_at))

    def list(
        self, *, after: int | None, limit: int, name: str | None, status: Status | None
    ) -> Sequence[StoredRuleSet]:
        with self._sessions() as session:
            active_id = SqlLifecycleUnit(session, self._audit_keys).active_id()
            query = sa.select(RuleSetRow)
            if after is not None:
                query = query.where(RuleSetRow.id > after)
            if name:
                query = query.where(RuleSetRow.name == name)
            if status == "active":
                query = query.where(RuleSetRow.id == (active_id if active_id is not None else -1))
            elif status is not None:
                query = query.where(RuleSetRow.state == status)
                if status == "published" and active_id is not None:
                    query = query.where(RuleSetRow.id != active_id)
            rows = session.scalars(query.order_by(RuleSetRow.id).limit(limit)).all()
            return [_stored(r, active_id, with_source=False) for r in rows]

    def changes(self, *, rule_set_id: int | None, after: int | None, limit: int) -> Sequence[RecordedChange]:
        with self._sessions() as session:
            query = sa.select(RuleSetChangeRow)
            if rule_set_id is not None:
                query = query.where(RuleSetChangeRow.rule_set_id == rule_set_id)
            if after is not None:
                query = query.where(RuleSetChangeRow.id > after)
            rows = session.scalars(query.order_by(RuleSetChangeRow.id).limit(limit)).all()
            return [
                RecordedChange(
                    r.id,
                    Change(
                        rule_set_id=r.rule_set_id,
                        action=cast(Any, r.action),
                        actor=r.actor,
                        at=as_utc(r.changed_at),
                        detail=json.loads(r.detail),
                    ),
                )
                for r in rows
            ]

    def record(self, change: Change) -> None:
        with self._sessions() as session, session.begin():
            _record(session, change, self._audit_keys)
