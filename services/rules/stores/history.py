"""Reading stored history for backtests: rules_evaluated_events in evaluation order, in
pages.

The replay never writes (a background backtest's job row, services.rules.stores.backtest_jobs,
is its only write). One query,
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from domain.ruleset.model import EngineEvent
from kit.db import as_utc
from services.rules.backtest import BacktestScope, StoredEvent
from services.rules.stores.schema import EvaluatedEvent

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
