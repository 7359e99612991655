"""Background backtests (StartBacktest, GetBacktest, ListBacktests): the job around
BacktestHandler's replay, stored in rules_backtests.

StartBacktest checks the request exactly as BacktestRuleSet (the handler's ``plan``),
takes the instance's one backtest slot, resolves the two rule sets, stores the job and
answers; the replay then runs as a task on the service's loop, on the same engine
thread or worker processes as BacktestRuleSet. While it runs a ticker writes its
progress at most once a second and its heartbeat at least every 15 seconds. The
instance fails its own unfinished jobs when it starts (a restart), and a read fails
any unfinished job whose heartbeat is older than two minutes (an instance that died
and did not come back under its name). CancelBacktest stores the job cancelled and
stops its replay here, or, when another instance runs it, that instance's ticker finds
its row no longer unfinished and stops it. docs/backtests.md, "Background backtests".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Final

from egret.rules.v1 import backtest_pb2 as pb
from kit import audit
from kit.db import run_blocking
from kit.errors import NotFound
from kit.logging import get_logger
from kit.purposes import StatedPurpose
from kit.reads import ReadLog
from services.rules.backtest_job import (
    CANCEL_WAIT,
    HEARTBEAT,
    INTERRUPTED,
    PROGRESS_INTERVAL,
    STALE_AFTER,
    JobState,
    Progress,
    StoredJob,
    cancels,
    in_words,
)
from services.rules.backtest_messages import Contender, Plan, backtest_scope
from services.rules.handlers.backtests import BacktestHandler
from services.rules.lifecycle import Actor
from services.rules.stores.backtest_jobs import SqlBacktestJobStore

log = get_logger(__name__)

MAX_PAGE_SIZE: Final = 200


@dataclass(frozen=True)
class JobPage:
    items: tuple[StoredJob, ...]
    next_before: int | None  # the row id the next page starts below; None on the last page


@dataclass(frozen=True)
class _Running:
    """A job replaying on this instance."""

    task: asyncio.Task[None]
    progress: Progress


class BacktestJobs:
    """Starts, runs and reads background backtests; RulesServicer delegates to it."""

    def __init__(
        self,
        store: SqlBacktestJobStore,
        handler: BacktestHandler,
        reads: ReadLog,
        *,
        clock: Callable[[], datetime],
        instance: str,
        key_id: str,
    ) -> None:
        self._store = store
        self._handler = handler
        self._reads = reads
        self._clock = clock
        self._instance = instance
        self._key_id = key_id
        self._running: dict[str, _Running] = {}

    @property
    def key_id(self) -> str:
        """The subject key generation of reports made here."""
        return self._key_id

    def recover(self) -> int:
        """At start-up: fail the jobs this instance left unfinished when it stopped."""
        failed = self._store.fail_unfinished(error=INTERRUPTED, at=self._clock(), instance=self._instance)
        if failed:
            log.warning("backtests interrupted by a restart marked failed", backtests=failed)
        return failed

    async def start(
        self, request: pb.BacktestRuleSetRequest, *, purpose: StatedPurpose | None, started_by: str
    ) -> StoredJob:
        plan = self._handler.plan(request, list_subjects=purpose is not None)
        self._handler.reserve()
        try:
            contenders = await self._handler.contenders(request.rule_set_id)
            now = self._clock()
            job = await run_blocking(
                None,
                self._store.add,
                StoredJob(
                    row_id=0,
                    backtest_id=str(uuid.uuid4()),
                    rule_set_id=request.rule_set_id,
                    state="queued",
                    events_replayed=0,
                    events_total=0,
                    started_at=now,
                    heartbeat_at=now,
                    finished_at=None,
                    started_by=started_by,
                    instance=self._instance,
                    subject_key_id=self._key_id,
                    request=request.SerializeToString(),
                    report=None,
                    error="",
                ),
            )
        except BaseException:
            self._handler.release()
            raise
        # The task keeps the call's context: its principal is who the read is recorded of.
        progress = Progress()
        task = asyncio.create_task(self._run(job, plan, contenders, purpose, progress))
        self._running[job.backtest_id] = _Running(task, progress)
        # Released when the task ends however it ends, even cancelled before it ran a step.
        task.add_done_callback(partial(self._ended, job.backtest_id))
        log.info("backtest started", backtest_id=job.backtest_id, rule_set_id=job.rule_set_id)
        return job

    async def get(self, backtest_id: str) -> StoredJob:
        await self._fail_stale()
        job = await run_blocking(None, self._store.get, backtest_id) if backtest_id else None
        if job is None:
            raise NotFound(f"no backtest {backtest_id!r}")
        return job

    async def cancel(self, backtest_id: str, *, by: Actor, any_job: bool) -> StoredJob:
        """Stops an unfinished job (``cancels`` decides) and stores it cancelled with the
        audit record of the act; when it ran here, answers once its replay stopped and the
        slot is free (or after CANCEL_WAIT). A job cancelled already is returned unchanged."""
        job = await self.get(backtest_id)
        if not cancels(job, by=by.name, any_job=any_job):
            return job
        running = self._running.get(backtest_id)
        at = self._clock()
        record = audit.AuditRecord(
            "backtest.cancel",
            by.name,
            by.role or "unauthenticated",
            at,
            target=f"backtest:{backtest_id}",
            detail={"rule_set_id": job.rule_set_id, "started_by": job.started_by, "state": job.state},
        )
        # What the replay here has read by now, rather than its last write (up to a second old).
        progress = None if running is None else (running.progress.replayed, running.progress.total)
        cancelled = await run_blocking(
            None,
            lambda: self._store.cancel(backtest_id, by=by.name, at=at, record=record, progress=progress),
        )
        if cancelled:
            log.info("backtest cancelled", backtest_id=backtest_id, by=by.name)
            if running is not None:
                running.task.cancel()
                await asyncio.wait({running.task}, timeout=CANCEL_WAIT.total_seconds())
        stored = await self.get(backtest_id)
        # Not cancelled: it finished (or another call cancelled it) since it was read.
        if not cancelled:
            cancels(stored, by=by.name, any_job=any_job)
        return stored

    async def list(self, *, rule_set_id: int | None, before: int | None, size: int) -> JobPage:
        await self._fail_stale()
        rows = await run_blocking(
            None, lambda: self._store.list(rule_set_id=rule_set_id, before=before, limit=size + 1)
        )
        more = len(rows) > size
        rows = rows[:size]
        return JobPage(tuple(rows), rows[-1].row_id if more else None)

    async def close(self) -> None:
        """At shutdown: stop the running jobs (each is stored as failed)."""
        tasks = [running.task for running in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _ended(self, backtest_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(backtest_id, None)
        self._handler.release()

    async def _fail_stale(self) -> None:
        now = self._clock()
        await run_blocking(
            None,
            lambda: self._store.fail_unfinished(error=INTERRUPTED, at=now, stale_before=now - STALE_AFTER),
        )

    async def _run(
        self,
        job: StoredJob,
        plan: Plan,
        contenders: tuple[Contender, Contender],
        purpose: StatedPurpose | None,
        progress: Progress,
    ) -> None:
        try:
            if not await self._write_progress(job.backtest_id, "running", progress):
                return  # cancelled while queued
            run = asyncio.current_task()
            assert run is not None
            ticker = asyncio.create_task(self._tick(job.backtest_id, progress, run))
            try:
                response = await self._handler.run(plan, contenders, progress)
            finally:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            if purpose is not None:
                # Recorded before the subjects are stored for GetBacktest to show.
                await self._reads.record(
                    "StartBacktest",
                    [s.subject_key for s in response.subjects],
                    purpose,
                    target=f"rule_set:{job.rule_set_id}",
                    detail={"backtest_id": job.backtest_id, **backtest_scope(plan.request, response)},
                )
            await self._finish(
                job.backtest_id,
                "succeeded",
                progress,
                replayed=progress.total,
                report=response.SerializeToString(),
            )
            log.info("backtest succeeded", backtest_id=job.backtest_id)
        except asyncio.CancelledError:
            # A cancelled job's row is finished already, and stays as CancelBacktest stored it.
            await asyncio.shield(self._finish(job.backtest_id, "failed", progress, error=INTERRUPTED))
            raise
        except Exception as error:
            log.warning("backtest failed", backtest_id=job.backtest_id, error=in_words(error), exc_info=True)
            await self._finish(job.backtest_id, "failed", progress, error=in_words(error))

    async def _tick(self, backtest_id: str, progress: Progress, run: asyncio.Task[object]) -> None:
        """Writes the progress when it moved, at most once per PROGRESS_INTERVAL, and the
        heartbeat at least every HEARTBEAT; stops ``run`` once the row is no longer
        unfinished (cancelled, possibly by another instance, or failed as stale)."""
        written = (progress.replayed, progress.total)
        last = self._clock()
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL.total_seconds())
            now = (progress.replayed, progress.total)
            if now != written or self._clock() - last >= HEARTBEAT:
                if not await self._write_progress(backtest_id, "running", progress):
                    if not run.cancelling():  # else CancelBacktest here stops it already
                        log.info("backtest stopped: its row was finished elsewhere", backtest_id=backtest_id)
                        run.cancel()
                    return
                written, last = now, self._clock()

    async def _write_progress(self, backtest_id: str, state: JobState, progress: Progress) -> bool:
        """Whether the job is still unfinished (and so was written)."""
        replayed, total, at = progress.replayed, progress.total, self._clock()
        return await run_blocking(
            None,
            lambda: self._store.progress(backtest_id, state=state, replayed=replayed, total=total, at=at),
        )

    async def _finish(
        self,
        backtest_id: str,
        state: JobState,
        progress: Progress,
        *,
        replayed: int | None = None,
        report: bytes | None = None,
        error: str = "",
    ) -> None:
        done, total, at = progress.replayed if replayed is None else replayed, progress.total, self._clock()
        try:
            await run_blocking(
                None,
                lambda: self._store.finish(
                    backtest_id, state=state, at=at, replayed=done, total=total, report=report, error=error
                ),
            )
        except Exception:
            # Left unfinished, it fails at the next start-up or once its heartbeat is stale.
            log.exception("a backtest's end could not be stored", backtest_id=backtest_id, state=state)
