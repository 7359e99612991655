"""Score's store: the ledger, each subject's score and its per-category breakdown, and
due process (disputes, repairs, reversals, consent) with its audit log.

This module owns the schema of the score database (migrations under
services/score/migrations); the query service reads the same tables through these
models and the functions below (`load_entries`, `load_entry_facts`, `consent_at`,
`dispute_record`, `repair_record`) and never writes them.

Tables:
- score_ledger: one row per entry (an outcome), immutable except `status` (what reads
  show: active, disputed, repaired, reversed) and `visible_until` (rewritten when the
  policy's period changes);
- score_subjects / score_categories: each subject's score as last computed (a cache);
- score_history: every change of score, tier or lists, and every due-process act;
- score_policies: every activated policy;
- score_disputes, score_repairs: disputes and repair applications, updated once when
  decided;
- score_reversals: source corrections, keyed by outcome id (a row may precede its
  outcome: the outcome is then reversed on arrival);
- score_consents: consent records, append-only (`consent_at`);
- score_audit_log / score_audit_head: the hash-chained audit log (kit.audit);
- score_subject_key_generation: the generation of the stored subject keys (kit.rekey).

Every stored subject key has its generation next to it (`subject_key_id`; NULL in rows
written before generations were recorded: the root generation), except in the audit log,
whose records keep the key they were written with (docs/security.md, "Rotating the
subject key"). `KEYED` lists them for the re-keying job.

Whether an entry counts at an instant is never stored: it is derived from the entry, its
disputes, repairs and reversals (`domain.entries.pauses_of`, `counts_at`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from domain.consent import Consent
from domain.entries import (
    OPEN,
    PENDING,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    LedgerEntry,
    RepairRecord,
    ReversalRecord,
    RuleRef,
    ScoredEntry,
    pauses_of,
)
from domain.intake import MAX_CATEGORY_LENGTH, MAX_ID_LENGTH, MAX_SUBJECT_KEY_LENGTH
from domain.policy import ActivatedPolicy, policy_from_text
from domain.scoring import ScoreState, list_names
from egret.common.v1 import outcome_pb2
from kit import audit
from kit.audit import AuditHeadMixin, AuditMixin
from kit.db import as_utc, make_metadata
from kit.rekey import GenerationMixin, KeyedColumn, KeyedStore, rewrite_outcome
from services.score.due_process import Audited
from services.score.ledger import Recorded, Rescore, Rescored, Reversed, SubjectLedger

# As long as kit.rekey's marker allows.
MAX_KEY_ID_LENGTH = 32


class Base(DeclarativeBase):
    metadata = make_metadata()


class StoredEntry(Base):
    """One ledger entry; `outcome` is the serialized egret.common.v1.Outcome, the evidence snapshot."""

    __tablename__ = "score_ledger"
    # Serves both "all entries of a subject" and ListEntries' newest-first keyset pages.
    __table_args__ = (sa.Index("ix_score_ledger_subject_key", "subject_key", "occurred_at", "entry_id"),)

    entry_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    rule_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    rule_set: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    rule_title: Mapped[str] = mapped_column(sa.Text)
    rule_description: Mapped[str] = mapped_column(sa.Text)
    legal_basis: Mapped[str] = mapped_column(sa.Text)
    points: Mapped[int] = mapped_column(sa.Integer)
    category: Mapped[str] = mapped_column(sa.String(MAX_CATEGORY_LENGTH))
    severity: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    visible_until: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(sa.Text)
    black_list: Mapped[bool] = mapped_column(sa.Boolean)
    outcome: Mapped[bytes] = mapped_column(sa.LargeBinary)


class StoredScore(Base):
    """A subject's score as last recomputed from its ledger, as of `updated_at`.

    `next_change_at` is when it next changes with no new entry (an entry's visible_until):
    until then readers may serve this row as the current score; the expiry sweep
    recomputes rows whose instant has passed.
    """

    __tablename__ = "score_subjects"

    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH), primary_key=True)
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    score: Mapped[int] = mapped_column(sa.Integer)
    tier: Mapped[str] = mapped_column(sa.String(32))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    next_change_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True), index=True)
    red_list: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    black_list: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    # JSON [[list, [reasons], [entry ids]], ...]: why the subject is on each list.
    list_reasons: Mapped[str] = mapped_column(sa.Text, server_default="[]")


class StoredHistory(Base):
    """One change of a subject's score, tier or list membership, at the instant it took
    effect, with the entries that caused it. Append-only."""

    __tablename__ = "score_history"
    __table_args__ = (sa.Index("ix_score_history_subject_key", "subject_key", "history_id"),)

    history_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    changed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    cause: Mapped[str] = mapped_column(sa.String(16))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    score_before: Mapped[int | None] = mapped_column(sa.Integer)
    score: Mapped[int] = mapped_column(sa.Integer)
    tier_before: Mapped[str | None] = mapped_column(sa.String(32))
    tier: Mapped[str] = mapped_column(sa.String(32))
    # Comma-separated list names ("red", "black"), before and after.
    lists_before: Mapped[str | None] = mapped_column(sa.String(32))
    lists: Mapped[str] = mapped_column(sa.String(32))
    # JSON arrays of entry ids.
    added_entry_ids: Mapped[str] = mapped_column(sa.Text)
    expired_entry_ids: Mapped[str] = mapped_column(sa.Text)
    # Entries that stopped counting by a decision, a correction or a dispute's lapse, and
    # those that count again (a dispute upheld after its deadline); JSON arrays.
    ended_entry_ids: Mapped[str] = mapped_column(sa.Text, server_default="[]")
    resumed_entry_ids: Mapped[str] = mapped_column(sa.Text, server_default="[]")
    # What happened, e.g. "dispute 7 filed", "event library/ev-9 retracted".
    note: Mapped[str] = mapped_column(sa.Text, server_default="")


class StoredDispute(Base):
    """A dispute of one entry. Open until a reviewer decides it (upheld or overturned);
    open past `deadline`, the entry does not count from the deadline until the decision.
    An overturned dispute reverses the entry from `resolved_at` on."""

    __tablename__ = "score_disputes"
    __table_args__ = (
        sa.Index("ix_score_disputes_entry_id", "entry_id"),
        sa.Index("ix_score_disputes_subject_key", "subject_key"),
        sa.Index("ix_score_disputes_status_deadline", "status", "deadline"),
        sa.Index("ix_score_disputes_assignee_deadline", "assignee", "deadline"),
    )

    dispute_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    entry_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    statement: Mapped[str] = mapped_column(sa.Text)
    filed_by: Mapped[str] = mapped_column(sa.String(256))
    filed_by_role: Mapped[str] = mapped_column(sa.String(32))
    filed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    deadline: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    # open, upheld, overturned
    status: Mapped[str] = mapped_column(sa.String(16))
    resolution_reason: Mapped[str] = mapped_column(sa.Text, server_default="")
    resolved_by: Mapped[str] = mapped_column(sa.String(256), server_default="")
    resolved_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    # The reviewer holding it (principal id, never a subject's), "" while no one does.
    assignee: Mapped[str] = mapped_column(sa.String(256), server_default="")
    assigned_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class StoredRepair(Base):
    """A credit repair application. Pending until decided; approved, the entry does not
    count from `decided_at` on. Overdue (pending past `decision_due`) is computed at read."""

    __tablename__ = "score_repairs"
    __table_args__ = (
        sa.Index("ix_score_repairs_entry_id", "entry_id"),
        sa.Index("ix_score_repairs_subject_key", "subject_key"),
        sa.Index("ix_score_repairs_status_decision_due", "status", "decision_due"),
    )

    application_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    entry_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    evidence: Mapped[str] = mapped_column(sa.Text)
    evidence_uri: Mapped[str] = mapped_column(sa.Text)
    applied_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    decision_due: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    # pending, approved, rejected
    status: Mapped[str] = mapped_column(sa.String(16))
    decision_reason: Mapped[str] = mapped_column(sa.Text, server_default="")
    decided_by: Mapped[str] = mapped_column(sa.String(256), server_default="")
    decided_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class StoredReversal(Base):
    """The reversal of one outcome by a source's retraction, from `reversed_at` (when
    score learned it) on; on the corrected timeline the entry never counted. Keyed by
    outcome id, so a redelivered reversal has no effect; a row whose outcome is not in
    score_ledger yet reverses it when it arrives."""

    __tablename__ = "score_reversals"
    __table_args__ = (sa.Index("ix_score_reversals_subject_key", "subject_key"),)

    outcome_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH), primary_key=True)
    # As the retraction names it; the entry's own subject key decides.
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    source: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    event_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    reason: Mapped[str] = mapped_column(sa.Text)
    retracted_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    retracted_by: Mapped[str] = mapped_column(sa.String(256))
    reversed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    # RETRACTION or REGROUPED (domain/entries.py).
    cause: Mapped[str] = mapped_column(sa.String(16), server_default="retraction")


class StoredConsent(Base):
    """A subject's consent (granted) or its withdrawal, from `effective_at` on.
    Append-only; the record in force at an instant is `consent_at`'s."""

    __tablename__ = "score_consents"
    __table_args__ = (sa.Index("ix_score_consents_subject_key", "subject_key", "effective_at", "consent_id"),)

    consent_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    granted: Mapped[bool] = mapped_column(sa.Boolean)
    effective_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    recorded_by: Mapped[str] = mapped_column(sa.String(256))


