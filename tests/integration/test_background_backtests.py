"""StartBacktest, GetBacktest, CancelBacktest and ListBacktests over real gRPC, on SQLite
and PostgreSQL: a backtest run in the background shows its progress and stores the report
BacktestRuleSet gives; it fails in words, refuses a second one meanwhile, lists subjects
only when both its start and its read state a purpose (each read recorded), is failed by
a restart, and is cancelled mid-run by its starter or an admin, freeing the slot."""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from devtools.localpki import LocalPki, create_local_pki
from egret.rules.v1 import backtest_pb2 as bt
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit import audit
from kit.app import migrate
from kit.audit import UNKEYED
from kit.db import create_engine, make_session_factory
from kit.interceptors import bearer_token
from kit.principal import Role
from kit.protoconv import to_timestamp
from services.rules import backtest
from services.rules import bootstrap as rules_bootstrap
from services.rules import settings as settings_module
from services.rules.backtest_job import INTERRUPTED, StoredJob
from services.rules.handlers import backtest_jobs as jobs_handler
from services.rules.handlers import backtest_workers as workers_handler
from services.rules.handlers import backtests as backtest_handler
from services.rules.settings import RulesSettings
from services.rules.stores.backtest_jobs import SqlBacktestJobStore
from services.rules.stores.history import HistoryReader
from services.rules.stores.schema import RulesAuditLog
from services.score import bootstrap as score_bootstrap
from services.score.settings import ScoreSettings
from tests.support.backtests import (
    ROOT,
    SAMPLE,
    Live,
    candidate_source,
    environment,
    evaluate,
    history,
    live,
    read_records,
)
from tests.support.servers import running
from tests.support.status import bad_request
from tests.support.waiting import until

# After the history is evaluated: an entry counts from when it was recorded.
AS_OF = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)


@pytest.fixture(autouse=True)
def observable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pages and frequent progress writes, so that a test history of a few thousand
    events is replayed in many steps a test can watch."""
    monkeypatch.setattr(backtest_handler, "HistoryReader", functools.partial(HistoryReader, page_size=50))
    monkeypatch.setattr(jobs_handler, "PROGRESS_INTERVAL", timedelta(seconds=0.05))


def slow_pages(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02) -> None:
    """The in-process replay takes `seconds` more per page (on the engine thread)."""
    replay_page = workers_handler.replay_page

    def slowly(*args: Any) -> bool:
        time.sleep(seconds)
        return replay_page(*args)

    monkeypatch.setattr(backtest_handler, "replay_page", slowly)


@asynccontextmanager
async def evaluated(
    make_url: Callable[[str], str], data_dir: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> AsyncIterator[tuple[Live, int]]:
    """Rules relaying to score, the test history evaluated and the candidate drafted, its
    backtests replayed by `workers` workers; yields them and the candidate's rule_set_id."""
    monkeypatch.setattr(settings_module, "default_workers", lambda: workers)
    async with live(SAMPLE.read_text(encoding="utf-8"), make_url, data_dir, "a") as a:
        await evaluate(a, history())
        draft = await a.rules.CreateDraft(pb.CreateDraftRequest(source=candidate_source()))
        yield a, draft.rule_set.rule_set_id


def request(rule_set_id: int, **fields: Any) -> bt.BacktestRuleSetRequest:
    fields = {"subject_limit": 10_000, "rule_limit": 1000, "as_of": to_timestamp(AS_OF), **fields}
    return bt.BacktestRuleSetRequest(rule_set_id=rule_set_id, **fields)


async def finished(rules: pb_grpc.RulesServiceAsyncStub, backtest_id: str) -> list[bt.BacktestJob]:
    """Every state GetBacktest showed, polled until the job finished."""
    seen: list[bt.BacktestJob] = []

    async def done() -> bool:
        job = (await rules.GetBacktest(bt.GetBacktestRequest(backtest_id=backtest_id))).backtest
        seen.append(job)
        return job.state in (
            bt.BACKTEST_STATE_SUCCEEDED,
            bt.BACKTEST_STATE_FAILED,
            bt.BACKTEST_STATE_CANCELLED,
        )

    await until(done, what=f"backtest {backtest_id} to finish", within_s=60, every_s=0.01)
    return seen


