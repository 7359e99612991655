"""Query's read-only view of the score store.

The schema belongs to the score service: score's migrations define the tables and
contracts.score_store publishes what query reads of them (ADR 0003). Query opens that
database read-only and may start before score has created it; query's own migrations
(services/query/migrations) are for its own database, which holds only the access log
(services.query.stores.access_log).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from contracts.score_store import (
    ScoreSubjectKeyGeneration,
    StoredCategory,
    StoredEntry,
    StoredHistory,
    StoredPolicy,
    StoredScore,
    consent_at,
    ledger_entry,
    load_entries,
    load_policies,
)
from domain.consent import Consent
from domain.entries import LedgerEntry, ScoredEntry
from domain.policy import ActivatedPolicy
from domain.scoring import CategoryScore, ListMembership
from kit.db import make_session_factory
from kit.errors import Unavailable
from kit.rekey import read_marker
from services.query.paging import Cursor
from services.query.read_models import HistoryRow, RawDistribution, SubjectScore

T = TypeVar("T")

# PostgreSQL's SQLSTATE for "relation does not exist": score has not migrated yet.
_UNDEFINED_TABLE = "42P01"


# The hottest read: a subject's stored row and its categories, by one outer join.
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
        StoredCategory.entry_count,
        StoredCategory.capped,
    )
    .outerjoin(StoredCategory, StoredCategory.subject_key == StoredScore.subject_key)
    .where(StoredScore.subject_key == sa.bindparam("key"))
    .order_by(StoredCategory.category)
)


# Whether score holds a subject (Reader.subject_key, during a key rotation).
_HOLDS_QUERY = sa.select(StoredScore.subject_key).where(StoredScore.subject_key == sa.bindparam("key"))


class PreparedRead:
    """A statement compiled once for the engine's dialect and run on a pooled DBAPI
    connection, with the column types' own result conversions applied by hand.

    At a thousand reads a second the ORM session, the connection wrapper and the per-call
    parameter processing cost several times the query itself (about 300 µs against 60 µs
    per read on the benchmark machine). The parameter is bound through its column's type
    (kit.columns.Hex for a subject key), as a session would bind it. The driver keeps the
    statement prepared: sqlite3 caches it per connection, psycopg prepares it server-side
    after a few executions.
    """

    def __init__(self, engine: Engine, statement: sa.Select[*tuple[Any, ...]], parameter: str) -> None:
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        if set(compiled.params) != {parameter}:
            raise ValueError(f"the statement must take exactly the parameter {parameter!r}")
        self._engine = engine
        self._sql = compiled.string
        self._positional = compiled.positiontup is not None
        self._parameter = parameter
        # The parameter's own bind conversion (a subject key's hex to its stored bytes).
        self._bind = compiled.binds[parameter].type.dialect_impl(dialect).bind_processor(dialect)
        self._convert = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.selected_columns
        ]
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
        self._operational_error: type[Exception] = dialect.loaded_dbapi.OperationalError

    def rows(self, value: object) -> list[list[Any]]:
        if self._bind is not None:
            value = self._bind(value)
        params: Any = (value,) if self._positional else {self._parameter: value}
        try:
            connection = self._engine.raw_connection()
        except self._dbapi_error as exc:
            # The store cannot be opened: it does not exist yet (score creates it) or is down.
            _unavailable_if_store_missing(exc, isinstance(exc, self._operational_error), exc)
            raise
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self._sql, params)
                raw = cursor.fetchall()
            finally:
                cursor.close()
        except self._dbapi_error as exc:
            connection.invalidate(exc)
            _unavailable_if_store_missing(exc, isinstance(exc, self._operational_error), exc)
            raise
        finally:
            # Back to the pool, which ends the (read-only) transaction.
            connection.close()
        convert = self._convert
        return [[v if f is None else f(v) for f, v in zip(convert, row, strict=True)] for row in raw]


def _unavailable_if_store_missing(exc: Exception, operational: bool, driver_error: object) -> None:
    """Score has not created or migrated its store yet, or it is down: retryable. Any other
    database error is a bug and stays INTERNAL."""
    if operational or getattr(driver_error, "sqlstate", None) == _UNDEFINED_TABLE:
        raise Unavailable("the score store is not available yet") from exc


class SqlScoreReader:
    """ScoreReadStore on SQLAlchemy over score's tables."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = make_session_factory(engine)
        self._score = PreparedRead(engine, _SCORE_QUERY, "key")
        self._holds = PreparedRead(engine, _HOLDS_QUERY, "key")

    def _read(self, work: Callable[[Session], T]) -> T:
        try:
            with self._sessions() as session:
                return work(session)
        except sa.exc.DBAPIError as exc:
            _unavailable_if_store_missing(exc, isinstance(exc, sa.exc.OperationalError), exc.orig)
            raise

    def score(self, subject_key: str) -> SubjectScore | None:
        rows = self._score.rows(subject_key)
        if not rows or not rows[0][2]:
            return None
        kind, score, tier, updated_at, version, entries, lists, next_change_at = rows[0][:8]
        return SubjectScore(
            subject_key=subject_key,
            subject_kind=kind,
            score=score,
            tier=tier,
            categories=tuple(CategoryScore(r[8], r[9], r[10], r[11]) for r in rows if r[8] is not None),
            as_of=updated_at,
            policy_version=version,
            entry_count=entries,
            lists=tuple(
                ListMembership(name, tuple(reasons), tuple(ids))
                for name, reasons, ids in json.loads(lists or "[]")
            ),
            next_change_at=next_change_at,
        )

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

    def consent_at(self, subject_key: str, at: datetime) -> Consent | None:
        return self._read(lambda session: consent_at(session, subject_key, at))

    def key_generation(self) -> tuple[str, bool] | None:
        def work(session: Session) -> tuple[str, bool] | None:
            # A store from before generations has no marker: its keys are of the root generation.
            if not sa.inspect(session.connection()).has_table(ScoreSubjectKeyGeneration.__tablename__):
                return None
            return read_marker(session, ScoreSubjectKeyGeneration)

        return self._read(work)

    def holds(self, subject_key: str) -> bool:
        return bool(self._holds.rows(subject_key))

    def activation_marks(self) -> Sequence[tuple[str, datetime]]:
        def work(session: Session) -> list[tuple[str, datetime]]:
            rows = session.execute(
                sa.select(StoredPolicy.version, StoredPolicy.activated_at).order_by(
                    StoredPolicy.activated_at, StoredPolicy.version
                )
            )
            return [(version, activated_at) for version, activated_at in rows]

        return self._read(work)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(n for n in (text or "").split(",") if n)


def _history_row(row: StoredHistory) -> HistoryRow:
    return HistoryRow(
        history_id=row.history_id,
        changed_at=row.changed_at,
        recorded_at=row.recorded_at,
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
        ended_entry_ids=tuple(json.loads(row.ended_entry_ids or "[]")),
        resumed_entry_ids=tuple(json.loads(row.resumed_entry_ids or "[]")),
        note=row.note or "",
    )