class ScoreAuditLog(Base, AuditMixin):
    """Score's audit log: disputes, repairs, consent, reversals, policy activations."""

    __tablename__ = "score_audit_log"


class ScoreAuditHead(Base, AuditHeadMixin):
    __tablename__ = "score_audit_head"


class StoredPolicy(Base):
    """Every score policy ever activated, with who activated it and when; the latest is in
    force. Kept whole so any past instant is scored under the policy of its time."""

    __tablename__ = "score_policies"

    version: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    activated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    activated_by: Mapped[str] = mapped_column(sa.String(256))
    document: Mapped[str] = mapped_column(sa.Text)


class StoredCategory(Base):
    """The points one category contributes to a subject's stored score."""

    __tablename__ = "score_categories"

    # No foreign key to score_subjects: the re-keying job moves each table's keys in its
    # own transactions (kit.rekey), which a key referencing the other table would refuse.
    # Categories are rewritten whole with their subject's row (_store_scores).
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH), primary_key=True)
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    category: Mapped[str] = mapped_column(sa.String(MAX_CATEGORY_LENGTH), primary_key=True)
    points: Mapped[int] = mapped_column(sa.Integer)
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    # Positive points of counting entries withheld by the category's cap.
    capped: Mapped[int] = mapped_column(sa.Integer, server_default="0")


