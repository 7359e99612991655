"""Backtests split over worker processes: shards of subjects combine to the whole report."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.backtest import populate, stricter
from domain.catalogue import load_catalogue
from domain.policy import load_policy
from domain.ruleset.parsing import rule_set_from_yaml
from kit.db import create_engine, make_session_factory
from kit.errors import Unavailable
from kit.sharding import shard_of
from services.rules.backtest import Backtest, BacktestScope, StoredEvent, combine
from services.rules.backtest_job import Progress
from services.rules.backtest_report import BacktestReport
from services.rules.engine import RuleEngine
from services.rules.handlers.backtest_workers import (
    ShardResult,
    replay_in_workers,
    shard_jobs,
    shareable,
    worker_of,
)
from services.rules.handlers.backtests import cohort_attributes
from services.rules.records import engine_event_from_record
from services.rules.stores.history import HistoryReader
from services.rules.stores.schema import RulesSubjectKeyGeneration
from tests.support.backtest_events import ACME, ALICE, AS_OF, BOB, T0, event, policy, rule_set

ROOT = Path(__file__).resolve().parents[2]


def test_partial_reports_of_disjoint_subjects_combine_to_the_report_of_all() -> None:
    batches = [
        [event("1", ALICE, "traffic.red_light", 1), event("2", BOB, "civic.blood_donation", 1)],
        [event("3", ALICE, "transport.metro.fare_evasion", 2), event("4", ACME, "traffic.red_light", 2)],
        [event("5", ALICE, "transport.metro.fare_evasion", 3), event("6", BOB, "traffic.red_light", 4)],
    ]
    baseline, candidate = rule_set(1), rule_set(2, red="-15")

    def backtest() -> Backtest:
        return Backtest(baseline=baseline, candidate=candidate, policy=policy(), make_engine=RuleEngine)

    whole = backtest()
    parts = [backtest(), backtest()]
    try:
        for number, batch in enumerate(batches):
            at = T0 + number * timedelta(seconds=1)
            whole.feed(StoredEvent(at, e) for e in batch)
            for shard, part in enumerate(parts):
                part.feed(StoredEvent(at, e) for e in batch if (e.subject_key == ALICE) == (shard == 0))
        expected = whole.report(as_of=AS_OF)
        partials = [part.partial(as_of=AS_OF) for part in parts]
    finally:
        for replay in (whole, *parts):
            replay.close()

    def combined(limit: int | None) -> BacktestReport:
        return combine(
            partials,
            baseline=baseline,
            candidate=candidate,
            policy=policy(),
            cohort_attributes=(),
            as_of=AS_OF,
            subject_limit=limit,
        )

    assert combined(None) == expected
    # The second shard saw all three batches too: a batch counts once.
    assert combined(None).batches_replayed == 3
    # Listing fewer subjects changes nothing but the list.
    assert {s.subject_key for s in expected.subjects} == {ALICE, BOB, ACME}
    assert combined(2) == replace(expected, subjects=expected.subjects[:2])
    assert combined(0).subjects == ()


def test_the_worker_split_spreads_one_rules_shards_subjects_over_every_worker() -> None:
    keys = [f"{i:064x}" for i in range(4000)]
    one_rules_shard = [k for k in keys if shard_of(k, 2) == 0]

    workers = [worker_of(k, 2) for k in one_rules_shard]

    assert 0.4 < workers.count(0) / len(workers) < 0.6


def test_in_memory_sqlite_cannot_be_shared_with_worker_processes() -> None:
    assert not shareable("sqlite://")
    assert not shareable("sqlite:///:memory:")
    assert shareable("sqlite:////var/lib/egret/rules.db")
    assert shareable("postgresql+psycopg://egret@db/rules")


def _report_here(url: str, baseline: str, candidate: str, as_of: datetime) -> BacktestReport:
    engine = create_engine(url)
    reader = HistoryReader(make_session_factory(engine), engine_event_from_record, page_size=500)
    backtest = Backtest(
        baseline=rule_set_from_yaml(baseline),
        candidate=rule_set_from_yaml(candidate),
        policy=load_policy(ROOT / "config/policy.yaml"),
        cohort_attributes=cohort_attributes(load_catalogue(ROOT / "config/catalogue.yaml")),
        make_engine=RuleEngine,
    )
    try:
        for page in reader.pages(BacktestScope()):
            backtest.feed(page)
        return backtest.report(as_of=as_of, rule_limit=5)
    finally:
        backtest.close()
        engine.dispose()


def test_worker_processes_replay_a_stored_history_exactly_as_one_process_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/rules.db"
    populate(url, 4000, seed=3, batch_size=200)
    baseline = (ROOT / "config/rulesets/sample.yaml").read_text(encoding="utf-8")
    candidate = stricter(rule_set_from_yaml(baseline), baseline)
    as_of = datetime.now(UTC) + timedelta(days=1)
    reader = HistoryReader(make_session_factory(create_engine(url)), engine_event_from_record)
    view = reader.shared_view()  # on SQLite: the latest evaluated_at, no snapshot to hold
    view.close()
    latest = view.until
    assert latest is not None
    policy_, cohorts = (
        load_policy(ROOT / "config/policy.yaml"),
        cohort_attributes(load_catalogue(ROOT / "config/catalogue.yaml")),
    )

    jobs = shard_jobs(
        url,
        baseline,
        candidate,
        policy=policy_,
        cohort_attributes=cohorts,
        scope=BacktestScope(),
        until=latest,
        as_of=as_of,
        workers=3,
        page_size=500,
    )
    # Each worker reports the stored events it read over its pipe, every one of them.
    progress = Progress()
    progress.expect(reader.count(BacktestScope(), until=latest), workers=3)
    results = asyncio.run(replay_in_workers(jobs, progress))
    assert progress.replayed == progress.total > 0

    def combined_of(parts: list[ShardResult], subject_limit: int | None = None) -> BacktestReport:
        return combine(
            [r.partial for r in parts],
            baseline=rule_set_from_yaml(baseline),
            candidate=rule_set_from_yaml(candidate),
            policy=policy_,
            cohort_attributes=cohorts,
            as_of=as_of,
            rule_limit=5,
            subject_limit=subject_limit,
        )

    combined = combined_of(results)
    expected = _report_here(url, baseline, candidate, as_of)

    # RuleSet objects are parsed separately on each side; everything else must be equal.
    assert (combined.baseline.source_sha256, combined.candidate.source_sha256) == (
        expected.baseline.source_sha256,
        expected.candidate.source_sha256,
    )
    for field in ("events_replayed", "batches_replayed", "overall", "cohorts", "subjects"):
        assert getattr(combined, field) == getattr(expected, field), field
    assert combined.overall.subjects_changed > 0
    assert all(r.partial.events > 0 for r in results)

    # Workers asked for the first N subjects send only those back, and the combined
    # list is still the first N of everyone (each worker's first N hold them).
    limited = asyncio.run(replay_in_workers([replace(job, subject_limit=25) for job in jobs]))
    assert all(len(r.partial.subjects) == 25 for r in limited)
    assert combined_of(limited, subject_limit=25).subjects == expected.subjects[:25]


def test_a_worker_that_fails_fails_the_backtest(tmp_path: Path) -> None:
    source = (ROOT / "config/rulesets/sample.yaml").read_text(encoding="utf-8")
    jobs = shard_jobs(
        f"sqlite:///{tmp_path}/missing/rules.db",  # no history table: the query fails
        source,
        source,
        policy=policy(),
        cohort_attributes=(),
        scope=BacktestScope(),
        until=T0,
        as_of=AS_OF,
        workers=2,
        page_size=100,
    )

    with pytest.raises(RuntimeError, match=r"backtest worker rules-backtest-[01] failed"):
        asyncio.run(replay_in_workers(jobs))


def test_workers_refuse_to_replay_while_the_subject_keys_are_being_moved(tmp_path: Path) -> None:
    """A re-keying job that starts during a backtest marks the database first; a worker that
    reads in transactions of its own then stops with UNAVAILABLE (the caller runs the
    backtest again) rather than replay a subject half under its old key, half under its new."""
    url = f"sqlite:///{tmp_path}/rules.db"
    populate(url, 400, seed=5, batch_size=100)
    source = (ROOT / "config/rulesets/sample.yaml").read_text(encoding="utf-8")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(RulesSubjectKeyGeneration).values(
                id=1, key_id="k2", complete=False, changed_at=datetime.now(UTC)
            )
        )
    engine.dispose()
    jobs = shard_jobs(
        url,
        source,
        source,
        policy=policy(),
        cohort_attributes=(),
        scope=BacktestScope(),
        until=datetime.now(UTC) + timedelta(days=1),
        as_of=AS_OF,
        workers=2,
        page_size=100,
        key_id="k2",
    )

    with pytest.raises(Unavailable, match="being moved to generation 'k2'"):
        asyncio.run(replay_in_workers(jobs))
    # Once the move is complete, workers of that generation replay.
    with create_engine(url).begin() as connection:
        connection.execute(sa.update(RulesSubjectKeyGeneration).values(complete=True))
    assert all(r.partial.events > 0 for r in asyncio.run(replay_in_workers(jobs)))
