"""Query's read-only view of the score store.

The schema belongs to the score service: its models (services.score.storage) and its
migrations define the tables, and query has no migrations of its own. Query opens
the database read-only and may start before score has created it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from kit.db import as_utc
from kit.errors import Unavailable
from services.query.domain import Cursor, HistoryRow, RawDistribution, SubjectScore
from services.score.domain import CategoryScore, LedgerEntry, ListMembership, ScoredEntry
from services.score.policy import ActivatedPolicy
from services.score.storage import (
    StoredCategory,
    StoredEntry,
    StoredHistory,
    StoredScore,
    ledger_entry,
    load_entries,
    load_policies,
)

T = TypeVar("T")

# PostgreSQL's SQLSTATE for "relation does not exist": score has not migrated yet.
_UNDEFINED_TABLE = "42P01"


# The hottest read, built once: one statement (row and categories by an outer join) run on
# the session's connection, returning plain rows. At a thousand reads a second, building
# the statement and the ORM's per-call bookkeeping cost more than the query itself.
_SCORE_QUERY = (
    sa.select(
        StoredScore.subject_kind,
        StoredScore.score,
        StoredScore.tier,
        StoredScore.updated_at,
        StoredScore.policy_version,
        StoredScore.entry_count,
        StoredScore.list_reasons,
        StoredScore.next_change_at,
        StoredCategory.category,
        StoredCategory.points,
        StoredCategory.entry_count.label("category_entries"),
        StoredCategory.capped,
    )
    .outerjoin(StoredCategory, StoredCategory.subject_key == StoredScore.subject_key)
    .where(StoredScore.subject_key == sa.bindparam("key"))
    .order_by(StoredCategory.category)
)


class SqlScoreReader:
    """ScoreReadStore on SQLAlchemy over score's tables."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def _read(self, work: Callable[[Session], T]) -> T:
        try:
            with self._sessions() as session:
                return work(session)
        except sa.exc.DBAPIError as exc:
            # Score has not created or migrated its store yet, or it is down: retryable.
            # Any other database error is a bug and stays INTERNAL.
            missing_table = getattr(exc.orig, "sqlstate", None) == _UNDEFINED_TABLE
            if isinstance(exc, sa.exc.OperationalError) or missing_table:
                raise Unavailable("the score store is not available yet") from exc
            raise

    def score(self, subject_key: str) -> SubjectScore | None:
        def work(session: Session) -> SubjectScore | None:
            rows = session.connection().execute(_SCORE_QUERY, {"key": subject_key}).all()

            if not rows or not rows[0].tier:
                return None
            row = rows[0]
            return SubjectScore(
                subject_key=subject_key,
                subject_kind=row.subject_kind,
                score=row.score,
                tier=row.tier,
                categories=tuple(
                    CategoryScore(r.category, r.points, r.category_entries, r.capped)
                    for r in rows
                    if r.category is not None
                ),
                as_of=as_utc(row.updated_at),
                policy_version=row.policy_version,
                entry_count=row.entry_count,
                lists=tuple(
                    ListMembership(name, tuple(reasons), tuple(ids))
                    for name, reasons, ids in json.loads(row.list_reasons or "[]")
                ),
                next_change_at=None if row.next_change_at is None else as_utc(row.next_change_at),
            )

        return self._read(work)

    def entries(self, subject_key: str, after: Cursor | None, limit: int) -> Sequence[LedgerEntry]:
        def work(session: Session) -> list[LedgerEntry]:
            query = sa.select(StoredEntry).where(StoredEntry.subject_key == subject_key)
            if after is not None:
                query = query.where(
                    sa.or_(
                        StoredEntry.occurred_at < after.occurred_at,
                        sa.and_(
                            StoredEntry.occurred_at == after.occurred_at,
                            StoredEntry.entry_id < after.entry_id,
                        ),
                    )
                )
            query = query.order_by(StoredEntry.occurred_at.desc(), StoredEntry.entry_id.desc()).limit(limit)
            return [ledger_entry(row) for row in session.scalars(query)]

        return self._read(work)

    def entry(self, entry_id: str) -> LedgerEntry | None:
        def work(session: Session) -> LedgerEntry | None:
            row = session.get(StoredEntry, entry_id)
            return None if row is None else ledger_entry(row)

        return self._read(work)

    def scorable_entries(self, subject_key: str) -> Sequence[ScoredEntry]:
        return self._read(lambda session: load_entries(session, [subject_key])[subject_key])

    def history(self, subject_key: str, before_id: int | None, limit: int) -> Sequence[HistoryRow]:
        def work(session: Session) -> list[HistoryRow]:
            query = sa.select(StoredHistory).where(StoredHistory.subject_key == subject_key)
            if before_id is not None:
                query = query.where(StoredHistory.history_id < before_id)
            query = query.order_by(StoredHistory.history_id.desc()).limit(limit)
            return [_history_row(r) for r in session.scalars(query)]

        return self._read(work)

    def distribution(self, kind: str | None) -> RawDistribution:
        def work(session: Session) -> RawDistribution:
            s, c = StoredScore, StoredCategory
            where = [s.tier != ""] + ([s.subject_kind == kind] if kind else [])
            tiers = session.execute(
                sa.select(s.subject_kind, s.tier, sa.func.count())
                .where(*where)
                .group_by(s.subject_kind, s.tier)
            )
            lists = session.execute(
                sa.select(
                    s.subject_kind,
                    sa.func.sum(sa.case((s.red_list, 1), else_=0)),
                    sa.func.sum(sa.case((s.black_list, 1), else_=0)),
                )
                .where(*where)
                .group_by(s.subject_kind)
            )
            # Grouped by points, not by subject: the distinct point totals per category are
            # few, so the domain maps each to a purpose-bound tier once.
            points = session.execute(
                sa.select(s.subject_kind, c.category, c.points, sa.func.count())
                .join(s, s.subject_key == c.subject_key)
                .where(*where)
                .group_by(s.subject_kind, c.category, c.points)
            )
            return RawDistribution(
                tiers=[(str(k), str(t), int(n)) for k, t, n in tiers],
                lists=[
                    (k, name, int(n))
                    for k, red, black in lists
                    for name, n in (("red", red), ("black", black))
                ],
                category_points=[(str(k), str(cat), int(p), int(n)) for k, cat, p, n in points],
            )

        return self._read(work)

    def activations(self) -> Sequence[ActivatedPolicy]:
        return self._read(load_policies)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(n for n in (text or "").split(",") if n)


def _history_row(row: StoredHistory) -> HistoryRow:
    return HistoryRow(
        history_id=row.history_id,
        changed_at=as_utc(row.changed_at),
        recorded_at=as_utc(row.recorded_at),
        cause=row.cause,
        policy_version=row.policy_version,
        score_before=row.score_before,
        score=row.score,
        tier_before=row.tier_before or "",
        tier=row.tier,
        lists_before=_split(row.lists_before),
        lists=_split(row.lists),
        added_entry_ids=tuple(json.loads(row.added_entry_ids)),
        expired_entry_ids=tuple(json.loads(row.expired_entry_ids)),
    )
