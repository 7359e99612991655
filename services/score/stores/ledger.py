"""The ledger's store on SQLAlchemy: entries and reversals in, subjects' ledgers out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from contracts.score_store import (
    StoredEntry,
    StoredReversal,
    StoredScore,
    load_entries,
    reversal_record,
)
from domain.entries import EntryStatus, LedgerEntry, ReversalRecord, ScoredEntry, pauses_of
from domain.policy import ScorePolicy
from kit import audit
from services.score.due_process import Audited
from services.score.ledger_store import ConcurrentWrite, Rescored, SubjectLedger
from services.score.stores.audit import append_audit
from services.score.stores.subjects import (
    lock_live,
    lock_subjects,
    save_scores,
    subject_ledger,
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
        "points": entry.points,
        "category": entry.category,
        "severity": entry.severity,
        "status": entry.status.value,
        "occurred_at": entry.occurred_at,
        "recorded_at": entry.recorded_at,
        "visible_until": entry.visible_until,
        "black_list": entry.black_list,
        "outcome": entry.snapshot,
        "granted": None,
    }


def _new_entry(entry: LedgerEntry, reversal: ReversalRecord | None) -> ScoredEntry:
    """The scoring view of a new entry, as `load_entries` would read it once stored."""
    return ScoredEntry(
        entry_id=entry.entry_id,
        points=entry.points,
        category=entry.category,
        severity=entry.severity,
        status=entry.status if reversal is None else EntryStatus.REVERSED,
        occurred_at=entry.occurred_at.astimezone(UTC),
        recorded_at=entry.recorded_at.astimezone(UTC),
        black_list=entry.black_list,
        pauses=() if reversal is None else pauses_of((), (), (reversal,)),
    )


_LEDGER = cast(sa.Table, StoredEntry.__table__)


class _SqlLedgerUnitOfWork:
    """LedgerUnitOfWork on one session in one transaction, a fixed number of bulk statements,
    writing keys of generation `key_id`."""

    def __init__(
        self, session: Session, audit_keys: audit.AuditKeys, key_id: str, whole_ledger: bool = False
    ) -> None:
        self._session = session
        self._audit_keys = audit_keys
        self._key_id = key_id
        self._whole_ledger = whole_ledger
        # Ledger rows read to rescore the batch's subjects; subjects read as a live part.
        self.entries_read = 0
        self.live_parts = 0
        # The batch's new entries: their rows, inserted by `save` with their grants, and
        # their scoring view by subject, which the locks add to what they read.
        self._pending: dict[str, dict[str, Any]] = {}
        self._new: dict[str, list[ScoredEntry]] = {}
        # The kinds of the new entries' subjects, and of those among them that had no score
        # row when locked: `save` inserts their rows whole.
        self._kinds: dict[str, str] = {}
        self._first: dict[str, str] = {}

    def add_entries(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        session = self._session
        ids = [e.entry_id for e in entries]
        existing = set(session.scalars(sa.select(StoredEntry.entry_id).where(StoredEntry.entry_id.in_(ids))))
        # Sorted, so that concurrent writers take row locks in the same order.
        fresh = sorted((e for e in entries if e.entry_id not in existing), key=lambda e: e.entry_id)
        if not fresh:
            return []
        # Retracted before it arrived: reversed from the moment it is recorded.
        waiting = {
            r.outcome_id: reversal_record(r)
            for r in session.scalars(
                sa.select(StoredReversal).where(StoredReversal.outcome_id.in_([e.entry_id for e in fresh]))
            )
        }
        for e in fresh:
            reversal = waiting.get(e.entry_id)
            row = entry_row(e, self._key_id)
            if reversal is not None:
                row["status"] = EntryStatus.REVERSED.value
            self._pending[e.entry_id] = row
            self._new.setdefault(e.subject_key, []).append(_new_entry(e, reversal))
            self._kinds[e.subject_key] = e.subject_kind
        return fresh

    def add_reversals(self, reversals: Sequence[ReversalRecord]) -> list[ReversalRecord]:
        session = self._session
        ids = sorted({r.outcome_id for r in reversals})
        known = set(
            session.scalars(sa.select(StoredReversal.outcome_id).where(StoredReversal.outcome_id.in_(ids)))
        )
        fresh = sorted((r for r in reversals if r.outcome_id not in known), key=lambda r: r.outcome_id)
        if not fresh:
            return []
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
        applied = [replace(r, subject_key=entries[r.outcome_id]) for r in fresh if r.outcome_id in entries]
        if applied:
            session.execute(
                sa.update(StoredEntry)
                .where(StoredEntry.entry_id.in_([r.outcome_id for r in applied]))
                .values(status=EntryStatus.REVERSED.value)
            )
        return applied

    def lock(self, subject_keys: Sequence[str]) -> list[SubjectLedger]:
        subjects, read = lock_subjects(self._session, subject_keys, self._new, self._kinds)
        self.entries_read += read
        return self._firsts(subjects)

    def lock_live(
        self, subject_keys: Sequence[str], now: datetime, added: Mapping[str, str], policy: ScorePolicy
    ) -> list[SubjectLedger]:
        # `added` are the entries add_entries took: their scoring view is kept in `_new`.
        if self._whole_ledger:
            return self.lock(subject_keys)
        subjects, read = lock_live(self._session, subject_keys, now, self._new, policy, kinds=self._kinds)
        self.entries_read += read
        self.live_parts += sum(s.partial for s in subjects)
        return self._firsts(subjects)

    def _firsts(self, subjects: list[SubjectLedger]) -> list[SubjectLedger]:
        # No stored state: the subject had no score row.
        self._first = {s.subject_key: s.subject_kind for s in subjects if s.stored is None}
        return subjects

    def save(self, results: Mapping[str, Rescored], recorded_at: datetime | None) -> None:
        if self._pending:
            results = self._insert_new(results)
        first, self._first = self._first, {}
        save_scores(self._session, results, recorded_at, self._key_id, first)

    def _insert_new(self, results: Mapping[str, Rescored]) -> dict[str, Rescored]:
        """Insert the batch's new entries with the grants the rescore gave them, so that no
        row is written twice; returns the results with only the older entries' grants."""
        pending, self._pending, self._new, self._kinds = self._pending, {}, {}, {}
        rest = {}
        for key, rescored in results.items():
            for entry_id, granted in rescored.grants.items():
                if entry_id in pending:
                    pending[entry_id]["granted"] = granted
            rest[key] = replace(
                rescored, grants={i: g for i, g in rescored.grants.items() if i not in pending}
            )
        try:
            self._session.execute(sa.insert(_LEDGER), list(pending.values()))
        except IntegrityError as error:
            raise ConcurrentWrite("another writer stored one of these entries first") from error
        return rest

    def unsaved(self) -> bool:
        return bool(self._pending)


