"""Due process's store on SQLAlchemy: one transaction per act, under the subject's lock."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from contracts.score_store import (
    StoredConsent,
    StoredDispute,
    StoredEntry,
    StoredRepair,
    StoredScore,
    consent_at,
    dispute_record,
    load_entry_facts,
    repair_record,
)
from domain.consent import Consent
from domain.entries import (
    OPEN,
    PENDING,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    RepairRecord,
)
from kit import audit
from services.score.due_process import Audited
from services.score.ledger_store import Rescored, SubjectLedger
from services.score.stores.audit import append_audit
from services.score.stores.subjects import lock_subjects, save_scores

_Row = TypeVar("_Row", StoredDispute, StoredRepair, StoredConsent)


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

    def _inserted(self, row: _Row) -> _Row:
        """`row` stored, with the id the database gave it."""
        self._session.add(row)
        self._session.flush()
        return row

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
        return replace(dispute, dispute_id=self._inserted(row).dispute_id)

    def save_dispute(self, dispute: DisputeRecord) -> None:
        self._session.execute(
            sa.update(StoredDispute)
            .where(StoredDispute.dispute_id == dispute.dispute_id)
            .values(
                status=dispute.status,
                resolution_reason=dispute.resolution_reason,
                resolved_by=dispute.resolved_by,
                resolved_at=_utc(dispute.resolved_at),
                assignee=dispute.assignee,
                assigned_at=_utc(dispute.assigned_at),
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
        return replace(repair, application_id=self._inserted(row).application_id)

    def save_repair(self, repair: RepairRecord) -> None:
        self._session.execute(
            sa.update(StoredRepair)
            .where(StoredRepair.application_id == repair.application_id)
            .values(
                status=repair.status,
                decision_reason=repair.decision_reason,
                decided_by=repair.decided_by,
                decided_at=_utc(repair.decided_at),
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
        return replace(consent, consent_id=self._inserted(row).consent_id)

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

    def lock(self, subject_keys: Sequence[str]) -> list[SubjectLedger]:
        return lock_subjects(self._session, subject_keys)[0]

    def save(self, results: Mapping[str, Rescored], recorded_at: datetime | None) -> None:
        save_scores(self._session, results, recorded_at, self._key_id)

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


def _utc(at: datetime | None) -> datetime | None:
    return None if at is None else at.astimezone(UTC)
