"""Backtests run: the replay on worker processes (services.rules.handlers.backtest_workers)
when there are several and the database is shareable, else here.

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
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from functools import partial

from opentelemetry import trace
from sqlalchemy.orm import Session, sessionmaker

from domain.catalogue import Catalogue, load_catalogue
from domain.policy import ScorePolicy
from domain.ruleset.model import RuleSet
from domain.ruleset.parsing import rule_set_from_yaml
from egret.rules.v1 import backtest_pb2 as pb
from kit.db import run_blocking
from kit.errors import ResourceExhausted
from kit.logging import get_logger
from kit.protoconv import to_datetime
from kit.pseudonym import Pseudonymiser
from services.rules import metrics
from services.rules.backtest import Backtest, BacktestScope, combine
from services.rules.backtest_job import Progress
from services.rules.backtest_messages import Contender, Plan, parse, response
from services.rules.backtest_report import BacktestReport
from services.rules.engine import RuleEngine
from services.rules.handlers.backtest_workers import (
    close_replay,
    opened,
    replay_page,
    replay_sharded,
    shareable,
)
from services.rules.lifecycle import RuleSetLifecycle, StoredRuleSet
from services.rules.records import engine_event_from_record
from services.rules.settings import RulesSettings
from services.rules.stores.history import HistoryReader

log = get_logger(__name__)


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
    """Runs backtests: BacktestRuleSet at once, and the background jobs' replays (BacktestJobs)."""

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
        scope, rule_limit, subject_limit = parse(request)
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
            while await run_blocking(self._executor, replay_page, pages, replay):
                pass
            report = await run_blocking(
                self._executor,
                partial(replay.report, as_of=as_of, rule_limit=rule_limit, subject_limit=subject_limit),
            )
        finally:
            # Both on the engine thread: the cursor was opened there, the engines live there.
            # Shielded: a second cancellation (a cancel, then a shutdown) still frees them.
            await asyncio.shield(run_blocking(self._executor, close_replay, pages, replay))
        return report

    def _start(self, baseline: RuleSet, candidate: RuleSet, policy: ScorePolicy) -> Backtest:
        return Backtest(
            baseline=baseline,
            candidate=candidate,
            policy=policy,
            cohort_attributes=self._cohort_attributes,
            make_engine=RuleEngine,
        )


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