class ScoreSubjectKeyGeneration(Base, GenerationMixin):
    """The generation score's stored subject keys are in (kit.rekey's marker)."""

    __tablename__ = "score_subject_key_generation"


# What the re-keying job moves: every stored subject key but the audit log's.
KEYED = KeyedStore(
    ScoreSubjectKeyGeneration,
    [
        KeyedColumn(StoredEntry.__table__, payload="outcome", rewrite=rewrite_outcome),  # type: ignore[arg-type]
        KeyedColumn(StoredScore.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredCategory.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredHistory.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredDispute.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredRepair.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredReversal.__table__),  # type: ignore[arg-type]
        KeyedColumn(StoredConsent.__table__),  # type: ignore[arg-type]
    ],
    ScoreAuditLog,
    ScoreAuditHead,
)


def entry_row(entry: LedgerEntry, key_id: str) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "subject_key": entry.subject_key,
        "subject_key_id": key_id,
        "subject_kind": entry.subject_kind,
        "rule_id": entry.rule.rule_id,
        "rule_set": entry.rule.rule_set,
        "rule_set_version": entry.rule.rule_set_version,
        "rule_title": entry.rule.title,
        "rule_description": entry.rule.description,
        "legal_basis": entry.rule.legal_basis,
        "points": entry.points,
        "category": entry.category,
        "severity": entry.severity,
        "status": entry.status.value,
        # SQLite drops the offset, so only UTC survives a round trip.
        "occurred_at": entry.occurred_at.astimezone(UTC),
        "recorded_at": entry.recorded_at.astimezone(UTC),
        "visible_until": entry.visible_until.astimezone(UTC),
        "reason": entry.reason,
        "black_list": entry.black_list,
        "outcome": entry.snapshot,
    }


def ledger_entry(row: StoredEntry) -> LedgerEntry:
    return LedgerEntry(
        entry_id=row.entry_id,
        subject_key=row.subject_key,
        subject_kind=row.subject_kind,
        rule=RuleRef(
            rule_id=row.rule_id,
            rule_set=row.rule_set,
            rule_set_version=row.rule_set_version,
            title=row.rule_title,
            description=row.rule_description,
            legal_basis=row.legal_basis,
        ),
        points=row.points,
        category=row.category,
        severity=row.severity,
        status=EntryStatus(row.status),
        occurred_at=as_utc(row.occurred_at),
        recorded_at=as_utc(row.recorded_at),
        visible_until=as_utc(row.visible_until),
        reason=row.reason,
        black_list=row.black_list,
        snapshot=row.outcome,
    )


_ENTRY_COLUMNS = (
    StoredEntry.subject_key,
    StoredEntry.entry_id,
    StoredEntry.points,
    StoredEntry.category,
    StoredEntry.severity,
    StoredEntry.status,
    StoredEntry.occurred_at,
    StoredEntry.recorded_at,
    StoredEntry.black_list,
)


def scored_entry(row: Any) -> ScoredEntry:
    return ScoredEntry(
        entry_id=row.entry_id,
        points=row.points,
        category=row.category,
        severity=row.severity,
        status=EntryStatus(row.status),
        occurred_at=as_utc(row.occurred_at),
        recorded_at=as_utc(row.recorded_at),
        black_list=row.black_list,
    )


def dispute_record(row: StoredDispute) -> DisputeRecord:
    return DisputeRecord(
        dispute_id=row.dispute_id,
        entry_id=row.entry_id,
        subject_key=row.subject_key,
        statement=row.statement,
        filed_by=row.filed_by,
        filed_by_role=row.filed_by_role,
        filed_at=as_utc(row.filed_at),
        deadline=as_utc(row.deadline),
        status=row.status,
        resolution_reason=row.resolution_reason,
        resolved_by=row.resolved_by,
        resolved_at=None if row.resolved_at is None else as_utc(row.resolved_at),
        assignee=row.assignee,
        assigned_at=None if row.assigned_at is None else as_utc(row.assigned_at),
    )


def repair_record(row: StoredRepair) -> RepairRecord:
    return RepairRecord(
        application_id=row.application_id,
        entry_id=row.entry_id,
        subject_key=row.subject_key,
        evidence=row.evidence,
        evidence_uri=row.evidence_uri,
        applied_at=as_utc(row.applied_at),
        decision_due=as_utc(row.decision_due),
        status=row.status,
        decision_reason=row.decision_reason,
        decided_by=row.decided_by,
        decided_at=None if row.decided_at is None else as_utc(row.decided_at),
    )


