"""RulesService.BacktestRuleSet: protobuf ⇄ the backtest domain, and the replay's scheduling.

With more than one worker (EGRET_BACKTEST_WORKERS, by default one per CPU) the
subjects are split into that many shards by a salted hash of the subject key, and each
shard is replayed in its own spawned process: it reads the history itself (skipping
other shards' records before decoding them), compiles both rule sets on its own
durable-rules, and returns a partial report (services.rules.backtest.PartialReport);
the partial reports are combined here. Subjects are independent of each other, so the
combined report is the one replaying every subject together would give. Every worker
reads the history up to the same ``evaluated_at`` (the latest one when the backtest
started), so all replay the same batches. The engine thread is not used, so live
evaluation goes on meanwhile (sharing the CPUs). A worker that fails or dies fails the
backtest, and the workers are stopped if the call is cancelled.

With one worker, or a database other processes cannot open (in-memory SQLite), the
replay runs in this process. durable-rules is not thread-safe, so every step that
touches an engine (compiling the two rule sets, replaying a page, the report, freeing
the engines) then runs on the rules engine executor, the one thread live evaluation
uses. The replay is submitted one page at a time, so live batches queued meanwhile run
between pages instead of waiting for the whole backtest; reading a page happens in the
same step, on the same thread, so the database cursor is only ever touched from one
thread.
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final, NamedTuple, TypeVar

import sqlalchemy as sa
from opentelemetry import trace
from sqlalchemy.orm import Session, sessionmaker

from egret.rules.v1 import backtest_pb2 as pb
from kit.db import create_engine, is_sqlite, make_session_factory, run_blocking
from kit.errors import InvalidArgument, ResourceExhausted, Unavailable, Violation
from kit.logging import get_logger
from kit.protoconv import to_datetime, to_timestamp
from kit.pseudonym import Pseudonymiser
from kit.rekey import GenerationGuard
from services.ingest.catalogue import Catalogue, load_catalogue
from services.rules import metrics
from services.rules.backtest import (
    Backtest,
    BacktestReport,
    BacktestScope,
    Breakdown,
    PartialReport,
    StoredEvent,
    combine,
)
from services.rules.backtest_job import Progress
from services.rules.backtest_storage import HistoryReader, SharedView
from services.rules.lifecycle import RuleSetLifecycle, StoredRuleSet
from services.rules.records import engine_event_from_record
from services.rules.ruleset import RuleSet, rule_set_from_yaml
from services.rules.settings import RulesSettings
from services.rules.storage import RulesSubjectKeyGeneration
from services.score.policy import ScorePolicy

log = get_logger(__name__)

DEFAULT_RULE_LIMIT: Final = 20
MAX_RULE_LIMIT: Final = 1000
MAX_SUBJECT_LIMIT: Final = 10_000

# Independent of the sample's salt and of the rules shards' hash of the bare key: a
# rules shard's subjects still spread evenly over its backtest workers.
_WORKER_SALT: Final = b"egret-bt-worker"

T = TypeVar("T")


@dataclass(frozen=True)
class Contender:
    """A rule set taking part in a backtest; rule_set_id 0 when it is not stored."""

    rule_set_id: int
    rule_set: RuleSet
    source: str  # the YAML it was parsed from, which worker processes parse again


class Plan(NamedTuple):
    """A checked backtest request: what to replay, and what to list."""

    request: pb.BacktestRuleSetRequest
    scope: BacktestScope
    rule_limit: int
    subject_limit: int  # 0 when no purpose was stated


def cohort_attributes(catalogue: Catalogue) -> tuple[str, ...]:
    """Names of the attributes marked `cohort: true` on any event type, sorted."""
    return tuple(
        sorted(
            {
                spec.name
                for event_type in catalogue.event_types.values()
                for spec in event_type.attributes.values()
                if spec.cohort
            }
        )
    )


class BacktestHandler:
    """Runs BacktestRuleSet calls; RulesServicer delegates the RPC here."""

    def __init__(
        self,
        *,
        executor: Executor,
        reader: HistoryReader,
        policy: Callable[[], Awaitable[ScorePolicy]],
        cohort_attributes: Sequence[str],
        baseline: Callable[[], Contender],
        candidate: Callable[[int], Contender],
        clock: Callable[[], datetime],
        workers: int = 1,
        database_url: str | None = None,
        key_id: str | None = None,
    ) -> None:
        """``policy`` gives the score policy to score with, asked at the start of every
        backtest (score's active one: services.rules.policy_source). ``database_url`` is
        what worker processes read the history from; without one
        (or with one worker) the replay runs in this process. ``key_id`` is this instance's
        subject key generation, which the workers hold the database to (kit.rekey)."""
        self._clock = clock
        self._workers = workers
        self._database_url = database_url if database_url and shareable(database_url) else None
        self._key_id = key_id
        self._executor = executor
        self._reader = reader
        self._policy = policy
        self._cohort_attributes = tuple(cohort_attributes)
        self._baseline = baseline
        self._candidate = candidate
        self._running = False
        self._tracer = trace.get_tracer("egret.rules")

    def plan(self, request: pb.BacktestRuleSetRequest, *, list_subjects: bool = True) -> Plan:
        """The request checked (INVALID_ARGUMENT); without `list_subjects` (no purpose
        stated) the report names no subject."""
        scope, rule_limit, subject_limit = _parse(request)
        return Plan(request, scope, rule_limit, subject_limit if list_subjects else 0)

    def reserve(self) -> None:
        """Takes this instance's one backtest slot until ``release()``: a replay holds every
        replayed subject's entries in memory, and two would also take turns on the one
        engine thread."""
        if self._running:
            raise ResourceExhausted(
                "a backtest is already running on this instance; retry when it is done", retry_after_s=30.0
            )
        self._running = True

    def release(self) -> None:
        self._running = False

    async def contenders(self, rule_set_id: int) -> tuple[Contender, Contender]:
        """The baseline (the active rule set) and the candidate (NOT_FOUND if unknown)."""
        baseline = await run_blocking(self._executor, self._baseline)
        candidate = await run_blocking(self._executor, self._candidate, rule_set_id)
        return baseline, candidate

    async def backtest(
        self, request: pb.BacktestRuleSetRequest, *, list_subjects: bool = True
    ) -> pb.BacktestRuleSetResponse:
        """The report, at once (BacktestRuleSet)."""
        plan = self.plan(request, list_subjects=list_subjects)
        self.reserve()
        try:
            return await self.run(plan, await self.contenders(request.rule_set_id))
        finally:
            self.release()

    async def run(
        self, plan: Plan, contenders: tuple[Contender, Contender], progress: Progress | None = None
    ) -> pb.BacktestRuleSetResponse:
        """Replays a planned backtest; the caller holds the slot (``reserve``). ``progress``,
        when given, is told the events to replay and counts those replayed."""
        with (
            metrics.backtest_running(),
            self._tracer.start_as_current_span(
                "rules backtest", attributes={"egret.rule_set_id": plan.request.rule_set_id}
            ) as span,
        ):
            response = await self._backtest(plan, *contenders, progress)
            span.set_attributes(
                {
                    "egret.events": response.events_replayed,
                    "egret.subjects": response.overall.subjects,
                    "egret.subjects_changed": response.overall.subjects_changed,
                }
            )
            return response

    async def _backtest(
        self, plan: Plan, baseline: Contender, candidate: Contender, progress: Progress | None
    ) -> pb.BacktestRuleSetResponse:
        request, scope, rule_limit, subject_limit = plan
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else self._clock()
        # Asked anew for every backtest: an activation in score since the last one applies.
        policy = await self._policy()
        started = time.perf_counter()
        results = None
        if self._workers > 1 and self._database_url is not None:
            results = await replay_sharded(
                self._reader,
                self._database_url,
                baseline.source,
                candidate.source,
                policy=policy,
                cohort_attributes=self._cohort_attributes,
                scope=scope,
                as_of=as_of,
                workers=self._workers,
                subject_limit=subject_limit,
                executor=self._executor,
                key_id=self._key_id,
                progress=progress,
            )
        if results is not None:
            report = combine(
                [r.partial for r in results],
                baseline=baseline.rule_set,
                candidate=candidate.rule_set,
                policy=policy,
                cohort_attributes=self._cohort_attributes,
                as_of=as_of,
                rule_limit=rule_limit,
                subject_limit=subject_limit,
            )
        else:
            report = await self._replay_here(
                baseline,
                candidate,
                scope,
                policy,
                as_of=as_of,
                rule_limit=rule_limit,
                subject_limit=subject_limit,
                progress=progress,
            )
        elapsed = time.perf_counter() - started
        log.info(
            "backtest done",
            candidate=f"{candidate.rule_set.name}@{candidate.rule_set.version}",
            baseline=f"{baseline.rule_set.name}@{baseline.rule_set.version}",
            events=report.events_replayed,
            subjects=report.overall.subjects,
            changed=report.overall.subjects_changed,
            workers=self._workers if results is not None else 1,
            elapsed_s=round(elapsed, 3),
        )
        return response(report, baseline, candidate, subject_limit=subject_limit, elapsed=elapsed)

    async def _replay_here(
        self,
        baseline: Contender,
        candidate: Contender,
        scope: BacktestScope,
        policy: ScorePolicy,
        *,
        as_of: datetime,
        rule_limit: int,
        subject_limit: int,
        progress: Progress | None = None,
    ) -> BacktestReport:
        read = None
        if progress is not None:
            progress.expect(await run_blocking(None, self._reader.count, scope))
            read = progress.read
        replay = await opened(
            self._executor,
            partial(self._start, baseline.rule_set, candidate.rule_set, policy),
            lambda replay: replay.close(),
        )
        pages = self._reader.pages(scope, read=read)
        try:
            while await run_blocking(self._executor, _replay_page, pages, replay):
                pass
            report = await run_blocking(
                self._executor,
                partial(replay.report, as_of=as_of, rule_limit=rule_limit, subject_limit=subject_limit),
            )
        finally:
            # Both on the engine thread: the cursor was opened there, the engines live there.
            # Shielded: a second cancellation (a cancel, then a shutdown) still frees them.
            await asyncio.shield(run_blocking(self._executor, _close, pages, replay))
        return report

    def _start(self, baseline: RuleSet, candidate: RuleSet, policy: ScorePolicy) -> Backtest:
        return Backtest(
            baseline=baseline,
            candidate=candidate,
            policy=policy,
            cohort_attributes=self._cohort_attributes,
        )


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


def backtest_scope(
    request: pb.BacktestRuleSetRequest, response: pb.BacktestRuleSetResponse
) -> dict[str, object]:
    """What a backtest's read record keeps of the request: its scope and the instant
    scored (rerun over the same history, it lists the same subjects: the digest checks)."""
    scope: dict[str, object] = {
        "as_of": to_datetime(response.as_of).isoformat(),
        "sample_fraction": request.sample_fraction,
        "subject_limit": request.subject_limit,
    }
    for field in ("occurred_from", "occurred_to"):
        if request.HasField(field):
            scope[field] = to_datetime(getattr(request, field)).isoformat()
    return scope


def contender(stored: StoredRuleSet) -> Contender:
    """A stored rule set, parsed from its source (it was validated when it was stored)."""
    return Contender(stored.rule_set_id, rule_set_from_yaml(stored.source), stored.source)


def build_backtests(
    settings: RulesSettings,
    sessions: sessionmaker[Session],
    lifecycle: RuleSetLifecycle,
    executor: Executor,
    policy: Callable[[], Awaitable[ScorePolicy]],
) -> BacktestHandler:
    """The handler as the service wires it: history from the rules database, the rule sets
    from the lifecycle, the policy from score (``policy``: score's active one), the cohort
    attributes from the catalogue file."""
    return BacktestHandler(
        executor=executor,
        reader=HistoryReader(sessions, engine_event_from_record),
        policy=policy,
        cohort_attributes=cohort_attributes(load_catalogue(settings.catalogue_file)),
        baseline=lambda: contender(lifecycle.active()),
        candidate=lambda rule_set_id: contender(lifecycle.get(rule_set_id)),
        clock=lambda: datetime.now(UTC),
        workers=settings.backtest_workers,
        database_url=settings.common.database_url,
        key_id=Pseudonymiser.from_settings(settings.pseudonym).current_key_id,
    )


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


def _replay_page(pages: Iterator[list[StoredEvent]], replay: Backtest) -> bool:
    page = next(pages, None)
    if page is None:
        return False
    replay.feed(page)
    return True


def _close(pages: Iterator[list[StoredEvent]], replay: Backtest) -> None:
    try:
        close = getattr(pages, "close", None)
        if close is not None:
            close()
    finally:
        replay.close()


def _parse(request: pb.BacktestRuleSetRequest) -> tuple[BacktestScope, int, int]:
    problems: list[Violation] = []
    if request.rule_set_id <= 0:
        problems.append(Violation("rule_set_id", "is required", "REQUIRED"))
    occurred_from = to_datetime(request.occurred_from) if request.HasField("occurred_from") else None
    occurred_to = to_datetime(request.occurred_to) if request.HasField("occurred_to") else None
    if occurred_from is not None and occurred_to is not None and occurred_from >= occurred_to:
        problems.append(Violation("occurred_to", "must be after occurred_from", "OUT_OF_RANGE"))
    fraction = request.sample_fraction
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        problems.append(
            Violation("sample_fraction", "must lie in [0, 1] (0 means every subject)", "OUT_OF_RANGE")
        )
    if not 0 <= request.rule_limit <= MAX_RULE_LIMIT:
        problems.append(Violation("rule_limit", f"must lie in 0..{MAX_RULE_LIMIT}", "OUT_OF_RANGE"))
    if not 0 <= request.subject_limit <= MAX_SUBJECT_LIMIT:
        problems.append(Violation("subject_limit", f"must lie in 0..{MAX_SUBJECT_LIMIT}", "OUT_OF_RANGE"))
    if problems:
        raise InvalidArgument("invalid backtest request", problems)
    scope = BacktestScope(occurred_from, occurred_to, fraction or 1.0)
    return scope, request.rule_limit or DEFAULT_RULE_LIMIT, request.subject_limit


def response(
    report: BacktestReport, baseline: Contender, candidate: Contender, *, subject_limit: int, elapsed: float
) -> pb.BacktestRuleSetResponse:
    return pb.BacktestRuleSetResponse(
        baseline=_rule_set(baseline),
        candidate=_rule_set(candidate),
        policy_version=report.policy_version,
        events_replayed=report.events_replayed,
        batches_replayed=report.batches_replayed,
        overall=_breakdown(report.overall),
        cohorts=[
            pb.BacktestCohort(dimension=c.dimension, value=c.value, breakdown=_breakdown(c.breakdown))
            for c in report.cohorts
        ],
        subjects=[
            pb.BacktestSubject(
                subject_key=s.subject_key,
                subject_kind=s.subject_kind,
                baseline_score=s.baseline.score,
                baseline_tier=s.baseline.tier,
                candidate_score=s.candidate.score,
                candidate_tier=s.candidate.tier,
            )
            for s in report.subjects[:subject_limit]
        ],
        elapsed_seconds=elapsed,
        baseline_failed_events=report.baseline_failed_events,
        candidate_failed_events=report.candidate_failed_events,
        as_of=to_timestamp(report.as_of),
    )


def _rule_set(contender: Contender) -> pb.BacktestedRuleSet:
    rule_set = contender.rule_set
    return pb.BacktestedRuleSet(
        rule_set_id=contender.rule_set_id,
        name=rule_set.name,
        version=rule_set.version,
        source_sha256=rule_set.source_sha256,
    )


def _breakdown(breakdown: Breakdown) -> pb.BacktestBreakdown:
    buckets = []
    for bucket in breakdown.score_changes:
        fields: dict[str, Any] = {"label": bucket.label, "subjects": bucket.subjects}
        if bucket.min_change is not None:
            fields["min_change"] = bucket.min_change
        if bucket.max_change is not None:
            fields["max_change"] = bucket.max_change
        buckets.append(pb.ScoreChangeBucket(**fields))
    return pb.BacktestBreakdown(
        subjects=breakdown.subjects,
        subjects_changed=breakdown.subjects_changed,
        migrations=[
            pb.TierMigration(from_tier=m.from_tier, to_tier=m.to_tier, subjects=m.subjects)
            for m in breakdown.migrations
        ],
        score_changes=buckets,
        rules=[
            pb.RuleImpact(
                rule_id=r.rule_id,
                baseline_firings=r.baseline_firings,
                candidate_firings=r.candidate_firings,
                baseline_points=r.baseline_points,
                candidate_points=r.candidate_points,
                points_moved=r.points_moved,
            )
            for r in breakdown.rules
        ],
    )
