"""Backtests replayed in worker processes, one shard of subjects each.

With more than one worker (EGRET_BACKTEST_WORKERS, by default one per CPU) the
subjects are split into that many shards by a salted hash of the subject key, and each
shard is replayed in its own spawned process: it reads the history itself (skipping
other shards' records before decoding them), compiles both rule sets on its own
durable-rules, and returns a partial report (services.rules.backtest.PartialReport);
the partial reports are combined by the handler (services.rules.handlers.backtests).
Subjects are independent of each other, so the combined report is the one replaying
every subject together would give. Every worker reads the history up to the same
``evaluated_at`` (the latest one when the backtest started), so all replay the same
batches. The engine thread is not used, so live evaluation goes on meanwhile (sharing
the CPUs). A worker that fails or dies fails the backtest, and the workers are stopped
if the call is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import multiprocessing
import resource
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Final, TypeVar

import sqlalchemy as sa

from domain.policy import ScorePolicy
from domain.ruleset.parsing import rule_set_from_yaml
from kit.db import create_engine, is_sqlite, make_session_factory, run_blocking
from kit.errors import Unavailable
from kit.rekey import GenerationGuard
from services.rules.backtest import Backtest, BacktestScope, StoredEvent
from services.rules.backtest_job import Progress
from services.rules.backtest_report import PartialReport
from services.rules.engine import RuleEngine
from services.rules.records import engine_event_from_record
from services.rules.stores.history import HistoryReader, SharedView
from services.rules.stores.schema import RulesSubjectKeyGeneration

# Independent of the sample's salt and of the rules shards' hash of the bare key: a
# rules shard's subjects still spread evenly over its backtest workers.
_WORKER_SALT: Final = b"egret-bt-worker"

T = TypeVar("T")


async def opened(executor: Executor | None, open_: Callable[[], T], close: Callable[[T], None]) -> T:
    """``open_()`` run on ``executor``. A backtest cancelled meanwhile (CancelBacktest, a
    client's deadline, a shutdown) closes what it opens once it is open, on the same
    executor, rather than leave engines or a snapshot's transaction behind."""
    opening = asyncio.ensure_future(run_blocking(executor, open_))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await run_blocking(executor, close, await opening)
        raise


def shareable(database_url: str) -> bool:
    """Whether other processes can open the database (not an in-memory SQLite one)."""
    url = sa.make_url(database_url)
    if not is_sqlite(url):
        return True
    return bool(url.database) and url.database != ":memory:" and url.query.get("mode") != "memory"


@dataclass(frozen=True)
class ShardJob:
    """One worker process's share of a backtest, picklable: the subjects whose worker_of
    is ``shard``, every stored batch evaluated at ``until`` or before."""

    database_url: str
    baseline: str  # rule-set YAML
    candidate: str
    policy: ScorePolicy
    cohort_attributes: tuple[str, ...]
    scope: BacktestScope
    until: datetime
    as_of: datetime
    shard: int
    shards: int
    page_size: int
    subject_limit: int | None = None  # subjects to send back (None: every one)
    snapshot: str | None = None  # the PostgreSQL snapshot every worker reads (SharedView)
    key_id: str | None = None  # the subject key generation the replay must find stored


@dataclass(frozen=True)
class ShardResult:
    partial: PartialReport
    replay_seconds: float  # reading, decoding and replaying both sides
    report_seconds: float  # scoring the shard's subjects and tallying them
    peak_rss_mib: float  # the worker process's


def shard_jobs(
    database_url: str,
    baseline: str,
    candidate: str,
    *,
    policy: ScorePolicy,
    cohort_attributes: Sequence[str],
    scope: BacktestScope,
    until: datetime,
    as_of: datetime,
    workers: int,
    page_size: int,
    subject_limit: int | None = None,
    snapshot: str | None = None,
    key_id: str | None = None,
) -> list[ShardJob]:
    return [
        ShardJob(
            database_url,
            baseline,
            candidate,
            policy,
            tuple(cohort_attributes),
            scope,
            until,
            as_of,
            shard,
            workers,
            page_size,
            subject_limit,
            snapshot,
            key_id,
        )
        for shard in range(workers)
    ]


def worker_of(subject_key: str, shards: int) -> int:
    digest = hashlib.blake2b(subject_key.encode(), digest_size=8, person=_WORKER_SALT).digest()
    return int.from_bytes(digest, "big") % shards


def replay_shard(job: ShardJob, read: Callable[[int], None] | None = None) -> ShardResult:
    """Replay one shard of subjects (in a worker process): what the in-process replay does
    for every subject, for these subjects only. ``read`` is told the stored events each
    page read."""
    engine = create_engine(job.database_url)
    try:
        sessions = make_session_factory(engine)
        if job.key_id is not None and job.snapshot is None:
            # Read page by page in transactions of its own, the worker is held to the key
            # generation like the service: a re-keying job started meanwhile makes it fail
            # (UNAVAILABLE) instead of replaying one subject as two. Workers reading the
            # service's exported PostgreSQL snapshot see one consistent state already (and
            # that import must be their transaction's first statement).
            GenerationGuard(RulesSubjectKeyGeneration, job.key_id).install(sessions)
        reader = HistoryReader(sessions, engine_event_from_record, job.page_size)
        backtest = Backtest(
            baseline=rule_set_from_yaml(job.baseline),
            candidate=rule_set_from_yaml(job.candidate),
            policy=job.policy,
            cohort_attributes=job.cohort_attributes,
            make_engine=RuleEngine,
        )
        try:
            started = time.perf_counter()
            pages = reader.pages(
                job.scope,
                until=job.until,
                owns=lambda key: worker_of(key, job.shards) == job.shard,
                snapshot=job.snapshot,
                read=read,
            )
            for page in pages:
                backtest.feed(page)
            replayed = time.perf_counter()
            part = backtest.partial(as_of=job.as_of, subject_limit=job.subject_limit)
        finally:
            backtest.close()
    finally:
        engine.dispose()
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return ShardResult(part, replayed - started, time.perf_counter() - replayed, peak)


async def replay_sharded(
    reader: HistoryReader,
    database_url: str,
    baseline: str,
    candidate: str,
    *,
    policy: ScorePolicy,
    cohort_attributes: Sequence[str],
    scope: BacktestScope,
    as_of: datetime,
    workers: int,
    subject_limit: int | None,
    executor: Executor | None = None,
    key_id: str | None = None,
    progress: Progress | None = None,
) -> list[ShardResult] | None:
    """Replay the stored history in ``workers`` processes (None: nothing stored yet).

    Every worker reads the same history: up to the same ``evaluated_at`` and, on
    PostgreSQL, in one exported snapshot held until they are done. ``executor`` runs the
    blocking reads of that view (None: the default pool). ``progress`` is told the events
    to replay and what each worker has read."""
    view = await opened(executor, reader.shared_view, SharedView.close)
    try:
        if view.until is None:
            return None
        if progress is not None:
            total = await run_blocking(None, partial(reader.count, scope, until=view.until))
            progress.expect(total, workers=workers)
        jobs = shard_jobs(
            database_url,
            baseline,
            candidate,
            policy=policy,
            cohort_attributes=cohort_attributes,
            scope=scope,
            until=view.until,
            as_of=as_of,
            workers=workers,
            page_size=reader.page_size,
            subject_limit=subject_limit,
            snapshot=view.snapshot,
            key_id=key_id,
        )
        return await replay_in_workers(jobs, progress)
    finally:
        await asyncio.shield(run_blocking(executor, view.close))


async def replay_in_workers(jobs: Sequence[ShardJob], progress: Progress | None = None) -> list[ShardResult]:
    """Run each job in its own spawned process (forking a process that runs gRPC's
    threads is unsafe); the processes are stopped on failure or cancellation. Each
    worker reports the stored events it has read over its pipe, after every page."""
    context = multiprocessing.get_context("spawn")
    workers: list[tuple[BaseProcess, Connection]] = []
    try:
        for job in jobs:
            receiver, sender = context.Pipe(duplex=False)
            process: BaseProcess = context.Process(
                target=_work, args=(job, sender), name=f"rules-backtest-{job.shard}", daemon=True
            )
            process.start()
            sender.close()  # so that the receiver sees EOF if the worker dies
            workers.append((process, receiver))
        return list(
            await asyncio.gather(
                *(
                    asyncio.to_thread(_receive, process, receiver, shard, progress)
                    for shard, (process, receiver) in enumerate(workers)
                )
            )
        )
    finally:
        for process, receiver in workers:
            if process.is_alive():
                process.terminate()
            process.join()
            receiver.close()


# A worker's replay holds hundreds of MB of small, acyclic objects (history, ledger
# lines) that the default thresholds make the cyclic collector walk again and again:
# about a fifth of a worker's CPU on a million events. It still collects, rarely; the
# process ends with its backtest.
_WORKER_GC_THRESHOLDS: Final = (1_000_000, 100, 100)


# What a worker sends over its pipe: (_READ, stored events read so far) after every page,
# then (_DONE, ShardResult) or (_FAILED, Unavailable or the error in words).
_READ: Final = "read"
_DONE: Final = "done"
_FAILED: Final = "failed"


def _work(job: ShardJob, sender: Connection) -> None:
    gc.set_threshold(*_WORKER_GC_THRESHOLDS)
    read = 0

    def report_read(rows: int) -> None:
        nonlocal read
        read += rows
        sender.send((_READ, read))

    try:
        result = replay_shard(job, read=report_read)
    except Unavailable as error:
        # The caller retries (the keys moved under the replay): no traceback to report.
        sender.send((_FAILED, Unavailable(str(error))))
    except BaseException as error:
        sender.send((_FAILED, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    else:
        sender.send((_DONE, result))
    finally:
        sender.close()


def _receive(
    process: BaseProcess, receiver: Connection, shard: int, progress: Progress | None
) -> ShardResult:
    while True:
        try:
            kind, value = receiver.recv()
        except EOFError:
            process.join()
            raise RuntimeError(
                f"backtest worker {process.name} died (exit code {process.exitcode})"
            ) from None
        if kind == _READ:
            if progress is not None:
                progress.reached(value, worker=shard)
            continue
        if kind == _FAILED:
            if isinstance(value, Unavailable):
                raise value
            raise RuntimeError(f"backtest worker {process.name} failed: {value}")
        assert isinstance(value, ShardResult)
        return value


def replay_page(pages: Iterator[list[StoredEvent]], replay: Backtest) -> bool:
    page = next(pages, None)
    if page is None:
        return False
    replay.feed(page)
    return True


def close_replay(pages: Iterator[list[StoredEvent]], replay: Backtest) -> None:
    try:
        close = getattr(pages, "close", None)
        if close is not None:
            close()
    finally:
        replay.close()