def reversal_record(row: StoredReversal) -> ReversalRecord:
    return ReversalRecord(
        outcome_id=row.outcome_id,
        subject_key=row.subject_key,
        source=row.source,
        event_id=row.event_id,
        reason=row.reason,
        retracted_at=None if row.retracted_at is None else as_utc(row.retracted_at),
        retracted_by=row.retracted_by,
        reversed_at=as_utc(row.reversed_at),
        cause=row.cause,
    )


def consent_record(row: StoredConsent) -> Consent:
    return Consent(
        subject_key=row.subject_key,
        granted=row.granted,
        effective_at=as_utc(row.effective_at),
        recorded_at=as_utc(row.recorded_at),
        recorded_by=row.recorded_by,
        consent_id=row.consent_id,
    )


@dataclass
class _DueFacts:
    disputes: list[DisputeRecord] = field(default_factory=list)
    repairs: list[RepairRecord] = field(default_factory=list)
    reversals: list[ReversalRecord] = field(default_factory=list)


def _due_facts(session: Session, keys: Sequence[str]) -> dict[str, _DueFacts]:
    """Disputes, repairs and reversals of the named subjects' entries, by entry id."""
    facts: dict[str, _DueFacts] = {}
    for d in session.scalars(
        sa.select(StoredDispute)
        .where(StoredDispute.subject_key.in_(list(keys)))
        .order_by(StoredDispute.dispute_id)
    ):
        facts.setdefault(d.entry_id, _DueFacts()).disputes.append(dispute_record(d))
    for r in session.scalars(
        sa.select(StoredRepair)
        .where(StoredRepair.subject_key.in_(list(keys)))
        .order_by(StoredRepair.application_id)
    ):
        facts.setdefault(r.entry_id, _DueFacts()).repairs.append(repair_record(r))
    # By the entry's subject, whatever subject key the retraction named.
    for v in session.scalars(
        sa.select(StoredReversal)
        .join(StoredEntry, StoredEntry.entry_id == StoredReversal.outcome_id)
        .where(StoredEntry.subject_key.in_(list(keys)))
    ):
        facts.setdefault(v.outcome_id, _DueFacts()).reversals.append(reversal_record(v))
    return facts


def load_entries(session: Session, keys: Sequence[str]) -> dict[str, list[ScoredEntry]]:
    """The scoring view of every entry of the named subjects, with its pauses (disputes
    past their deadline, approved repairs, reversals): what `compute_score` reads, on
    either timeline."""
    ledgers: dict[str, list[ScoredEntry]] = {key: [] for key in keys}
    rows = list(session.execute(sa.select(*_ENTRY_COLUMNS).where(StoredEntry.subject_key.in_(list(keys)))))
    due = _due_facts(session, keys) if rows else {}
    for row in rows:
        entry = scored_entry(row)
        facts = due.get(entry.entry_id)
        if facts is not None:
            entry = replace(entry, pauses=pauses_of(facts.disputes, facts.repairs, facts.reversals))
        ledgers[row.subject_key].append(entry)
    return ledgers


def load_entry_facts(session: Session, entry_id: str) -> EntryFacts | None:
    """One entry with its disputes, repair applications and reversals (oldest first) and
    the sources of its evidence events; None if there is no such entry."""
    row = session.get(StoredEntry, entry_id)
    if row is None:
        return None
    disputes = session.scalars(
        sa.select(StoredDispute).where(StoredDispute.entry_id == entry_id).order_by(StoredDispute.dispute_id)
    )
    repairs = session.scalars(
        sa.select(StoredRepair).where(StoredRepair.entry_id == entry_id).order_by(StoredRepair.application_id)
    )
    reversal = session.get(StoredReversal, entry_id)
    return EntryFacts(
        entry=ledger_entry(row),
        disputes=tuple(dispute_record(d) for d in disputes),
        repairs=tuple(repair_record(r) for r in repairs),
        reversals=() if reversal is None else (reversal_record(reversal),),
        sources=evidence_sources(row.outcome),
    )


def evidence_sources(snapshot: bytes) -> frozenset[str]:
    """The departments whose events an entry rests on (from its outcome snapshot)."""
    try:
        outcome = outcome_pb2.Outcome.FromString(snapshot)
    except Exception:  # a snapshot that does not parse names no source
        return frozenset()
    return frozenset(e.ref.source for e in outcome.events if e.ref.source)


def consent_at(session: Session, subject_key: str, at: datetime) -> Consent | None:
    """The consent in force for `subject_key` at `at`: the latest record effective at or
    before `at` (ties: the later recorded); None when the subject never consented by then.
    The same answer as `domain.consent.consent_in_force` over every record."""
    row = session.scalars(
        sa.select(StoredConsent)
        .where(StoredConsent.subject_key == subject_key, StoredConsent.effective_at <= at.astimezone(UTC))
        .order_by(StoredConsent.effective_at.desc(), StoredConsent.consent_id.desc())
        .limit(1)
    ).first()
    return None if row is None else consent_record(row)


def _state(row: StoredScore | Any) -> ScoreState | None:
    # A placeholder row (tier "") was created by _lock_subjects in this transaction.
    if row is None or not row.tier:
        return None
    return ScoreState(row.score, row.tier, bool(row.red_list), bool(row.black_list))


