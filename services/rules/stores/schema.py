"""Rules' tables (the ORM schema the migrations create) and the subject keys they store.

Every stored subject key has its generation next to it (`subject_key_id`; NULL in rows
from before generations were recorded: the root generation), and every key written is
of the instance's current generation; `KEYED` is what the re-keying job moves (kit.rekey,
docs/security.md "Rotating the subject key"). The audit log and the outbox keep the keys
they were written with (an outcome's outbox row has no copy: it refers to the outcome).

Subject keys, outcome ids and digests are `Hex` and every instant an `Instant`
(kit.columns, migration 0016): the growing tables repeat them in every row and index.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, cast

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from egret.common.v1 import due_process_pb2
from kit.audit import AuditHeadMixin, AuditMixin
from kit.columns import Hex, Instant
from kit.db import make_metadata
from kit.outbox import BigId, OutboxLeaseMixin, OutboxMixin
from kit.packing import Packed
from kit.rekey import GenerationMixin, KeyedColumn, KeyedStore, rewrite_outcome, rewrite_recorded_event


class Base(DeclarativeBase):
    metadata = make_metadata()


class EvaluatedEvent(Base):
    """An event rules has evaluated (the inbox), with its record for later replays and as history."""

    __tablename__ = "rules_evaluated_events"
    # History reads one subject's events within an event-time range.
    __table_args__ = (sa.Index("ix_rules_evaluated_events_subject_time", "subject_key", "occurred_at"),)

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    event_type: Mapped[str] = mapped_column(sa.String(128))
    occurred_at: Mapped[datetime] = mapped_column(Instant())
    evaluated_at: Mapped[datetime] = mapped_column(Instant())
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    record: Mapped[bytes] = mapped_column(Packed)
    # Set when the department retracted the event: it stays for the record but takes part
    # in no later window, sequence, cap or history read (backtests skip it too).
    retracted_at: Mapped[datetime | None] = mapped_column(Instant())


class EmittedOutcome(Base):
    """An outcome rules emitted: the rules-side record of every firing."""

    __tablename__ = "rules_outcomes"

    outcome_id: Mapped[str] = mapped_column(Hex(), primary_key=True)
    # Not indexed: outcomes are read by id; a subject's are found through
    # rules_outcome_events (migration 0012 dropped the index no query used).
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    rule_id: Mapped[str] = mapped_column(sa.String(128))
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    points: Mapped[int] = mapped_column(sa.Integer)
    occurred_at: Mapped[datetime] = mapped_column(Instant())
    emitted_at: Mapped[datetime] = mapped_column(Instant())
    outcome: Mapped[bytes] = mapped_column(Packed)
    # Set when a retraction of one of its events reversed it (reversed_by: that event's key).
    reversed_at: Mapped[datetime | None] = mapped_column(Instant())
    reversed_by: Mapped[str | None] = mapped_column(sa.String(193))


class OutcomeEvent(Base):
    """Which events an outcome used, so that a rule never counts one event in two windows."""

    __tablename__ = "rules_outcome_events"
    __table_args__ = (sa.Index("ix_rules_outcome_events_subject_time", "subject_key", "occurred_at"),)

    outcome_id: Mapped[str] = mapped_column(Hex(), primary_key=True)
    event_key: Mapped[str] = mapped_column(sa.String(193), primary_key=True)
    # The rule is the outcome's (rules_outcomes.rule_id, read by a join; migration 0013).
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    # The event's occurred_at, so consumed keys are read within the same lookback as history.
    occurred_at: Mapped[datetime] = mapped_column(Instant())


class RetractionRow(Base):
    """A retraction rules has applied (the inbox of retractions): applied once, whatever
    the redeliveries. Also keeps an event that arrives after its retraction from being
    evaluated."""

    __tablename__ = "rules_retractions"

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    applied_at: Mapped[datetime] = mapped_column(Instant())
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
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    occurred_at: Mapped[datetime] = mapped_column(Instant())
    attempts: Mapped[int] = mapped_column(sa.Integer)
    reason: Mapped[str] = mapped_column(sa.Text)
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    first_failed_at: Mapped[datetime] = mapped_column(Instant())
    last_failed_at: Mapped[datetime] = mapped_column(Instant())
    parked_at: Mapped[datetime | None] = mapped_column(Instant(), index=True)
    record: Mapped[bytes] = mapped_column(Packed)


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
    source_sha256: Mapped[str] = mapped_column(Hex())
    created_at: Mapped[datetime] = mapped_column(Instant())
    created_by: Mapped[str] = mapped_column(sa.String(128))
    published_at: Mapped[datetime | None] = mapped_column(Instant())
    published_by: Mapped[str | None] = mapped_column(sa.String(128))
    activated_at: Mapped[datetime | None] = mapped_column(Instant())
    activated_by: Mapped[str | None] = mapped_column(sa.String(128))
    retired_at: Mapped[datetime | None] = mapped_column(Instant())
    retired_by: Mapped[str | None] = mapped_column(sa.String(128))


class RuleSetActive(Base):
    """The one active rule set: a single row, read by every batch and swapped by ActivateRuleSet."""

    __tablename__ = "rules_active_rule_set"

    slot: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    rule_set_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("rules_rule_sets.id"))
    activated_at: Mapped[datetime] = mapped_column(Instant())
    activated_by: Mapped[str] = mapped_column(sa.String(128))


class RuleSetChangeRow(Base):
    """The audit trail: who changed which rule set, when, and how."""

    __tablename__ = "rules_rule_set_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rule_set_id: Mapped[int | None] = mapped_column(BigId, sa.ForeignKey("rules_rule_sets.id"), index=True)
    action: Mapped[str] = mapped_column(sa.String(32))
    actor: Mapped[str] = mapped_column(sa.String(128))
    changed_at: Mapped[datetime] = mapped_column(Instant())
    detail: Mapped[str] = mapped_column(sa.Text)


class RulesAuditLog(Base, AuditMixin):
    """The hash-chained audit log of rules' audited acts: rule-set lifecycle changes and
    dead-letter redrives (the rule-set change table stays, for ListRuleSetChanges)."""

    __tablename__ = "rules_audit_log"


class RulesAuditHead(Base, AuditHeadMixin):
    __tablename__ = "rules_audit_head"


class Outbox(Base, OutboxMixin):
    """Outcomes and reversals waiting to be relayed to the score service: one serialized
    ApplyOutcomesRequest per row. An outcome's row refers to its rules_outcomes row, whose
    bytes are the outcome's only copy, and leaves its payload empty; the relay reads them
    there (services.rules.stores.outbox.stored_payloads). A reversal's row has its payload."""

    __tablename__ = "rules_outbox"

    # No foreign key: outcomes are never deleted, and SQLite would not enforce one anyway.
    outcome_id: Mapped[str | None] = mapped_column(Hex())


class OutboxLease(Base, OutboxLeaseMixin):
    """Which relay is sending the outbox, and until when (kit.outbox_lease)."""

    __tablename__ = "rules_outbox_leases"


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
    started_at: Mapped[datetime] = mapped_column(Instant())
    heartbeat_at: Mapped[datetime] = mapped_column(Instant())
    finished_at: Mapped[datetime | None] = mapped_column(Instant())
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


def table_of(model: type[Base]) -> sa.Table:
    """The Core table of a model, for bulk statements."""
    return cast(sa.Table, model.__table__)


# Every stored subject key of rules, with the stored messages that embed it.
KEYED: Final = KeyedStore(
    RulesSubjectKeyGeneration,
    [
        KeyedColumn(table_of(EvaluatedEvent), payload="record", rewrite=rewrite_recorded_event),
        KeyedColumn(table_of(EmittedOutcome), payload="outcome", rewrite=rewrite_outcome),
        KeyedColumn(table_of(OutcomeEvent)),
        KeyedColumn(table_of(RetractionRow), payload="record", rewrite=rewrite_retraction),
        KeyedColumn(table_of(DeadLetterRow), payload="record", rewrite=rewrite_recorded_event),
    ],
    RulesAuditLog,
    RulesAuditHead,
)
