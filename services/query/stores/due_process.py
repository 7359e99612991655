"""Query's reads of due process in score's store (read-only): who disputed what, repair
applications, consent, and each entry's facts (disputes, repairs, reversals) for the
disputed flags on reads and for Explain.

Lists are keyset-paged by (deadline or decision_due, id): the token carries the last
pair seen, so pages stay stable while new disputes and applications arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from contracts.score_store import (
    StoredDispute,
    StoredEntry,
    StoredRepair,
    StoredReversal,
    consent_at,
    dispute_record,
    evidence_sources,
    ledger_entry,
    repair_record,
    reversal_record,
)
from domain.consent import Consent
from domain.entries import OPEN, PENDING, DisputeRecord, EntryFacts, RepairRecord
from kit.db import make_session_factory
from kit.errors import InvalidArgument, Unavailable, Violation
from kit.page_tokens import PageTokens
from services.query.stores.scores import PreparedRead

T = TypeVar("T")
# Disputes read at a time when filtering by department (kept in Python, see disputes()).
DEPARTMENT_BATCH = 200
# Ids a list may be narrowed to (ListDisputesRequest.dispute_ids, ...application_ids).
MAX_IDS = 100
# PostgreSQL's SQLSTATE for "relation does not exist": score has not migrated yet.
UNDEFINED_TABLE = "42P01"


@dataclass(frozen=True)
class ListFilter:
    """Filters of ListDisputes / ListRepairApplications; `status` is the stored status
    (open, upheld, ...), None for every status."""

    status: str | None = None
    subject_key: str | None = None
    overdue_only: bool = False
    # Only these dispute or application ids; None means every one, () none at all.
    ids: tuple[int, ...] | None = None
    # ListDisputes only: the entry's source department and category, the reviewer holding
    # the dispute (a principal id), or only disputes no one holds.
    department: str | None = None
    category: str | None = None
    assignee: str | None = None
    unassigned_only: bool = False


@dataclass(frozen=True)
class DisputePage:
    disputes: tuple[DisputeRecord, ...]
    next_page_token: str


@dataclass(frozen=True)
class RepairPage:
    applications: tuple[RepairRecord, ...]
    next_page_token: str


def id_filter(given: Sequence[str], field: str) -> tuple[int, ...] | None:
    """The ids a list is narrowed to: None when none are given; ids that are not a
    server-assigned number match nothing (as an unknown one), so they are left out."""
    if len(given) > MAX_IDS:
        raise InvalidArgument(
            "invalid request", [Violation(field, f"must hold at most {MAX_IDS} ids", "OUT_OF_RANGE")]
        )
    if not given:
        return None
    return tuple(sorted({int(v) for v in given if v.isascii() and v.isdigit() and len(v) <= 18}))


def encode_key(tokens: PageTokens, at: datetime, number: int, *, bound_to: Mapping[str, object]) -> str:
    return tokens.encode([at.astimezone(UTC).isoformat(), number], bound_to=bound_to)


def decode_key(
    tokens: PageTokens, token: str, *, bound_to: Mapping[str, object]
) -> tuple[datetime, int] | None:
    """The (instant, id) a page ended at (kit.page_tokens checks the token); None for ""."""
    value = tokens.decode(token, bound_to=bound_to)
    if value is None:
        return None
    invalid = InvalidArgument(
        "invalid page token",
        [Violation("page_token", "is not a page token of this query", "INVALID_PAGE_TOKEN")],
    )
    try:
        at, number = value
        when = datetime.fromisoformat(at)
    except (ValueError, TypeError) as exc:
        raise invalid from exc
    if when.tzinfo is None or not isinstance(number, int) or isinstance(number, bool):
        raise invalid
    return when.astimezone(UTC), number


_UNDECIDED_QUERY = sa.select(
    sa.exists().where(StoredDispute.subject_key == sa.bindparam("key"), StoredDispute.resolved_at.is_(None))
)


class SqlDueProcessReader:
    """Due-process facts from score's tables, read-only."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = make_session_factory(engine)
        # Every score read asks whether the subject has an undecided dispute: one prepared
        # index probe, so the common answer (none) costs tens of microseconds.
        self._undecided = PreparedRead(engine, _UNDECIDED_QUERY, "key")

    def has_undecided_dispute(self, subject_key: str) -> bool:
        """Whether any dispute of the subject is undecided (cheap; callers then ask
        `open_disputed` for the entries, which weighs deadlines and reversals)."""
        return bool(self._undecided.rows(subject_key)[0][0])

    def _read(self, work: Callable[[Session], T]) -> T:
        try:
            with self._sessions() as session:
                return work(session)
        except sa.exc.DBAPIError as exc:
            # As SqlScoreReader: score's store not created, migrated or up yet is retryable.
            missing_table = getattr(exc.orig, "sqlstate", None) == UNDEFINED_TABLE
            if isinstance(exc, sa.exc.OperationalError) or missing_table:
                raise Unavailable("the score store is not available yet") from exc
            raise

    def consent(self, subject_key: str, at: datetime) -> Consent | None:
        """The consent in force at `at` (one indexed lookup)."""
        return self._read(lambda session: consent_at(session, subject_key, at))

    def open_disputed(self, subject_keys: Sequence[str], at: datetime) -> dict[str, tuple[str, ...]]:
        """Per subject, the entries under a dispute open at `at` and not yet past its
        deadline (past it, the entry does not count), that count at `at` otherwise: recorded,
        not expired, not reversed."""

        if len(subject_keys) == 1 and not self.has_undecided_dispute(subject_keys[0]):
            return {}

        def work(session: Session) -> dict[str, tuple[str, ...]]:
            d, e, v = StoredDispute, StoredEntry, StoredReversal
            moment = at.astimezone(UTC)
            # Disputes first, by their subject index: almost every read finds none and stops
            # here (one small index probe). A single join lets SQLite's planner start from
            # the ledger instead, a scan per read.
            open_disputes = session.execute(
                sa.select(d.subject_key, d.entry_id).where(
                    d.subject_key.in_(list(subject_keys)),
                    d.filed_at <= moment,
                    sa.or_(d.resolved_at.is_(None), d.resolved_at > moment),
                    d.deadline > moment,
                )
            ).all()
            if not open_disputes:
                return {}
            entry_ids = sorted({entry_id for _, entry_id in open_disputes})
            counting = set(
                session.scalars(
                    sa.select(e.entry_id).where(
                        e.entry_id.in_(entry_ids), e.recorded_at <= moment, e.visible_until > moment
                    )
                )
            )
            reversed_ids = set(
                session.scalars(
                    sa.select(v.outcome_id).where(v.outcome_id.in_(entry_ids), v.reversed_at <= moment)
                )
            )
            found: dict[str, list[str]] = {}
            for key, entry_id in sorted(open_disputes, key=lambda row: row[1]):
                if entry_id in counting and entry_id not in reversed_ids:
                    found.setdefault(key, []).append(entry_id)
            return {k: tuple(ids) for k, ids in found.items()}

        return self._read(work)

    def facts(self, subject_key: str) -> list[EntryFacts]:
        """Every entry of the subject with its disputes, repairs and reversals."""
        query = sa.select(StoredEntry).where(StoredEntry.subject_key == subject_key)
        return self._read(lambda session: _facts(session, list(session.scalars(query))))

    def facts_of(self, entry_ids: Sequence[str]) -> dict[str, EntryFacts]:
        """The named entries with their disputes, repairs and reversals, by entry id."""
        if not entry_ids:
            return {}
        query = sa.select(StoredEntry).where(StoredEntry.entry_id.in_(list(entry_ids)))
        found = self._read(lambda session: _facts(session, list(session.scalars(query))))
        return {f.entry.entry_id: f for f in found}

    def disputes(
        self, where: ListFilter, now: datetime, after: tuple[datetime, int] | None, limit: int
    ) -> list[DisputeRecord]:
        """Up to `limit` disputes after the keyset `after`, earliest deadline first, every
        filter applied. The department is named only in the entry's outcome snapshot, so
        with that filter the rows are read in batches and kept here until `limit` match:
        a page is short only at the end of the queue."""

        if where.ids == ():
            return []

        def work(session: Session) -> list[DisputeRecord]:
            d, e = StoredDispute, StoredEntry
            query = sa.select(d, e.outcome).join(e, e.entry_id == d.entry_id)
            if where.ids is not None:
                query = query.where(d.dispute_id.in_(where.ids))
            if where.status is not None:
                query = query.where(d.status == where.status)
            if where.subject_key is not None:
                query = query.where(d.subject_key == where.subject_key)
            if where.overdue_only:
                query = query.where(d.status == OPEN, d.deadline <= now.astimezone(UTC))
            if where.category is not None:
                query = query.where(e.category == where.category)
            if where.assignee is not None:
                query = query.where(d.assignee == where.assignee)
            if where.unassigned_only:
                query = query.where(d.assignee == "")
            query = query.order_by(d.deadline, d.dispute_id)
            batch = limit if where.department is None else max(limit, DEPARTMENT_BATCH)
            found: list[DisputeRecord] = []
            cursor = after
            while True:
                rows = session.execute(_after(query, cursor).limit(batch)).all()
                for row, outcome in rows:
                    if where.department is None or where.department in evidence_sources(outcome):
                        found.append(dispute_record(row))
                        if len(found) == limit:
                            return found
                if len(rows) < batch:
                    return found
                last = rows[-1][0]
                cursor = (last.deadline, last.dispute_id)

        return self._read(work)

    def repairs(
        self, where: ListFilter, now: datetime, after: tuple[datetime, int] | None, limit: int
    ) -> list[RepairRecord]:
        if where.ids == ():
            return []

        def work(session: Session) -> list[RepairRecord]:
            r = StoredRepair
            query = sa.select(r)
            if where.ids is not None:
                query = query.where(r.application_id.in_(where.ids))
            if where.status is not None:
                query = query.where(r.status == where.status)
            if where.subject_key is not None:
                query = query.where(r.subject_key == where.subject_key)
            if where.overdue_only:
                query = query.where(r.status == PENDING, r.decision_due < now.astimezone(UTC))
            if after is not None:
                at, number = after
                query = query.where(
                    sa.or_(r.decision_due > at, sa.and_(r.decision_due == at, r.application_id > number))
                )
            query = query.order_by(r.decision_due, r.application_id).limit(limit)
            return [repair_record(row) for row in session.scalars(query)]

        return self._read(work)