def load_policies(session: Session) -> list[ActivatedPolicy]:
    rows = session.scalars(sa.select(StoredPolicy).order_by(StoredPolicy.activated_at, StoredPolicy.version))
    return [
        ActivatedPolicy(
            policy=policy_from_text(r.document, source=f"stored policy {r.version}"),
            activated_at=as_utc(r.activated_at),
            activated_by=r.activated_by,
            document=r.document,
        )
        for r in rows
    ]


class SqlLedgerStore:
    """LedgerStore on SQLAlchemy: one transaction per batch, a fixed number of bulk statements.
    Keys are written as of generation `key_id` (the instance's current one)."""

    def __init__(self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys, key_id: str) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys
        self._key_id = key_id

    def tier_counts(self) -> dict[tuple[str, str], int]:
        """Subjects by (tier, subject kind), for the tiers gauge; placeholder rows (tier "")
        of a batch in flight are left out."""
        with self._sessions() as session:
            rows = session.execute(
                sa.select(StoredScore.tier, StoredScore.subject_kind, sa.func.count())
                .where(StoredScore.tier != "")
                .group_by(StoredScore.tier, StoredScore.subject_kind)
            ).all()
        return {(tier, kind): int(n) for tier, kind, n in rows}

    def record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        try:
            return self._record(entries, rescore)
        except IntegrityError:
            # A concurrent writer stored one of these ids between our read and our insert
            # (PostgreSQL with several replicas); the retry sees it as a duplicate.
            return self._record(entries, rescore)

    def _record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        with self._sessions() as session, session.begin():
            ids = [e.entry_id for e in entries]
            existing = set(
                session.scalars(sa.select(StoredEntry.entry_id).where(StoredEntry.entry_id.in_(ids)))
            )
            # Sorted, so that concurrent writers take row locks in the same order.
            fresh = sorted((e for e in entries if e.entry_id not in existing), key=lambda e: e.entry_id)
            if not fresh:
                return Recorded(applied=0, subjects_updated=0)
            waiting = set(
                session.scalars(
                    sa.select(StoredReversal.outcome_id).where(
                        StoredReversal.outcome_id.in_([e.entry_id for e in fresh])
                    )
                )
            )
            rows = [entry_row(e, self._key_id) for e in fresh]
            for row in rows:
                # Retracted before it arrived: reversed from the moment it is recorded.
                if row["entry_id"] in waiting:
                    row["status"] = EntryStatus.REVERSED.value
            session.execute(sa.insert(StoredEntry), rows)
            kinds = {e.subject_key: e.subject_kind for e in fresh}
            now = max(e.recorded_at for e in fresh).astimezone(UTC)
            _lock_subjects(session, kinds, now, self._key_id)
            _rescore_and_store(session, sorted(kinds), rescore, now, self._key_id)
        return Recorded(applied=len(fresh), subjects_updated=len(kinds))

    def recompute(self, subject_keys: Sequence[str], rescore: Rescore) -> int:
        with self._sessions() as session, session.begin():
            keys = list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.subject_key.in_(sorted(subject_keys)))
                    .order_by(StoredScore.subject_key)
                    .with_for_update()
                )
            )
            if keys:
                _rescore_and_store(session, keys, rescore, None, self._key_id)
            return len(keys)

    def due_subjects(self, now: datetime, limit: int) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.next_change_at <= now.astimezone(UTC))
                    .order_by(StoredScore.next_change_at)
                    .limit(limit)
                )
            )

    def subjects_not_on(self, policy_version: str, after: str, limit: int) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.policy_version != policy_version, StoredScore.subject_key > after)
                    .order_by(StoredScore.subject_key)
                    .limit(limit)
                )
            )

    def activations(self) -> list[ActivatedPolicy]:
        with self._sessions() as session:
            return load_policies(session)

    def save_activation(self, activation: ActivatedPolicy) -> None:
        with self._sessions() as session, session.begin():
            session.add(
                StoredPolicy(
                    version=activation.policy.version,
                    activated_at=activation.activated_at.astimezone(UTC),
                    activated_by=activation.activated_by,
                    document=activation.document,
                )
            )
            session.flush()
            append_audit(
                session,
                Audited(
                    "policy.activate",
                    None,
                    activation.policy.version,
                    {"activated_by": activation.activated_by},
                ),
                activation.activated_at,
                self._audit_keys,
                claimed_actor=activation.activated_by,
            )

    def reverse(
        self, reversals: Sequence[ReversalRecord], rescore: Callable[[Sequence[ReversalRecord]], Rescore]
    ) -> Reversed:
        with self._sessions() as session, session.begin():
            ids = sorted({r.outcome_id for r in reversals})
            known = set(
                session.scalars(
                    sa.select(StoredReversal.outcome_id).where(StoredReversal.outcome_id.in_(ids))
                )
            )
            fresh = sorted((r for r in reversals if r.outcome_id not in known), key=lambda r: r.outcome_id)
            if not fresh:
                return Reversed(0, 0)
            session.execute(sa.insert(StoredReversal), [_reversal_row(r, self._key_id) for r in fresh])
            entries = {
                row.entry_id: row.subject_key
                for row in session.execute(
                    sa.select(StoredEntry.entry_id, StoredEntry.subject_key).where(
                        StoredEntry.entry_id.in_([r.outcome_id for r in fresh])
                    )
                )
            }
            for r in fresh:
                append_audit(
                    session,
                    Audited(
                        "entry.reverse",
                        entries.get(r.outcome_id, r.subject_key),
                        r.outcome_id,
                        {
                            "event": r.event,
                            "cause": r.cause,
                            "reason": r.reason,
                            "retracted_by": r.retracted_by,
                            "entry_recorded": r.outcome_id in entries,
                        },
                    ),
                    r.reversed_at,
                    self._audit_keys,
                )
            applied = [
                replace(r, subject_key=entries[r.outcome_id]) for r in fresh if r.outcome_id in entries
            ]
            if not applied:
                return Reversed(0, 0)
            session.execute(
                sa.update(StoredEntry)
                .where(StoredEntry.entry_id.in_([r.outcome_id for r in applied]))
                .values(status=EntryStatus.REVERSED.value)
            )
            keys = sorted({r.subject_key for r in applied})
            locked = list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.subject_key.in_(keys))
                    .order_by(StoredScore.subject_key)
                    .with_for_update()
                )
            )
            now = max(r.reversed_at for r in applied).astimezone(UTC)
            _rescore_and_store(session, locked, rescore(applied), now, self._key_id)
            return Reversed(len(applied), len(locked))

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        after = ""
        while True:
            with self._sessions() as session:
                keys = list(
                    session.scalars(
                        sa.select(StoredEntry.subject_key)
                        .where(StoredEntry.subject_key > after)
                        .group_by(StoredEntry.subject_key)
                        .order_by(StoredEntry.subject_key)
                        .limit(page_size)
                    )
                )
                if not keys:
                    return
                # Score rows first, then entries: an entry recorded in between is newer than
                # the row and is left out by scoring as of the row's instant (Ledger.verify).
                stored = {
                    r.subject_key: r
                    for r in session.scalars(sa.select(StoredScore).where(StoredScore.subject_key.in_(keys)))
                }
                ledgers = load_entries(session, keys)
                kinds = {
                    r.subject_key: r.subject_kind
                    for r in session.execute(
                        sa.select(StoredEntry.subject_key, StoredEntry.subject_kind)
                        .where(StoredEntry.subject_key.in_(keys))
                        .distinct()
                    )
                }
            yield [_subject_ledger(key, kinds[key], stored.get(key), ledgers[key]) for key in keys]
            after = keys[-1]


