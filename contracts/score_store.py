"""Score's store as a published read contract: the tables of the score database and the
mappers from their rows to domain values.

Score owns it: score's migrations (services/score/migrations) create exactly these tables,
and tests/integration/test_score_store_contract.py fails when they drift apart. Score's
stores write through these models; the query service reads the same tables through them
(`load_entries`, `consent_at`, `dispute_record`, ...) and never writes them. One idea, the
schema with its reading, which is why the module is this long (docs/adr/0003).

Tables:
- score_ledger: one row per entry (an outcome), immutable except `status` (what reads
  show: active, disputed, repaired, reversed) and `visible_until` (rewritten when the
  policy's period changes); the rule's texts and the reason are in its `outcome`;
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
subject key").

Subject keys and entry (outcome) ids are stored as the bytes their hex spells, instants as
kit.columns.Instant (score migration 0011, issue 18): readers bind and read them as before,
hex strings and aware UTC datetimes; a key or id that is not lowercase hex cannot be bound
(kit.columns.NotHex), so callers check what they are given first (domain.intake.is_hex).

Whether an entry counts at an instant is never stored: it is derived from the entry, its
disputes, repairs and reversals (`domain.entries.pauses_of`, `counts_at`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from domain.consent import Consent
from domain.entries import (
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
from domain.intake import MAX_CATEGORY_LENGTH, MAX_ID_LENGTH
from domain.policy import ActivatedPolicy, policy_from_text
from egret.common.v1 import outcome_pb2
from kit.audit import AuditHeadMixin, AuditMixin
from kit.columns import Hex, Instant
from kit.db import make_metadata
from kit.packing import Packed
from kit.rekey import GenerationMixin

# As long as kit.rekey's marker allows.
MAX_KEY_ID_LENGTH = 32


class Base(DeclarativeBase):
    metadata = make_metadata()


class StoredEntry(Base):
    """One ledger entry; `outcome` is the serialized egret.common.v1.Outcome, the evidence snapshot."""

    __tablename__ = "score_ledger"
    # Serves both "all entries of a subject" and ListEntries' newest-first keyset pages.
    __table_args__ = (sa.Index("ix_score_ledger_subject_key", "subject_key", "occurred_at", "entry_id"),)

    entry_id: Mapped[str] = mapped_column(Hex(), primary_key=True)
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    rule_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    rule_set: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    # The rule's title, description and legal basis and the entry's reason are read from
    # `outcome` (`ledger_entry`): no query selects or filters on them, and columns of
    # their own stored them a second time (score migration 0009, issue 18).
    points: Mapped[int] = mapped_column(sa.Integer)
    category: Mapped[str] = mapped_column(sa.String(MAX_CATEGORY_LENGTH))
    severity: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))
    occurred_at: Mapped[datetime] = mapped_column(Instant())
    recorded_at: Mapped[datetime] = mapped_column(Instant())
    visible_until: Mapped[datetime] = mapped_column(Instant())
    black_list: Mapped[bool] = mapped_column(sa.Boolean)
    outcome: Mapped[bytes] = mapped_column(Packed)
    # The points a positive of a capped category adds after the cap, as of the last rescore
    # (NULL until one wrote it); score's batches read it in place of the entries before it
    # (services/score/live.py). Not a read model: query computes grants itself.
    granted: Mapped[int | None] = mapped_column(sa.Integer)


class StoredScore(Base):
    """A subject's score as last recomputed from its ledger, as of `updated_at`.

    `next_change_at` is when it next changes with no new entry (an entry's visible_until):
    until then readers may serve this row as the current score; the expiry sweep
    recomputes rows whose instant has passed.
    """

    __tablename__ = "score_subjects"

    subject_key: Mapped[str] = mapped_column(Hex(), primary_key=True)
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    score: Mapped[int] = mapped_column(sa.Integer)
    tier: Mapped[str] = mapped_column(sa.String(32))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    updated_at: Mapped[datetime] = mapped_column(Instant())
    next_change_at: Mapped[datetime | None] = mapped_column(Instant(), index=True)
    red_list: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    black_list: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    # JSON [[list, [reasons], [entry ids]], ...]: why the subject is on each list.
    list_reasons: Mapped[str] = mapped_column(sa.Text, server_default="[]")
    # The latest recorded_at of the ledger this row was computed from (NULL before it was
    # stored): a row older than its ledger is rescored from the whole ledger.
    recorded_through: Mapped[datetime | None] = mapped_column(Instant())


class StoredHistory(Base):
    """One change of a subject's score, tier or list membership, at the instant it took
    effect, with the entries that caused it. Append-only."""

    __tablename__ = "score_history"
    __table_args__ = (sa.Index("ix_score_history_subject_key", "subject_key", "history_id"),)

    history_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    changed_at: Mapped[datetime] = mapped_column(Instant())
    recorded_at: Mapped[datetime] = mapped_column(Instant())
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
    entry_id: Mapped[str] = mapped_column(Hex())
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    statement: Mapped[str] = mapped_column(sa.Text)
    filed_by: Mapped[str] = mapped_column(sa.String(256))
    filed_by_role: Mapped[str] = mapped_column(sa.String(32))
    filed_at: Mapped[datetime] = mapped_column(Instant())
    deadline: Mapped[datetime] = mapped_column(Instant())
    # open, upheld, overturned
    status: Mapped[str] = mapped_column(sa.String(16))
    resolution_reason: Mapped[str] = mapped_column(sa.Text, server_default="")
    resolved_by: Mapped[str] = mapped_column(sa.String(256), server_default="")
    resolved_at: Mapped[datetime | None] = mapped_column(Instant())
    # The reviewer holding it (principal id, never a subject's), "" while no one does.
    assignee: Mapped[str] = mapped_column(sa.String(256), server_default="")
    assigned_at: Mapped[datetime | None] = mapped_column(Instant())


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
    entry_id: Mapped[str] = mapped_column(Hex())
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    evidence: Mapped[str] = mapped_column(sa.Text)
    evidence_uri: Mapped[str] = mapped_column(sa.Text)
    applied_at: Mapped[datetime] = mapped_column(Instant())
    decision_due: Mapped[datetime] = mapped_column(Instant())
    # pending, approved, rejected
    status: Mapped[str] = mapped_column(sa.String(16))
    decision_reason: Mapped[str] = mapped_column(sa.Text, server_default="")
    decided_by: Mapped[str] = mapped_column(sa.String(256), server_default="")
    decided_at: Mapped[datetime | None] = mapped_column(Instant())


class StoredReversal(Base):
    """The reversal of one outcome by a source's retraction, from `reversed_at` (when
    score learned it) on; on the corrected timeline the entry never counted. Keyed by
    outcome id, so a redelivered reversal has no effect; a row whose outcome is not in
    score_ledger yet reverses it when it arrives."""

    __tablename__ = "score_reversals"
    __table_args__ = (sa.Index("ix_score_reversals_subject_key", "subject_key"),)

    outcome_id: Mapped[str] = mapped_column(Hex(), primary_key=True)
    # As the retraction names it; the entry's own subject key decides.
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    source: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    event_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    reason: Mapped[str] = mapped_column(sa.Text)
    retracted_at: Mapped[datetime | None] = mapped_column(Instant())
    retracted_by: Mapped[str] = mapped_column(sa.String(256))
    reversed_at: Mapped[datetime] = mapped_column(Instant())
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
    subject_key: Mapped[str] = mapped_column(Hex())
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    granted: Mapped[bool] = mapped_column(sa.Boolean)
    effective_at: Mapped[datetime] = mapped_column(Instant())
    recorded_at: Mapped[datetime] = mapped_column(Instant())
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
    activated_at: Mapped[datetime] = mapped_column(Instant())
    activated_by: Mapped[str] = mapped_column(sa.String(256))
    document: Mapped[str] = mapped_column(sa.Text)


class StoredCategory(Base):
    """The points one category contributes to a subject's stored score."""

    __tablename__ = "score_categories"

    # No foreign key to score_subjects: the re-keying job moves each table's keys in its
    # own transactions (kit.rekey), which a key referencing the other table would refuse.
    # Categories are rewritten whole with their subject's row.
    subject_key: Mapped[str] = mapped_column(Hex(), primary_key=True)
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(MAX_KEY_ID_LENGTH))
    category: Mapped[str] = mapped_column(sa.String(MAX_CATEGORY_LENGTH), primary_key=True)
    points: Mapped[int] = mapped_column(sa.Integer)
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    # Positive points of counting entries withheld by the category's cap.
    capped: Mapped[int] = mapped_column(sa.Integer, server_default="0")