class SqlLedgerStore:
    """LedgerStore on SQLAlchemy: one unit of work per batch, sweep page or policy page.
    Keys are written as of generation `key_id` (the instance's current one). `whole_ledger`
    makes batches read every subject's whole ledger, as before services/score/live.py (tests
    and benchmarks compare the two)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        audit_keys: audit.AuditKeys,
        key_id: str,
        whole_ledger: bool = False,
    ) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys
        self._key_id = key_id
        self._whole_ledger = whole_ledger
        # Ledger rows read by the units of work that committed, and subjects read as a live
        # part (for tests and benchmarks).
        self.entries_read = 0
        self.live_parts = 0

    def tier_counts(self) -> dict[tuple[str, str], int]:
        """Subjects by (tier, subject kind), for the tiers gauge."""
        with self._sessions() as session:
            rows = session.execute(
                sa.select(StoredScore.tier, StoredScore.subject_kind, sa.func.count()).group_by(
                    StoredScore.tier, StoredScore.subject_kind
                )
            ).all()
        return {(tier, kind): int(n) for tier, kind, n in rows}

    @contextmanager
    def unit_of_work(self) -> Iterator[_SqlLedgerUnitOfWork]:
        with self._sessions() as session, session.begin():
            uow = _SqlLedgerUnitOfWork(session, self._audit_keys, self._key_id, self._whole_ledger)
            yield uow
            if uow.unsaved():
                # Rolled back: entries are only ever stored with their subject's rescore.
                raise RuntimeError("a unit of work added entries and saved no rescore")
        self.entries_read += uow.entries_read
        self.live_parts += uow.live_parts

    def due_subjects(self, now: datetime, limit: int) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.next_change_at <= now)
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
            yield [subject_ledger(key, kinds[key], stored.get(key), ledgers[key]) for key in keys]
            after = keys[-1]


def _reversal_row(r: ReversalRecord, key_id: str) -> dict[str, Any]:
    return {
        "outcome_id": r.outcome_id,
        "subject_key": r.subject_key,
        "subject_key_id": key_id,
        "source": r.source,
        "event_id": r.event_id,
        "reason": r.reason,
        "retracted_at": r.retracted_at,
        "retracted_by": r.retracted_by,
        "reversed_at": r.reversed_at,
        "cause": r.cause,
    }