def _subject_ledger(
    key: str, kind: str, row: StoredScore | None, entries: list[ScoredEntry]
) -> SubjectLedger:
    state = _state(row)
    return SubjectLedger(
        subject_key=key,
        subject_kind=row.subject_kind if row is not None else kind,
        stored=state,
        computed_at=as_utc(row.updated_at) if row is not None and state is not None else None,
        stored_policy_version=row.policy_version if row is not None else "",
        entries=tuple(entries),
    )


def _rescore_and_store(
    session: Session, keys: Sequence[str], rescore: Rescore, now: datetime | None, key_id: str
) -> None:
    """Rescore the (locked) subjects and write their rows, categories and history (keys of
    generation `key_id`)."""
    rows = {
        r.subject_key: r
        for r in session.scalars(sa.select(StoredScore).where(StoredScore.subject_key.in_(keys)))
    }
    ledgers = load_entries(session, keys)
    results: dict[str, Rescored] = {}
    for key in keys:
        row = rows[key]
        results[key] = rescore(_subject_ledger(key, row.subject_kind, row, ledgers[key]))
    _store_scores(session, results, now, key_id)


def _lock_subjects(session: Session, kinds: Mapping[str, str], now: datetime, key_id: str) -> None:
    """Create missing score rows and lock every affected one until commit.

    On PostgreSQL a concurrent batch for the same subject then waits here and
    recomputes after our commit, from a ledger that includes our entries, so the
    last score written always covers every entry. The placeholder values (tier "")
    are overwritten in this same transaction. An existing row is locked by a no-op
    update, so its stored state and instant survive to be compared with the new one.
    """
    rows = [
        {
            "subject_key": key,
            "subject_key_id": key_id,
            "subject_kind": kinds[key],
            "score": 0,
            "tier": "",
            "policy_version": "",
            "entry_count": 0,
            "updated_at": now,
        }
        for key in sorted(kinds)
    ]
    statement: sa.Insert
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(StoredScore)
        statement = pg.on_conflict_do_update(
            index_elements=["subject_key"], set_={"subject_kind": StoredScore.__table__.c.subject_kind}
        )
    else:
        lite = sqlite.insert(StoredScore)
        statement = lite.on_conflict_do_update(
            index_elements=["subject_key"], set_={"subject_kind": StoredScore.__table__.c.subject_kind}
        )
    session.execute(statement, rows)


def _lists_text(names: Sequence[str]) -> str:
    return ",".join(names)