def _after(
    query: sa.Select[StoredDispute, bytes], after: tuple[datetime, int] | None
) -> sa.Select[StoredDispute, bytes]:
    if after is None:
        return query
    at, number = after
    d = StoredDispute
    return query.where(sa.or_(d.deadline > at, sa.and_(d.deadline == at, d.dispute_id > number)))


def dispute_page(
    rows: Sequence[DisputeRecord], size: int, tokens: PageTokens, *, bound_to: Mapping[str, object]
) -> DisputePage:
    page = tuple(rows[:size])
    more = len(rows) > size
    token = encode_key(tokens, page[-1].deadline, page[-1].dispute_id, bound_to=bound_to) if more else ""
    return DisputePage(page, token)


def repair_page(
    rows: Sequence[RepairRecord], size: int, tokens: PageTokens, *, bound_to: Mapping[str, object]
) -> RepairPage:
    page = tuple(rows[:size])
    more = len(rows) > size
    token = (
        encode_key(tokens, page[-1].decision_due, page[-1].application_id, bound_to=bound_to) if more else ""
    )
    return RepairPage(page, token)


def _facts(session: Session, entries: Sequence[StoredEntry]) -> list[EntryFacts]:
    if not entries:
        return []
    ids = [row.entry_id for row in entries]
    disputes: dict[str, list[DisputeRecord]] = {}
    for row in session.scalars(
        sa.select(StoredDispute).where(StoredDispute.entry_id.in_(ids)).order_by(StoredDispute.dispute_id)
    ):
        disputes.setdefault(row.entry_id, []).append(dispute_record(row))
    repairs: dict[str, list[RepairRecord]] = {}
    for r in session.scalars(
        sa.select(StoredRepair).where(StoredRepair.entry_id.in_(ids)).order_by(StoredRepair.application_id)
    ):
        repairs.setdefault(r.entry_id, []).append(repair_record(r))
    reversals = {
        v.outcome_id: reversal_record(v)
        for v in session.scalars(sa.select(StoredReversal).where(StoredReversal.outcome_id.in_(ids)))
    }
    return [
        EntryFacts(
            entry=ledger_entry(row),
            disputes=tuple(disputes.get(row.entry_id, ())),
            repairs=tuple(repairs.get(row.entry_id, ())),
            reversals=(reversals[row.entry_id],) if row.entry_id in reversals else (),
            sources=evidence_sources(row.outcome),
        )
        for row in entries
    ]