class ScoreSubjectKeyGeneration(Base, GenerationMixin):
    """The generation score's stored subject keys are in (kit.rekey's marker)."""

    __tablename__ = "score_subject_key_generation"


def snapshot_outcome(snapshot: bytes) -> outcome_pb2.Outcome:
    """An entry's outcome snapshot, parsed; an empty Outcome when it does not parse."""
    try:
        return outcome_pb2.Outcome.FromString(snapshot)
    except Exception:  # a snapshot that does not parse says nothing
        return outcome_pb2.Outcome()


def ledger_entry(row: StoredEntry) -> LedgerEntry:
    # The rule's texts and the reason are the snapshot's, stored once (score migration 0009).
    outcome = snapshot_outcome(row.outcome)
    return LedgerEntry(
        entry_id=row.entry_id,
        subject_key=row.subject_key,
        subject_kind=row.subject_kind,
        rule=RuleRef(
            rule_id=row.rule_id,
            rule_set=row.rule_set,
            rule_set_version=row.rule_set_version,
            title=outcome.rule.title,
            description=outcome.rule.description,
            legal_basis=outcome.rule.legal_basis,
        ),
        points=row.points,
        category=row.category,
        severity=row.severity,
        status=EntryStatus(row.status),
        occurred_at=row.occurred_at,
        recorded_at=row.recorded_at,
        visible_until=row.visible_until,
        reason=outcome.reason,
        black_list=row.black_list,
        snapshot=row.outcome,
    )


