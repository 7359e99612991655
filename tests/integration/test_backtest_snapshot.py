"""A backtest's workers read one history, even while rules commits more of it.

On PostgreSQL the service exports a snapshot and every worker imports it, so a batch
committed after the backtest started (here: with an earlier evaluated_at, as another
rules replica's could be) is seen by none of them. SQLite cannot share a snapshot:
there the workers read up to the same evaluated_at, each in its own, and such a batch
is seen (docs/backtests.md says so); the test pins both behaviours.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.backtest import populate
from domain.policy import load_policy
from egret.common.v1 import event_pb2
from kit.db import create_engine, make_session_factory
from services.rules.backtest import BacktestScope
from services.rules.handlers.backtest_workers import replay_in_workers, shard_jobs
from services.rules.records import engine_event_from_record
from services.rules.stores.history import HistoryReader
from services.rules.stores.schema import EvaluatedEvent

ROOT = Path(__file__).resolve().parents[2]


def _commit_a_late_batch(url: str, evaluated_at: datetime) -> None:
    """Another replica's batch: a new event, evaluated before the latest stored batch."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            row = connection.execute(sa.select(EvaluatedEvent.__table__).limit(1)).mappings().one()
            recorded = event_pb2.RecordedEvent.FromString(row["record"])
            recorded.ref.event_id = "late-replica-batch"
            connection.execute(
                sa.insert(EvaluatedEvent),
                [
                    {
                        **row,
                        "event_id": recorded.ref.event_id,
                        "evaluated_at": evaluated_at,
                        "record": recorded.SerializeToString(),
                    }
                ],
            )
    finally:
        engine.dispose()


def test_workers_read_the_exported_snapshot_not_what_was_committed_after_it(database_url: str) -> None:
    stored = populate(database_url, 300, seed=5, batch_size=50)
    engine = create_engine(database_url)
    reader = HistoryReader(make_session_factory(engine), engine_event_from_record, page_size=64)
    source = (ROOT / "config/rulesets/sample.yaml").read_text(encoding="utf-8")
    postgres = sa.make_url(database_url).get_backend_name() == "postgresql"
    view = reader.shared_view()
    try:
        assert view.until is not None
        assert (view.snapshot is not None) == postgres
        _commit_a_late_batch(database_url, view.until - timedelta(seconds=1))

        def read(snapshot: str | None) -> int:
            pages = reader.pages(BacktestScope(), until=view.until, snapshot=snapshot)
            return sum(len(page) for page in pages)

        jobs = shard_jobs(
            database_url,
            source,
            source,
            policy=load_policy(ROOT / "config/policy.yaml"),
            cohort_attributes=(),
            scope=BacktestScope(),
            until=view.until,
            as_of=datetime.now(UTC),
            workers=2,
            page_size=64,
            snapshot=view.snapshot,
        )
        replayed = sum(r.partial.events for r in asyncio.run(replay_in_workers(jobs)))
        seen_now = read(None)
        seen_in_view = read(view.snapshot)
    finally:
        view.close()
        engine.dispose()

    assert seen_now == stored + 1  # the late batch is committed
    expected = stored if postgres else stored + 1
    assert seen_in_view == expected
    assert replayed == expected
