"""StartBacktest, GetBacktest and ListBacktests over real gRPC, on SQLite and PostgreSQL:
a backtest run in the background shows its progress and stores the report BacktestRuleSet
gives; it fails in words, refuses a second one meanwhile, lists subjects only when both
its start and its read state a purpose (each read recorded), and is failed by a restart."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from egret.rules.v1 import backtest_pb2 as bt
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.app import migrate
from kit.db import create_engine, make_session_factory
from kit.protoconv import to_timestamp
from services.rules import backtest_runner, backtest_servicer
from services.rules import bootstrap as rules_bootstrap
from services.rules import settings as settings_module
from services.rules.backtest_job import INTERRUPTED, StoredJob
from services.rules.backtest_storage import HistoryReader, SqlBacktestJobStore
from services.rules.settings import RulesSettings
from tests.integration.test_backtest_service import (
    POLICY,
    ROOT,
    SAMPLE,
    candidate_source,
    environment,
    evaluate,
    history,
    live,
    read_records,
)
from tests.support.servers import running
from tests.support.status import bad_request

# After the history is evaluated: an entry counts from when it was recorded.
AS_OF = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)


@pytest.fixture(autouse=True)
def observable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pages and frequent progress writes, so that a test history of a few thousand
    events is replayed in many steps a test can watch."""
    monkeypatch.setattr(backtest_servicer, "HistoryReader", functools.partial(HistoryReader, page_size=50))
    monkeypatch.setattr(backtest_runner, "PROGRESS_INTERVAL", timedelta(seconds=0.05))


def slow_pages(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02) -> None:
    """The in-process replay takes `seconds` more per page (on the engine thread)."""
    replay_page = backtest_servicer._replay_page

    def slowly(*args: Any) -> bool:
        time.sleep(seconds)
        return replay_page(*args)

    monkeypatch.setattr(backtest_servicer, "_replay_page", slowly)


def request(rule_set_id: int, **fields: Any) -> bt.BacktestRuleSetRequest:
    fields = {"subject_limit": 10_000, "rule_limit": 1000, "as_of": to_timestamp(AS_OF), **fields}
    return bt.BacktestRuleSetRequest(rule_set_id=rule_set_id, **fields)


async def finished(rules: pb_grpc.RulesServiceAsyncStub, backtest_id: str) -> list[bt.BacktestJob]:
    """Every state GetBacktest showed, polled until the job finished."""
    seen: list[bt.BacktestJob] = []
    for _ in range(3000):
        job = (await rules.GetBacktest(bt.GetBacktestRequest(backtest_id=backtest_id))).backtest
        seen.append(job)
        if job.state in (bt.BACKTEST_STATE_SUCCEEDED, bt.BACKTEST_STATE_FAILED):
            return seen
        await asyncio.sleep(0.01)
    raise AssertionError(f"backtest {backtest_id} did not finish")


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
    monkeypatch.setattr(settings_module, "default_workers", lambda: int(workers))
    slow_pages(monkeypatch)
    async with live(SAMPLE.read_text(encoding="utf-8"), database_url_factory, tmp_path, "a") as a:
        await evaluate(a, history())
        draft = await a.rules.CreateDraft(pb.CreateDraftRequest(source=candidate_source()))
        rule_set_id = draft.rule_set.rule_set_id
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
    monkeypatch.setattr(settings_module, "default_workers", lambda: 1)
    slow_pages(monkeypatch)
    async with live(SAMPLE.read_text(encoding="utf-8"), database_url_factory, tmp_path, "a") as a:
        await evaluate(a, history())
        draft = await a.rules.CreateDraft(pb.CreateDraftRequest(source=candidate_source()))
        rule_set_id = draft.rule_set.rule_set_id

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
            patch.setattr(backtest_servicer, "Backtest", refused)
            failed = (await finished(a.rules, (await start()).backtest_id))[-1]
        assert failed.state == bt.BACKTEST_STATE_FAILED
        assert failed.error == "the engine refused the candidate: rule 'x' does not compile"
        assert failed.HasField("finished_at")
        assert not failed.HasField("report")
        again = (await finished(a.rules, (await start()).backtest_id))[-1]
        assert again.state == bt.BACKTEST_STATE_SUCCEEDED
        url = a.rules_url
    monkeypatch.setenv("EGRET_DATABASE_URL", url)
    monkeypatch.setenv("EGRET_POLICY_FILE", str(POLICY))
    assert rules_bootstrap.main(["verify-audit"]) == 0


def rules_settings(url: str, data_dir: Path) -> RulesSettings:
    return RulesSettings.from_env(
        environment(
            "rules",
            url,
            data_dir,
            EGRET_RULESET_FILE=str(SAMPLE),
            EGRET_CATALOGUE_FILE=str(ROOT / "config" / "catalogue.yaml"),
            EGRET_BACKTEST_WORKERS="1",
        )
    )


@asynccontextmanager
async def rules_alone(settings: RulesSettings) -> AsyncIterator[pb_grpc.RulesServiceAsyncStub]:
    """Rules without a score service: backtests need none."""
    async with AsyncExitStack() as stack:
        address = await stack.enter_async_context(
            running(settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS)
        )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        yield pb_grpc.RulesServiceStub(channel)


@pytest.fixture
def store(database_url: str) -> Iterator[SqlBacktestJobStore]:
    engine = create_engine(database_url)
    yield SqlBacktestJobStore(make_session_factory(engine))
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
