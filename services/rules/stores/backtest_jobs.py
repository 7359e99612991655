"""Background backtests (StartBacktest) in rules_backtests: their state, progress and report."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, defer, sessionmaker

from kit import audit
from kit.db import as_utc
from services.rules.backtest_job import UNFINISHED, JobState, StoredJob
from services.rules.stores.schema import BacktestJobRow, RulesAuditHead, RulesAuditLog


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