def _store_scores(
    session: Session, results: Mapping[str, Rescored], now: datetime | None, key_id: str
) -> None:
    updates = []
    history = []
    periods = []
    written_at = now or datetime.now(UTC)
    for key, rescored in results.items():
        r = rescored.result
        assert r.as_of is not None
        updates.append(
            {
                "subject_key": key,
                "score": r.score,
                "tier": r.tier,
                "policy_version": r.policy_version,
                "entry_count": r.entry_count,
                "updated_at": r.as_of.astimezone(UTC),
                "next_change_at": None if r.next_change_at is None else r.next_change_at.astimezone(UTC),
                "red_list": r.state.red,
                "black_list": r.state.black,
                "list_reasons": json.dumps([[m.name, list(m.reasons), list(m.entry_ids)] for m in r.lists]),
            }
        )
        for c in rescored.changes:
            history.append(
                {
                    "subject_key": key,
                    "subject_key_id": key_id,
                    "changed_at": c.changed_at.astimezone(UTC),
                    "recorded_at": written_at,
                    "cause": c.cause,
                    "policy_version": c.after.policy_version,
                    "score_before": None if c.before is None else c.before.score,
                    "score": c.after.score,
                    "tier_before": None if c.before is None else c.before.tier,
                    "tier": c.after.tier,
                    "lists_before": None if c.before is None else _lists_text(list_names(c.before)),
                    "lists": _lists_text(list_names(c.after.state)),
                    "added_entry_ids": json.dumps(list(c.added_entry_ids)),
                    "expired_entry_ids": json.dumps(list(c.expired_entry_ids)),
                    "ended_entry_ids": json.dumps(list(c.ended_entry_ids)),
                    "resumed_entry_ids": json.dumps(list(c.resumed_entry_ids)),
                    "note": c.note,
                }
            )
        periods += [
            {"entry_id": i, "visible_until": v.astimezone(UTC)} for i, v in rescored.visible_until.items()
        ]
    session.execute(sa.update(StoredScore), updates)
    if history:
        session.execute(sa.insert(StoredHistory), history)
    if periods:
        session.execute(sa.update(StoredEntry), periods)
    session.execute(sa.delete(StoredCategory).where(StoredCategory.subject_key.in_(list(results))))
    categories = [
        {
            "subject_key": key,
            "subject_key_id": key_id,
            "category": c.category,
            "points": c.points,
            "entry_count": c.entry_count,
            "capped": c.capped,
        }
        for key, r in results.items()
        for c in r.result.categories
    ]
    if categories:
        session.execute(sa.insert(StoredCategory), categories)


def _reversal_row(r: ReversalRecord, key_id: str) -> dict[str, Any]:
    return {
        "outcome_id": r.outcome_id,
        "subject_key": r.subject_key,
        "subject_key_id": key_id,
        "source": r.source,
        "event_id": r.event_id,
        "reason": r.reason,
        "retracted_at": None if r.retracted_at is None else r.retracted_at.astimezone(UTC),
        "retracted_by": r.retracted_by,
        "reversed_at": r.reversed_at.astimezone(UTC),
        "cause": r.cause,
    }


def append_audit(
    session: Session, act: Audited, at: datetime, keys: audit.AuditKeys, *, claimed_actor: str = ""
) -> None:
    """Append one audit record, by the principal of the call being handled, in the
    session's transaction."""
    audit.append(
        session,
        ScoreAuditLog,
        ScoreAuditHead,
        [
            audit.record(
                act.action,
                at.astimezone(UTC),
                subject_key=act.subject_key,
                target=act.target,
                detail=act.detail,
                claimed_actor=claimed_actor,
            )
        ],
        keys=keys,
    )


