"""Query's read-only view of the score store.

The schema belongs to the score service: its models (services.score.storage) and its
migrations define the tables, and query has no migrations of its own. Query opens
the database read-only and may start before score has created it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from kit.db import as_utc
from kit.errors import Unavailable
from services.query.domain import Cursor, SubjectScore
from services.score.domain import CategoryScore, LedgerEntry
from services.score.storage import StoredCategory, StoredEntry, StoredScore, ledger_entry

T = TypeVar("T")

# PostgreSQL's SQLSTATE for "relation does not exist": score has not migrated yet.
_UNDEFINED_TABLE = "42P01"


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
            row = session.get(StoredScore, subject_key)
            if row is None:
                return None
            categories = session.scalars(
                sa.select(StoredCategory)
                .where(StoredCategory.subject_key == subject_key)
                .order_by(StoredCategory.category)
            )
            return SubjectScore(
                subject_key=row.subject_key,
                subject_kind=row.subject_kind,
                score=row.score,
                tier=row.tier,
                categories=tuple(CategoryScore(c.category, c.points, c.entry_count) for c in categories),
                as_of=as_utc(row.updated_at),
                policy_version=row.policy_version,
                entry_count=row.entry_count,
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