# The table's own columns: a select of them runs as Core, which spares the ORM's handling
# of every row read (a rescore reads a batch's subjects' live ledgers).
_ENTRY_TABLE = cast(sa.Table, StoredEntry.__table__)
_ENTRY_COLUMNS = tuple(
    _ENTRY_TABLE.c[name]
    for name in (
        "subject_key",
        "entry_id",
        "points",
        "category",
        "severity",
        "status",
        "occurred_at",
        "recorded_at",
        "black_list",
        "granted",
    )
)


def scored_entry(row: Any) -> ScoredEntry:
    return ScoredEntry(
        entry_id=row.entry_id,
        points=row.points,
        category=row.category,
        severity=row.severity,
        status=EntryStatus(row.status),
        occurred_at=row.occurred_at,
        recorded_at=row.recorded_at,
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
        filed_at=row.filed_at,
        deadline=row.deadline,
        status=row.status,
        resolution_reason=row.resolution_reason,
        resolved_by=row.resolved_by,
        resolved_at=row.resolved_at,
        assignee=row.assignee,
        assigned_at=row.assigned_at,
    )


def repair_record(row: StoredRepair) -> RepairRecord:
    return RepairRecord(
        application_id=row.application_id,
        entry_id=row.entry_id,
        subject_key=row.subject_key,
        evidence=row.evidence,
        evidence_uri=row.evidence_uri,
        applied_at=row.applied_at,
        decision_due=row.decision_due,
        status=row.status,
        decision_reason=row.decision_reason,
        decided_by=row.decided_by,
        decided_at=row.decided_at,
    )


def reversal_record(row: StoredReversal) -> ReversalRecord:
    return ReversalRecord(
        outcome_id=row.outcome_id,
        subject_key=row.subject_key,
        source=row.source,
        event_id=row.event_id,
        reason=row.reason,
        retracted_at=row.retracted_at,
        retracted_by=row.retracted_by,
        reversed_at=row.reversed_at,
        cause=row.cause,
    )


def consent_record(row: StoredConsent) -> Consent:
    return Consent(
        subject_key=row.subject_key,
        granted=row.granted,
        effective_at=row.effective_at,
        recorded_at=row.recorded_at,
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
    return {key: [e for e, _ in entries] for key, entries in load_granted(session, keys).items()}


Granted = tuple[ScoredEntry, int | None]


def load_granted(session: Session, keys: Sequence[str]) -> dict[str, list[Granted]]:
    """`load_entries` with each entry's stored grant (`StoredEntry.granted`)."""
    rows = list(session.execute(sa.select(*_ENTRY_COLUMNS).where(_ENTRY_TABLE.c.subject_key.in_(list(keys)))))
    return _granted(keys, rows, _due_facts(session, keys) if rows else {})


def load_recent(
    session: Session, cutoffs: dict[datetime, list[str]], *, older: bool = False
) -> dict[str, list[Granted]]:
    """Like `load_granted`, for the subjects listed under each instant: their entries that
    occurred at or after it (a range of ix_score_ledger_subject_key) and those with a
    dispute, repair or reversal; `older`: only those that occurred before it."""
    keys = [key for members in cutoffs.values() for key in members]
    due = _due_facts(session, keys)
    rows: list[Any] = []
    for start, members in cutoffs.items():
        at = start.astimezone(UTC)
        rows += session.execute(
            sa.select(*_ENTRY_COLUMNS).where(
                _ENTRY_TABLE.c.subject_key.in_(members),
                _ENTRY_TABLE.c.occurred_at < at if older else _ENTRY_TABLE.c.occurred_at >= at,
            )
        )
    wanted = set() if older else set(due)
    if wanted:
        wanted -= {row.entry_id for row in rows}
    if wanted:
        rows += session.execute(
            sa.select(*_ENTRY_COLUMNS).where(
                _ENTRY_TABLE.c.entry_id.in_(sorted(wanted)), _ENTRY_TABLE.c.subject_key.in_(keys)
            )
        )
    return _granted(keys, rows, due)


def _granted(keys: Sequence[str], rows: Sequence[Any], due: dict[str, _DueFacts]) -> dict[str, list[Granted]]:
    ledgers: dict[str, list[Granted]] = {key: [] for key in keys}
    for row in rows:
        entry = scored_entry(row)
        facts = due.get(entry.entry_id)
        if facts is not None:
            entry = replace(entry, pauses=pauses_of(facts.disputes, facts.repairs, facts.reversals))
        ledgers[row.subject_key].append((entry, row.granted))
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
    return frozenset(e.ref.source for e in snapshot_outcome(snapshot).events if e.ref.source)


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


def load_policies(session: Session) -> list[ActivatedPolicy]:
    rows = session.scalars(sa.select(StoredPolicy).order_by(StoredPolicy.activated_at, StoredPolicy.version))
    return [
        ActivatedPolicy(
            policy=policy_from_text(r.document, source=f"stored policy {r.version}"),
            activated_at=r.activated_at,
            activated_by=r.activated_by,
            document=r.document,
        )
        for r in rows
    ]
