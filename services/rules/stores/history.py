"""Reading stored history for backtests: rules_evaluated_events in evaluation order, in
pages; and storing background backtests (rules_backtests).

The replay never writes (a background backtest's job row is its only write). One query,
ordered by ``evaluated_at`` (the batch a live evaluation committed), streamed a page at
a time (a server-side cursor on PostgreSQL, SQLite's own stepping), so memory stays
bounded by the page size however long the history; the query also gives the replay one
consistent snapshot. Ties in ``evaluated_at`` are re-ordered by the replay, so the query
needs no further sort key.

Worker processes each run that query on their own connection. On PostgreSQL they all
import one snapshot the service exported (``shared_view``), so every worker reads the
same history even while rules replicas commit batches; SQLite has no way to share a
snapshot, so there each worker reads up to the same ``evaluated_at`` in its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, defer, sessionmaker

from kit import audit
from kit.db import as_utc
from services.rules.backtest import BacktestScope, StoredEvent
from services.rules.backtest_job import UNFINISHED, JobState, StoredJob
from services.rules.ruleset import EngineEvent
from services.rules.storage import BacktestJobRow, EvaluatedEvent, RulesAuditHead, RulesAuditLog

Decode = Callable[[bytes], EngineEvent]

_REPEATABLE_READ = {"isolation_level": "REPEATABLE READ"}
# What pg_export_snapshot() returns ("00000003-0000001B-1"); checked before it is spliced
# into SET TRANSACTION SNAPSHOT, which takes no bind parameters.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(-[0-9A-F]+)+")


@dataclass
class SharedView:
    """What every worker of one backtest reads: batches evaluated at ``until`` or before
    (None: no history), and on PostgreSQL the snapshot they import. ``close()`` ends the
    exporting transaction once the workers are done."""

    until: datetime | None
    snapshot: str | None
    _session: Session | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


@dataclass(frozen=True)
class HistoryReader:
    """Pages of stored events within a backtest's scope; subjects outside the sample are
    skipped before their records are decoded."""

    sessions: sessionmaker[Session]
    decode: Decode
    page_size: int = 5000

    def shared_view(self) -> SharedView:
        """The view a backtest's workers share: the latest ``evaluated_at`` and, on
        PostgreSQL, a snapshot exported from a transaction that stays open until
        ``close()`` (workers must import it before then)."""
        session = self.sessions()
        if session.get_bind().dialect.name != "postgresql":
            with session:
                return SharedView(self._latest(session), None)
        try:
            session.connection(execution_options=_REPEATABLE_READ)
            snapshot = str(session.execute(sa.text("SELECT pg_export_snapshot()")).scalar_one())
            return SharedView(self._latest(session), snapshot, session)
        except BaseException:
            session.close()
            raise

    @staticmethod
    def _latest(session: Session) -> datetime | None:
        table = EvaluatedEvent.__table__
        latest = session.execute(sa.select(sa.func.max(table.c.evaluated_at))).scalar_one()
        return None if latest is None else as_utc(latest)

    def count(self, scope: BacktestScope, *, until: datetime | None = None) -> int:
        """The stored events ``pages`` reads for this scope (before the sample): what a
        background backtest's progress is measured against."""
        table = EvaluatedEvent.__table__
        query = _in_scope(sa.select(sa.func.count()).select_from(table), scope, until)
        with self.sessions() as session:
            return int(session.execute(query).scalar_one())

    def pages(
        self,
        scope: BacktestScope,
        *,
        until: datetime | None = None,
        owns: Callable[[str], bool] | None = None,
        snapshot: str | None = None,
        read: Callable[[int], None] | None = None,
    ) -> Iterator[list[StoredEvent]]:
        """Stored events in scope, evaluated at ``until`` or before (None: all), of the
        subjects ``owns`` accepts (None: all); ``owns`` is asked before decoding too.
        ``snapshot`` (PostgreSQL) is a SharedView's: the read sees exactly that snapshot.
        ``read`` is told how many stored events each page read, kept or not."""
        table = EvaluatedEvent.__table__
        query = _in_scope(
            sa.select(table.c.evaluated_at, table.c.subject_key, table.c.record).order_by(
                table.c.evaluated_at
            ),
            scope,
            until,
        )
        decode = self.decode
        with self.sessions() as session:
            if snapshot is not None:
                if not _SNAPSHOT_ID.fullmatch(snapshot):
                    raise ValueError(f"not a PostgreSQL snapshot id: {snapshot!r}")
                session.connection(execution_options=_REPEATABLE_READ)
                session.execute(sa.text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
            result = session.execute(query, execution_options={"yield_per": self.page_size})
            for rows in result.partitions():
                if read is not None:
                    read(len(rows))
                page = [
                    StoredEvent(as_utc(evaluated_at), decode(record))
                    for evaluated_at, subject_key, record in rows
                    if (owns is None or owns(subject_key)) and scope.includes_subject(subject_key)
                ]
                if page:
                    yield page


def _in_scope(query: Any, scope: BacktestScope, until: datetime | None) -> Any:
    table = EvaluatedEvent.__table__
    # Retracted events are history that never should have been: a candidate activated
    # live would never see them either (docs/rules.md, "Retractions and corrections").
    query = query.where(table.c.retracted_at.is_(None))
    if until is not None:
        query = query.where(table.c.evaluated_at <= until)
    if scope.occurred_from is not None:
        query = query.where(table.c.occurred_at >= scope.occurred_from)
    if scope.occurred_to is not None:
        query = query.where(table.c.occurred_at < scope.occurred_to)
    return query


class SqlBacktestJobStore:
    """Background backtests in rules_backtests, one short transaction per call; a
    cancellation is committed with its record in rules' audit log."""

    def __init__(self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys

    def add(self, job: StoredJob) -> StoredJob:
        """Stores a new job (its row_id is ignored) and returns it with its row id."""
        row = BacktestJobRow(
            backtest_id=job.backtest_id,
            rule_set_id=job.rule_set_id,
            state=job.state,
            events_replayed=job.events_replayed,
            events_total=job.events_total,
            started_at=job.started_at,
            heartbeat_at=job.heartbeat_at,
            finished_at=job.finished_at,
            started_by=job.started_by,
            instance=job.instance,
            subject_key_id=job.subject_key_id,
            request=job.request,
            report=job.report,
            error=job.error,
            cancelled_by=job.cancelled_by,
        )
        with self._sessions() as session, session.begin():
            session.add(row)
            session.flush()
            return _job(row)

    def get(self, backtest_id: str) -> StoredJob | None:
        with self._sessions() as session:
            row = session.scalars(
                sa.select(BacktestJobRow).where(BacktestJobRow.backtest_id == backtest_id)
            ).one_or_none()
            return None if row is None else _job(row)

    def list(self, *, rule_set_id: int | None, before: int | None, limit: int) -> list[StoredJob]:
        """Newest first, from below row id ``before`` (None: the newest), without reports."""
        query = sa.select(BacktestJobRow).options(defer(BacktestJobRow.report))
        if rule_set_id is not None:
            query = query.where(BacktestJobRow.rule_set_id == rule_set_id)
        if before is not None:
            query = query.where(BacktestJobRow.id < before)
        with self._sessions() as session:
            rows = session.scalars(query.order_by(BacktestJobRow.id.desc()).limit(limit)).all()
            return [_job(row, with_report=False) for row in rows]

    def progress(self, backtest_id: str, *, state: JobState, replayed: int, total: int, at: datetime) -> bool:
        """An unfinished job's state, progress and heartbeat; False (nothing written) once
        it finished, was cancelled or was failed as stale: its replay should stop."""
        return self._update(
            backtest_id,
            UNFINISHED,
            state=state,
            events_replayed=replayed,
            events_total=total,
            heartbeat_at=at,
        )

    def finish(
        self,
        backtest_id: str,
        *,
        state: JobState,
        at: datetime,
        replayed: int,
        total: int,
        report: bytes | None = None,
        error: str = "",
    ) -> None:
        self._update(
            backtest_id,
            UNFINISHED,
            state=state,
            events_replayed=replayed,
            events_total=total,
            heartbeat_at=at,
            finished_at=at,
            report=report,
            error=error,
        )

    def cancel(
        self,
        backtest_id: str,
        *,
        by: str,
        at: datetime,
        record: audit.AuditRecord,
        progress: tuple[int, int] | None = None,
    ) -> bool:
        """Stores an unfinished job as cancelled by ``by``, its progress as stored or as
        ``progress`` (replayed, total) when the caller knows better, and appends ``record``
        to the audit log, in one transaction; False (nothing written) when the job is no
        longer unfinished."""
        values: dict[str, Any] = {
            "state": "cancelled",
            "finished_at": at,
            "heartbeat_at": at,
            "cancelled_by": by,
        }
        if progress is not None:
            values["events_replayed"], values["events_total"] = progress
        with self._sessions() as session, session.begin():
            if not _update_in(session, backtest_id, UNFINISHED, values):
                return False
            audit.append(session, RulesAuditLog, RulesAuditHead, [record], keys=self._audit_keys)
            return True

    def fail_unfinished(
        self, *, error: str, at: datetime, instance: str | None = None, stale_before: datetime | None = None
    ) -> int:
        """Fails the unfinished jobs of ``instance``, or those whose heartbeat is older
        than ``stale_before``; returns how many."""
        query = sa.update(BacktestJobRow).where(BacktestJobRow.state.in_(UNFINISHED))
        if instance is not None:
            query = query.where(BacktestJobRow.instance == instance)
        if stale_before is not None:
            query = query.where(BacktestJobRow.heartbeat_at < stale_before)
        with self._sessions() as session, session.begin():
            result = session.execute(
                query.values(state="failed", finished_at=at, heartbeat_at=at, error=error),
                execution_options={"synchronize_session": False},
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _update(self, backtest_id: str, states: Sequence[str], **values: Any) -> bool:
        with self._sessions() as session, session.begin():
            return _update_in(session, backtest_id, states, values)


def _update_in(session: Session, backtest_id: str, states: Sequence[str], values: dict[str, Any]) -> bool:
    """Updates the job if it is in one of ``states``; whether it was."""
    result = session.execute(
        sa.update(BacktestJobRow)
        .where(BacktestJobRow.backtest_id == backtest_id, BacktestJobRow.state.in_(states))
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    return bool(getattr(result, "rowcount", 0))


def _job(row: BacktestJobRow, *, with_report: bool = True) -> StoredJob:
    return StoredJob(
        row_id=row.id,
        backtest_id=row.backtest_id,
        rule_set_id=row.rule_set_id,
        state=cast(JobState, row.state),
        events_replayed=row.events_replayed,
        events_total=row.events_total,
        started_at=as_utc(row.started_at),
        heartbeat_at=as_utc(row.heartbeat_at),
        finished_at=as_utc(row.finished_at) if row.finished_at is not None else None,
        started_by=row.started_by,
        instance=row.instance,
        subject_key_id=row.subject_key_id,
        request=row.request,
        report=row.report if with_report else None,
        error=row.error,
        cancelled_by=row.cancelled_by,
    )