class _SqlDueProcessTx:
    """DueProcessTx on one session in one transaction, writing keys of generation `key_id`."""

    def __init__(self, session: Session, audit_keys: audit.AuditKeys, key_id: str) -> None:
        self._session = session
        self._audit_keys = audit_keys
        self._key_id = key_id

    def entry(self, entry_id: str) -> EntryFacts | None:
        subject = self._session.scalar(
            sa.select(StoredEntry.subject_key).where(StoredEntry.entry_id == entry_id)
        )
        if subject is None:
            return None
        # Lock the subject's score row first, so acts on one subject serialize (PostgreSQL;
        # SQLite has one writer anyway) and facts read below are current.
        self._session.execute(
            sa.select(StoredScore.subject_key).where(StoredScore.subject_key == subject).with_for_update()
        ).all()
        return load_entry_facts(self._session, entry_id)

    def dispute(self, dispute_id: int) -> DisputeRecord | None:
        row = self._session.get(StoredDispute, dispute_id)
        return None if row is None else dispute_record(row)

    def repair(self, application_id: int) -> RepairRecord | None:
        row = self._session.get(StoredRepair, application_id)
        return None if row is None else repair_record(row)

    def add_dispute(self, dispute: DisputeRecord) -> DisputeRecord:
        row = StoredDispute(
            entry_id=dispute.entry_id,
            subject_key=dispute.subject_key,
            subject_key_id=self._key_id,
            statement=dispute.statement,
            filed_by=dispute.filed_by,
            filed_by_role=dispute.filed_by_role,
            filed_at=dispute.filed_at.astimezone(UTC),
            deadline=dispute.deadline.astimezone(UTC),
            status=dispute.status,
            resolution_reason="",
            resolved_by="",
        )
        self._session.add(row)
        self._session.flush()
        return replace(dispute, dispute_id=row.dispute_id)

    def save_dispute(self, dispute: DisputeRecord) -> None:
        self._session.execute(
            sa.update(StoredDispute)
            .where(StoredDispute.dispute_id == dispute.dispute_id)
            .values(
                status=dispute.status,
                resolution_reason=dispute.resolution_reason,
                resolved_by=dispute.resolved_by,
                resolved_at=None if dispute.resolved_at is None else dispute.resolved_at.astimezone(UTC),
                assignee=dispute.assignee,
                assigned_at=None if dispute.assigned_at is None else dispute.assigned_at.astimezone(UTC),
            )
        )

    def add_repair(self, repair: RepairRecord) -> RepairRecord:
        row = StoredRepair(
            entry_id=repair.entry_id,
            subject_key=repair.subject_key,
            subject_key_id=self._key_id,
            evidence=repair.evidence,
            evidence_uri=repair.evidence_uri,
            applied_at=repair.applied_at.astimezone(UTC),
            decision_due=repair.decision_due.astimezone(UTC),
            status=repair.status,
            decision_reason="",
            decided_by="",
        )
        self._session.add(row)
        self._session.flush()
        return replace(repair, application_id=row.application_id)

    def save_repair(self, repair: RepairRecord) -> None:
        self._session.execute(
            sa.update(StoredRepair)
            .where(StoredRepair.application_id == repair.application_id)
            .values(
                status=repair.status,
                decision_reason=repair.decision_reason,
                decided_by=repair.decided_by,
                decided_at=None if repair.decided_at is None else repair.decided_at.astimezone(UTC),
            )
        )

    def add_consent(self, consent: Consent) -> Consent:
        row = StoredConsent(
            subject_key=consent.subject_key,
            subject_key_id=self._key_id,
            granted=consent.granted,
            effective_at=consent.effective_at.astimezone(UTC),
            recorded_at=consent.recorded_at.astimezone(UTC),
            recorded_by=consent.recorded_by,
        )
        self._session.add(row)
        self._session.flush()
        return replace(consent, consent_id=row.consent_id)

    def stored_subject(self, subject_keys: Sequence[str]) -> str | None:
        known = set(
            self._session.scalars(
                sa.select(StoredScore.subject_key).where(StoredScore.subject_key.in_(subject_keys))
            )
        ) | set(
            self._session.scalars(
                sa.select(StoredConsent.subject_key)
                .where(StoredConsent.subject_key.in_(subject_keys))
                .distinct()
            )
        )
        return next((k for k in subject_keys if k in known), None)

    def set_status(self, entry_id: str, status: EntryStatus) -> None:
        self._session.execute(
            sa.update(StoredEntry).where(StoredEntry.entry_id == entry_id).values(status=status.value)
        )

    def rescore(self, subject_key: str, rescore: Rescore, now: datetime) -> None:
        _rescore_and_store(self._session, [subject_key], rescore, now.astimezone(UTC), self._key_id)

    def audit(self, act: Audited, at: datetime) -> None:
        append_audit(self._session, act, at, self._audit_keys)


class SqlDueProcessStore:
    """DueProcessStore on SQLAlchemy: one transaction per act, writing keys of generation `key_id`."""

    def __init__(self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys, key_id: str) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys
        self._key_id = key_id

    @contextmanager
    def transaction(self) -> Iterator[_SqlDueProcessTx]:
        with self._sessions() as session, session.begin():
            yield _SqlDueProcessTx(session, self._audit_keys, self._key_id)

    def queue_counts(self, now: datetime) -> tuple[int, int, int]:
        """Disputes open, disputes open past their deadline, repair decisions overdue (the
        due-process gauges; each an indexed count)."""
        at = now.astimezone(UTC)
        with self._sessions() as session:
            open_ = sa.select(sa.func.count()).where(StoredDispute.status == OPEN)
            overdue = open_.where(StoredDispute.deadline < at)
            repairs = sa.select(sa.func.count()).where(
                StoredRepair.status == PENDING, StoredRepair.decision_due < at
            )
            return (
                int(session.scalar(open_) or 0),
                int(session.scalar(overdue) or 0),
                int(session.scalar(repairs) or 0),
            )

    def overdue_repairs(self, now: datetime, limit: int) -> list[RepairRecord]:
        with self._sessions() as session:
            rows = session.scalars(
                sa.select(StoredRepair)
                .where(StoredRepair.status == PENDING, StoredRepair.decision_due < now.astimezone(UTC))
                .order_by(StoredRepair.decision_due)
                .limit(limit)
            )
            return [repair_record(r) for r in rows]

    def consent_at(self, subject_key: str, at: datetime) -> Consent | None:
        with self._sessions() as session:
            return consent_at(session, subject_key, at)
