"""Reading stored history for backtests: rules_evaluated_events in evaluation order, in pages.

Read-only: a backtest never writes. One query, ordered by ``evaluated_at`` (the batch a
live evaluation committed), streamed a page at a time (a server-side cursor on
PostgreSQL, SQLite's own stepping), so memory stays bounded by the page size however
long the history; the query also gives the replay one consistent snapshot. Ties in
``evaluated_at`` are re-ordered by the replay, so the query needs no further sort key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from kit.db import as_utc
from services.rules.backtest import BacktestScope, StoredEvent
from services.rules.ruleset import EngineEvent
from services.rules.storage import EvaluatedEvent

Decode = Callable[[bytes], EngineEvent]


@dataclass(frozen=True)
class HistoryReader:
    """Pages of stored events within a backtest's scope; subjects outside the sample are
    skipped before their records are decoded."""

    sessions: sessionmaker[Session]
    decode: Decode
    page_size: int = 5000

    def latest(self) -> datetime | None:
        """When the last stored batch was evaluated (None: no history)."""
        table = EvaluatedEvent.__table__
        with self.sessions() as session:
            latest = session.execute(sa.select(sa.func.max(table.c.evaluated_at))).scalar_one()
        return None if latest is None else as_utc(latest)

    def pages(
        self,
        scope: BacktestScope,
        *,
        until: datetime | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> Iterator[list[StoredEvent]]:
        """Stored events in scope, evaluated at ``until`` or before (None: all), of the
        subjects ``owns`` accepts (None: all); ``owns`` is asked before decoding too."""
        table = EvaluatedEvent.__table__
        # Retracted events are history that never should have been: a candidate activated
        # live would never see them either (docs/rules.md, "Retractions and corrections").
        query = (
            sa.select(table.c.evaluated_at, table.c.subject_key, table.c.record)
            .where(table.c.retracted_at.is_(None))
            .order_by(table.c.evaluated_at)
        )
        if until is not None:
            query = query.where(table.c.evaluated_at <= until)
        if scope.occurred_from is not None:
            query = query.where(table.c.occurred_at >= scope.occurred_from)
        if scope.occurred_to is not None:
            query = query.where(table.c.occurred_at < scope.occurred_to)
        decode = self.decode
        with self.sessions() as session:
            result = session.execute(query, execution_options={"yield_per": self.page_size})
            for rows in result.partitions():
                page = [
                    StoredEvent(as_utc(evaluated_at), decode(record))
                    for evaluated_at, subject_key, record in rows
                    if (owns is None or owns(subject_key)) and scope.includes_subject(subject_key)
                ]
                if page:
                    yield page