def without_time(report: bt.BacktestRuleSetResponse) -> bt.BacktestRuleSetResponse:
    copy = bt.BacktestRuleSetResponse()
    copy.CopyFrom(report)
    copy.ClearField("elapsed_seconds")
    return copy


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    code: grpc.StatusCode = error.value.code()
    return code


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_background_backtest_shows_progress_and_stores_the_synchronous_report(
    database_url: str,
    database_url_factory: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    slow_pages(monkeypatch)
    async with evaluated(database_url_factory, tmp_path, monkeypatch, int(workers)) as (a, rule_set_id):
        started = (
            await a.rules.StartBacktest(
                bt.StartBacktestRequest(backtest=request(rule_set_id, purpose="rule-backtest"))
            )
        ).backtest
        assert started.state in (bt.BACKTEST_STATE_QUEUED, bt.BACKTEST_STATE_RUNNING)
        assert started.rule_set_id == rule_set_id
        assert started.started_by == "anonymous"  # insecure mode: no principal
        assert started.request.purpose == "rule-backtest"
        assert not started.HasField("report")
        assert not started.HasField("finished_at")

        seen = await finished(a.rules, started.backtest_id)
        done = seen[-1]
        synchronous = await a.rules.BacktestRuleSet(request(rule_set_id, purpose="rule-backtest"))

    assert done.state == bt.BACKTEST_STATE_SUCCEEDED, done.error
    assert done.progress == 1.0
    assert done.events_replayed == done.events_total > 0
    assert done.events_total == synchronous.events_replayed  # no sample: every stored event
    assert done.HasField("finished_at")
    assert done.finished_at.ToDatetime() >= done.started_at.ToDatetime()
    # The progress only grows, and was seen part way.
    running_ = [j for j in seen if j.state == bt.BACKTEST_STATE_RUNNING]
    assert running_
    replayed = [j.events_replayed for j in seen]
    assert replayed == sorted(replayed)
    assert all(0 <= j.progress <= 1 and j.events_replayed <= j.events_total for j in seen)
    if workers == "1":
        assert any(0 < j.events_replayed < j.events_total for j in running_)
    # A plain read shows the report without its subjects.
    assert list(done.report.subjects) == []
    expected = without_time(synchronous)
    del expected.subjects[:]
    assert without_time(done.report) == expected
    assert done.report.overall.subjects_changed > 0


async def test_a_background_backtest_fails_in_words_runs_alone_and_lists_subjects_for_purposes(
    database_url: str,
    database_url_factory: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slow_pages(monkeypatch)
    async with evaluated(database_url_factory, tmp_path, monkeypatch, 1) as (a, rule_set_id):

        async def start(**fields: Any) -> bt.BacktestJob:
            response = await a.rules.StartBacktest(
                bt.StartBacktestRequest(backtest=request(rule_set_id, **fields))
            )
            job: bt.BacktestJob = response.backtest
            return job

        async def get(backtest_id: str, **fields: Any) -> bt.BacktestJob:
            response = await a.rules.GetBacktest(bt.GetBacktestRequest(backtest_id=backtest_id, **fields))
            job: bt.BacktestJob = response.backtest
            return job

        # Checked as BacktestRuleSet checks, fields named from the top of the request.
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await start(sample_fraction=1.5, purpose="curiosity")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(bad.value) == [("backtest.purpose", "UNKNOWN_PURPOSE")]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await start(sample_fraction=1.5)
        assert bad_request(bad.value) == [("backtest.sample_fraction", "OUT_OF_RANGE")]
        assert (
            await status_of(
                a.rules.StartBacktest(
                    bt.StartBacktestRequest(backtest=bt.BacktestRuleSetRequest(rule_set_id=9999))
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert await status_of(get("no-such-backtest")) == grpc.StatusCode.NOT_FOUND
        assert await status_of(get("")) == grpc.StatusCode.NOT_FOUND

        # One backtest at a time: neither another start nor BacktestRuleSet while it runs.
        first = await start()
        assert await status_of(start()) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            await status_of(a.rules.BacktestRuleSet(request(rule_set_id)))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert (await finished(a.rules, first.backtest_id))[-1].state == bt.BACKTEST_STATE_SUCCEEDED

        # Started without a purpose: no subjects stored, so none shown even for a purpose.
        assert read_records(a.rules_url) == []
        bare = await get(first.backtest_id, purpose="rule-backtest")
        assert list(bare.report.subjects) == []
        assert bare.report.overall.subjects > 0
        records = read_records(a.rules_url)
        assert [(r[0], r[1], r[2], r[3], r[4]["subjects"]) for r in records] == [
            ("read:GetBacktest", None, "rule-backtest", f"backtest:{first.backtest_id}", 0)
        ]

        # Started with one: the read of the subjects stored is recorded once it is done.
        purposed = await start(subject_limit=20, purpose="rule-backtest", purpose_note="RFC 12")
        assert (await finished(a.rules, purposed.backtest_id))[-1].state == bt.BACKTEST_STATE_SUCCEEDED
        started_reads = read_records(a.rules_url)[1:]
        assert len(started_reads) == 20
        assert {(r[0], r[2], r[3]) for r in started_reads} == {
            ("read:StartBacktest", "rule-backtest", f"rule_set:{rule_set_id}")
        }
        assert started_reads[0][4]["backtest_id"] == purposed.backtest_id
        assert started_reads[0][4]["purpose_note"] == "RFC 12"
        # Read without a purpose: the report, no subjects, nothing recorded.
        plain = await get(purposed.backtest_id)
        assert list(plain.report.subjects) == []
        assert plain.report.overall.subjects == bare.report.overall.subjects
        assert len(read_records(a.rules_url)) == 21
        # Read with one: the subjects, and that read recorded per subject.
        shown = await get(purposed.backtest_id, purpose="rule-backtest", purpose_note="case 9")
        keys = [s.subject_key for s in shown.report.subjects]
        assert len(keys) == 20
        assert sorted(keys) == [r[1] for r in started_reads]
        get_reads = read_records(a.rules_url)[21:]
        assert [(r[0], r[1], r[3]) for r in get_reads] == [
            ("read:GetBacktest", key, f"backtest:{purposed.backtest_id}") for key in sorted(keys)
        ]
        assert get_reads[0][4]["purpose_note"] == "case 9"
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await get(purposed.backtest_id, purpose="curiosity")
        assert bad_request(bad.value) == [("purpose", "UNKNOWN_PURPOSE")]

        # A candidate the replay fails on: FAILED, with the error in words; the slot is free.
        def refused(**_: Any) -> Any:
            raise RuntimeError("the engine refused the candidate: rule 'x' does not compile")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backtest_handler, "Backtest", refused)
            failed = (await finished(a.rules, (await start()).backtest_id))[-1]
        assert failed.state == bt.BACKTEST_STATE_FAILED
        assert failed.error == "the engine refused the candidate: rule 'x' does not compile"
        assert failed.HasField("finished_at")
        assert not failed.HasField("report")
        again = (await finished(a.rules, (await start()).backtest_id))[-1]
        assert again.state == bt.BACKTEST_STATE_SUCCEEDED
        url = a.rules_url
    monkeypatch.setenv("EGRET_DATABASE_URL", url)
    assert rules_bootstrap.main(["verify-audit"]) == 0


def rules_settings(url: str, data_dir: Path, **extra: str) -> RulesSettings:
    return RulesSettings.from_env(
        environment(
            "rules",
            url,
            data_dir,
            EGRET_RULESET_FILE=str(SAMPLE),
            EGRET_CATALOGUE_FILE=str(ROOT / "config" / "catalogue.yaml"),
            EGRET_BACKTEST_WORKERS="1",
            **extra,
        )
    )


@asynccontextmanager
async def rules_alone(settings: RulesSettings) -> AsyncIterator[pb_grpc.RulesServiceAsyncStub]:
    """Rules with no history relayed anywhere, and a score service of its own (on SQLite
    beside it) only for what backtests ask of score: its active policy."""
    async with AsyncExitStack() as stack:
        data_dir = settings.common.data_dir
        score_settings = ScoreSettings.from_env(
            environment("score", f"sqlite:///{data_dir / 'score.db'}", data_dir)
        )
        score_address = await stack.enter_async_context(
            running(score_settings, score_bootstrap.build, score_bootstrap.MIGRATIONS)
        )
        settings = replace(settings, score=replace(settings.score, address=score_address))
        address = await stack.enter_async_context(
            running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS)
        )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        yield pb_grpc.RulesServiceStub(channel)


@asynccontextmanager
async def secured_rules(
    settings: RulesSettings, pki: LocalPki
) -> AsyncIterator[Callable[[str, Role], pb_grpc.RulesServiceAsyncStub]]:
    """Rules alone with TLS and tokens: yields a stub maker for a principal and its role."""
    async with AsyncExitStack() as stack:
        address = await stack.enter_async_context(
            running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS)
        )

        def as_(principal: str, role: Role) -> pb_grpc.RulesServiceAsyncStub:
            channel = grpc.aio.secure_channel(
                address, pki.tls(), interceptors=bearer_token(pki.token(principal, role))
            )
            stack.push_async_callback(channel.close)
            return pb_grpc.RulesServiceStub(channel)

        yield as_


@pytest.fixture
def store(database_url: str) -> Iterator[SqlBacktestJobStore]:
    engine = create_engine(database_url)
    yield SqlBacktestJobStore(make_session_factory(engine), audit_keys=UNKEYED)
    engine.dispose()


def unfinished(backtest_id: str, *, instance: str, heartbeat: datetime) -> StoredJob:
    return StoredJob(
        row_id=0,
        backtest_id=backtest_id,
        rule_set_id=1,
        state="running",
        events_replayed=10,
        events_total=100,
        started_at=heartbeat,
        heartbeat_at=heartbeat,
        finished_at=None,
        started_by="reviewer-1",
        instance=instance,
        subject_key_id="k1",
        request=bt.BacktestRuleSetRequest(rule_set_id=1).SerializeToString(),
        report=None,
        error="",
    )


async def test_a_restart_fails_the_backtests_it_interrupted(
    database_url: str, store: SqlBacktestJobStore, tmp_path: Path
) -> None:
    settings = rules_settings(database_url, tmp_path)
    migrate(settings.common, rules_bootstrap.MIGRATIONS)
    now = datetime.now(UTC)
    # This instance's, as a crash left it; another live instance's; one that died for good.
    store.add(unfinished("mine", instance=settings.common.instance, heartbeat=now))
    store.add(unfinished("theirs", instance="rules-2:50052", heartbeat=now))
    store.add(unfinished("gone", instance="rules-3:50052", heartbeat=now - timedelta(minutes=10)))
    async with rules_alone(settings) as rules:
        # At start-up: this instance's own.
        mine = store.get("mine")
        assert mine is not None
        assert (mine.state, mine.error) == ("failed", INTERRUPTED)
        assert mine.finished_at is not None
        gone = store.get("gone")
        assert gone is not None
        assert gone.state == "running"
        # When read: one whose heartbeat stopped long ago.
        job = (await rules.GetBacktest(bt.GetBacktestRequest(backtest_id="gone"))).backtest
        assert (job.state, job.error) == (bt.BACKTEST_STATE_FAILED, INTERRUPTED)
        job = (await rules.GetBacktest(bt.GetBacktestRequest(backtest_id="theirs"))).backtest
        assert job.state == bt.BACKTEST_STATE_RUNNING
        assert (job.events_replayed, job.events_total, job.progress) == (10, 100, 0.1)
        assert job.started_by == "reviewer-1"

        # A job running when the instance stops is stored as failed too.
        active = (await rules.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.rule_set_id
        started = await rules.StartBacktest(
            bt.StartBacktestRequest(backtest=bt.BacktestRuleSetRequest(rule_set_id=active))
        )
        backtest_id = started.backtest.backtest_id
    stopped = store.get(backtest_id)
    assert stopped is not None
    # It may have finished first (an empty history replays at once).
    assert stopped.state in ("failed", "succeeded")
    if stopped.state == "failed":
        assert stopped.error == INTERRUPTED


async def test_backtests_are_listed_newest_first_in_pages(database_url: str, tmp_path: Path) -> None:
    async with rules_alone(rules_settings(database_url, tmp_path)) as rules:
        active = (await rules.GetActiveRuleSet(pb.GetActiveRuleSetRequest())).rule_set.rule_set_id
        draft = await rules.CreateDraft(pb.CreateDraftRequest(source=candidate_source()))
        ids: list[tuple[str, int]] = []
        for rule_set_id in (active, draft.rule_set.rule_set_id) * 3:
            started = await rules.StartBacktest(
                bt.StartBacktestRequest(backtest=bt.BacktestRuleSetRequest(rule_set_id=rule_set_id))
            )
            job = (await finished(rules, started.backtest.backtest_id))[-1]
            assert job.state == bt.BACKTEST_STATE_SUCCEEDED, job.error
            ids.append((job.backtest_id, rule_set_id))
        newest_first = [backtest_id for backtest_id, _ in reversed(ids)]

        async def walk(**fields: Any) -> list[list[bt.BacktestJob]]:
            pages, token = [], ""
            while True:
                page = await rules.ListBacktests(bt.ListBacktestsRequest(page_token=token, **fields))
                pages.append(list(page.backtests))
                token = page.next_page_token
                if not token:
                    return pages

        pages = await walk(page_size=4)
        assert [len(p) for p in pages] == [4, 2]
        assert [j.backtest_id for p in pages for j in p] == newest_first
        # Listed without their reports.
        assert all(
            not j.HasField("report") and j.state == bt.BACKTEST_STATE_SUCCEEDED for p in pages for j in p
        )
        assert [len(p) for p in await walk()] == [6]
        drafts = await walk(rule_set_id=draft.rule_set.rule_set_id, page_size=2)
        assert [j.backtest_id for p in drafts for j in p] == [
            b for b, r in reversed(ids) if r == draft.rule_set.rule_set_id
        ]
        assert [len(p) for p in drafts] == [2, 1]
        for fields in ({"page_size": -1}, {"page_token": "not-a-token"}):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await rules.ListBacktests(bt.ListBacktestsRequest(**fields))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- cancellation -------------------------------------------------------------------------

# Seconds more per page of 50 events: the test history (about 800 events) then takes about
# 2 s to replay, long enough to be cancelled part way; the test waits for it to be part way.
PAGE_DELAY = 0.1


def slow_work(job: workers_handler.ShardJob, sender: Connection) -> None:
    """A backtest worker process whose every page takes PAGE_DELAY more: a spawned process
    does not see the test's monkeypatches, so the test makes this the workers' target."""
    feed = backtest.Backtest.feed

    def slowly(self: backtest.Backtest, page: Any) -> None:
        time.sleep(PAGE_DELAY)
        feed(self, page)

    backtest.Backtest.feed = slowly  # type: ignore[method-assign,assignment]
    workers_handler._work(job, sender)


async def part_way(rules: pb_grpc.RulesServiceAsyncStub, backtest_id: str) -> bt.BacktestJob:
    """The job once GetBacktest shows it running with some events replayed."""
    latest: list[bt.BacktestJob] = []

    async def part_way_through() -> bool:
        job = (await rules.GetBacktest(bt.GetBacktestRequest(backtest_id=backtest_id))).backtest
        if job.state not in (bt.BACKTEST_STATE_QUEUED, bt.BACKTEST_STATE_RUNNING):
            pytest.fail(f"backtest {backtest_id} left the queue other than by running: {job}")
        latest[:] = [job]
        return job.state == bt.BACKTEST_STATE_RUNNING and job.events_replayed > 0

    await until(part_way_through, what=f"backtest {backtest_id} part way", within_s=60, every_s=0.01)
    return latest[0]


def cancel(rules: pb_grpc.RulesServiceAsyncStub, backtest_id: str) -> Awaitable[bt.CancelBacktestResponse]:
    return rules.CancelBacktest(bt.CancelBacktestRequest(backtest_id=backtest_id))


def acts(url: str, action: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(actor, role, target, detail) of the records of `action` in rules' audit log, in order."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            t = RulesAuditLog
            rows = connection.execute(
                sa.select(t.actor, t.role, t.target, t.detail).where(t.action == action).order_by(t.seq)
            ).all()
    finally:
        engine.dispose()
    return [(actor, role, target, json.loads(detail)) for actor, role, target, detail in rows]


def backtest_workers() -> list[str]:
    """The backtest worker processes alive (the service runs in this process)."""
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("rules-backtest-")]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_running_backtest_is_cancelled_part_way_keeps_its_progress_and_frees_the_slot(
    database_url: str,
    database_url_factory: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    slow_pages(monkeypatch, PAGE_DELAY)
    monkeypatch.setattr(workers_handler, "_work", slow_work)
    async with evaluated(database_url_factory, tmp_path, monkeypatch, int(workers)) as (a, rule_set_id):
        started = (
            await a.rules.StartBacktest(bt.StartBacktestRequest(backtest=request(rule_set_id)))
        ).backtest
        seen = await part_way(a.rules, started.backtest_id)

        cancelled = (await cancel(a.rules, started.backtest_id)).backtest
        assert cancelled.state == bt.BACKTEST_STATE_CANCELLED
        assert cancelled.cancelled_by == "anonymous"  # insecure mode: no principal
        assert cancelled.HasField("finished_at")
        assert not cancelled.HasField("report")
        assert cancelled.error == ""
        # Stopped part way, with what it had replayed by then.
        assert seen.events_replayed <= cancelled.events_replayed < cancelled.events_total
        assert cancelled.events_total == seen.events_total
        assert 0 < cancelled.progress < 1
        # The replay stopped when the call answered: its workers are gone, the slot is free.
        assert backtest_workers() == []
        # Cancelling it again returns it unchanged.
        assert (await cancel(a.rules, started.backtest_id)).backtest == cancelled

        # The next backtest starts at once, from a client that goes away before it is done:
        # its report is stored, and read (again and again) by another client.
        async with grpc.aio.insecure_channel(a.rules_address) as channel:
            gone = pb_grpc.RulesServiceStub(channel)
            second = (
                await gone.StartBacktest(bt.StartBacktestRequest(backtest=request(rule_set_id)))
            ).backtest
        done = (await finished(a.rules, second.backtest_id))[-1]
        assert done.state == bt.BACKTEST_STATE_SUCCEEDED, done.error
        assert done.events_replayed == done.events_total == cancelled.events_total
        again = (await a.rules.GetBacktest(bt.GetBacktestRequest(backtest_id=second.backtest_id))).backtest
        assert again == done
        assert again.report.overall.subjects > 0

        # The cancelled one stayed as it was stored while the other replayed.
        later = await a.rules.GetBacktest(bt.GetBacktestRequest(backtest_id=started.backtest_id))
        assert later.backtest == cancelled
        # A finished backtest can no longer be cancelled; an unknown one is not found.
        assert await status_of(cancel(a.rules, second.backtest_id)) == grpc.StatusCode.FAILED_PRECONDITION
        assert await status_of(cancel(a.rules, "no-such-backtest")) == grpc.StatusCode.NOT_FOUND
        assert await status_of(cancel(a.rules, "")) == grpc.StatusCode.NOT_FOUND
        listed = await a.rules.ListBacktests(bt.ListBacktestsRequest())
        assert [j.state for j in listed.backtests] == [
            bt.BACKTEST_STATE_SUCCEEDED,
            bt.BACKTEST_STATE_CANCELLED,
        ]
        url = a.rules_url

    # Recorded once, as an act in rules' audit log, whose chain stays intact.
    assert acts(url, "backtest.cancel") == [
        (
            "anonymous",
            "unauthenticated",
            f"backtest:{started.backtest_id}",
            {"rule_set_id": rule_set_id, "started_by": "anonymous", "state": "running"},
        )
    ]
    monkeypatch.setenv("EGRET_DATABASE_URL", url)
    assert rules_bootstrap.main(["verify-audit"]) == 0


async def test_a_backtest_cancelled_by_another_instance_stops_here_too(
    database_url: str,
    database_url_factory: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slow_pages(monkeypatch, PAGE_DELAY)
    async with evaluated(database_url_factory, tmp_path, monkeypatch, 1) as (a, rule_set_id):
        started = (
            await a.rules.StartBacktest(bt.StartBacktestRequest(backtest=request(rule_set_id)))
        ).backtest
        await part_way(a.rules, started.backtest_id)
        # What CancelBacktest on another instance sharing the database writes.
        engine = create_engine(a.rules_url)
        try:
            elsewhere = SqlBacktestJobStore(make_session_factory(engine), audit_keys=UNKEYED)
            record = audit.AuditRecord("backtest.cancel", "reviewer-2", "reviewer", datetime.now(UTC))
            assert elsewhere.cancel(started.backtest_id, by="reviewer-2", at=record.at, record=record)
        finally:
            engine.dispose()
        # This instance's replay notices at its next progress write and frees the slot.
        for _ in range(1000):
            try:
                second = await a.rules.StartBacktest(bt.StartBacktestRequest(backtest=request(rule_set_id)))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                await asyncio.sleep(0.01)
            else:
                break
        else:
            raise AssertionError("the slot was never freed")
        await cancel(a.rules, second.backtest.backtest_id)
        stopped = (await a.rules.GetBacktest(bt.GetBacktestRequest(backtest_id=started.backtest_id))).backtest
    assert stopped.state == bt.BACKTEST_STATE_CANCELLED
    assert stopped.cancelled_by == "reviewer-2"
    assert stopped.events_replayed < stopped.events_total


async def test_a_reviewer_cancels_its_own_backtests_and_an_admin_any(
    database_url: str, store: SqlBacktestJobStore, tmp_path: Path
) -> None:
    pki = create_local_pki(tmp_path / "pki")
    settings = rules_settings(database_url, tmp_path, EGRET_INSECURE="false", **pki.env("rules"))
    migrate(settings.common, rules_bootstrap.MIGRATIONS)
    now = datetime.now(UTC)
    # Running on another instance, and one that succeeded: both reviewer-1's.
    store.add(unfinished("theirs", instance="rules-2:50052", heartbeat=now))
    store.add(replace(unfinished("done", instance="rules-2:50052", heartbeat=now), state="succeeded"))
    async with secured_rules(settings, pki) as as_:
        author, colleague = as_("reviewer-1", Role.REVIEWER), as_("reviewer-2", Role.REVIEWER)
        admin, auditor = as_("admin-1", Role.ADMIN), as_("auditor-1", Role.AUDITOR)
        # Neither another role nor another reviewer; the auditor is refused before the handler.
        assert await status_of(cancel(auditor, "theirs")) == grpc.StatusCode.PERMISSION_DENIED
        assert await status_of(cancel(auditor, "no-such-backtest")) == grpc.StatusCode.PERMISSION_DENIED
        assert await status_of(cancel(colleague, "theirs")) == grpc.StatusCode.PERMISSION_DENIED
        assert await status_of(cancel(colleague, "no-such-backtest")) == grpc.StatusCode.NOT_FOUND
        # Its author, or an admin (here), whose cancellation keeps the progress as stored.
        cancelled = (await cancel(admin, "theirs")).backtest
        assert (cancelled.state, cancelled.cancelled_by) == (bt.BACKTEST_STATE_CANCELLED, "admin-1")
        assert (cancelled.events_replayed, cancelled.events_total, cancelled.progress) == (10, 100, 0.1)
        assert (await cancel(author, "theirs")).backtest == cancelled
        assert await status_of(cancel(colleague, "theirs")) == grpc.StatusCode.PERMISSION_DENIED
        assert await status_of(cancel(author, "done")) == grpc.StatusCode.FAILED_PRECONDITION
        assert await status_of(cancel(admin, "done")) == grpc.StatusCode.FAILED_PRECONDITION
        job = (await auditor.GetBacktest(bt.GetBacktestRequest(backtest_id="theirs"))).backtest
        assert job == cancelled
    assert acts(settings.common.database_url, "backtest.cancel") == [
        (
            "admin-1",
            "admin",
            "backtest:theirs",
            {"rule_set_id": 1, "started_by": "reviewer-1", "state": "running"},
        )
    ]
