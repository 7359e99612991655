"""Query's access log with a commit interval (EGRET_QUERY_ACCESS_LOG_COMMIT_INTERVAL_MS), on
real SQLite: records of reads arriving within the interval share one commit, each read is
answered only once its own record is committed, and the chain stays whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kit import audit
from kit.audit import AuditKeys, AuditRecord
from kit.db import create_engine
from kit.migrations import upgrade
from services.query.bootstrap import MIGRATIONS
from services.query.stores.access_log import AccessRecorder, QueryAuditHead, QueryAuditLog, SqlAccessLog

KEYS = AuditKeys("k1", {"k1": b"k" * 32})
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


class CountingLog(SqlAccessLog):
    """The real store, counting its commits."""

    commits: list[int]

    def append(self, records: Sequence[AuditRecord]) -> None:
        super().append(records)
        self.commits.append(len(records))


def _record(i: int) -> AuditRecord:
    return audit.record("read:GetScore", T0, subject_key=f"{i:064x}", purpose="subject-request")


def _stored(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(QueryAuditLog)).scalar_one())


Recorders = Callable[[float], AccessRecorder]


@pytest.fixture
async def recorder_on(tmp_path: Path) -> AsyncIterator[tuple[Recorders, CountingLog, sa.Engine]]:
    """A recorder with the given commit interval on a real SQLite access log."""
    engine = create_engine(f"sqlite:///{tmp_path / 'query.db'}")
    upgrade(engine, MIGRATIONS, "query_alembic_version")
    store = CountingLog(engine, audit_keys=KEYS)
    store.commits = []
    executor = ThreadPoolExecutor(max_workers=1)
    made: list[AccessRecorder] = []

    def make(interval_s: float) -> AccessRecorder:
        made.append(AccessRecorder(store, executor, lambda: T0, commit_interval_s=interval_s))
        return made[-1]

    yield make, store, engine
    for recorder in made:
        await recorder.close()
    executor.shutdown()
    engine.dispose()


async def test_reads_within_the_interval_share_a_commit_and_each_waits_for_its_own(
    recorder_on: tuple[Recorders, CountingLog, sa.Engine],
) -> None:
    make, store, engine = recorder_on
    recorder = make(1.0)
    await recorder.record([_record(0)])  # after a quiet spell: committed at once
    assert store.commits == [1]
    assert _stored(engine) == 1

    async def read(i: int) -> int:
        await recorder.record([_record(i)])
        return _stored(engine)  # what the database holds when the read is answered

    reads = []
    for i in range(1, 6):  # five reads, 10 ms apart, well within the interval
        reads.append(asyncio.create_task(read(i)))
        await asyncio.sleep(0.01)
    seen = await asyncio.gather(*reads)

    assert store.commits == [1, 5]
    assert seen == [6] * 5
    with Session(engine) as session:
        report = audit.verify(session, QueryAuditLog, QueryAuditHead, keys=KEYS)
    assert report.intact
    assert report.records == 6


async def test_without_an_interval_a_read_arriving_alone_commits_alone(
    recorder_on: tuple[Recorders, CountingLog, sa.Engine],
) -> None:
    make, store, _ = recorder_on
    recorder = make(0.0)
    for i in range(3):
        await recorder.record([_record(i)])
    assert store.commits == [1, 1, 1]
