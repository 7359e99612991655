"""BacktestRuleSet over real gRPC, on SQLite and on PostgreSQL: its numbers are the numbers
that activating the candidate live produces on the same history.

A history is evaluated live by rules with rule set A (relayed to a real score service);
the candidate B is backtested there; then the same batches are evaluated live, in the
same order, by a fresh rules service with B active, relayed to a fresh score service.
The backtest's per-subject scores and tiers must equal both live score services', and
its migration matrix the one the two live ledgers give.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from contracts.score_store import StoredScore
from domain.policy import load_policy
from egret.rules.v1 import backtest_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from kit import reads
from kit.db import create_engine
from kit.protoconv import to_timestamp
from services.rules import bootstrap as rules_bootstrap
from services.rules.stores.schema import EmittedOutcome, EvaluatedEvent, Outbox
from tests.support.backtests import POLICY, SAMPLE, candidate_source, evaluate, history, live, read_records
from tests.support.purposes import assert_bad_purposes_refused
from tests.support.status import bad_request


def live_scores(score_url: str) -> dict[str, tuple[int, str]]:
    engine = create_engine(score_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(StoredScore.subject_key, StoredScore.score, StoredScore.tier))
            return {key: (score, tier) for key, score, tier in rows}
    finally:
        engine.dispose()


def row_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table.__tablename__: connection.execute(
                    sa.select(sa.func.count()).select_from(table)
                ).scalar_one()
                for table in (EvaluatedEvent, EmittedOutcome, Outbox)
            }
    finally:
        engine.dispose()


def base_result(kind: str) -> tuple[int, str]:
    """What a subject without ledger entries scores: the policy's base, and its tier."""
    policy = load_policy(POLICY).for_kind(kind)
    return policy.base, policy.tier_of(policy.base)


def matrix(pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return counts


async def test_backtest_equals_activating_the_candidate_live(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    batches = history()
    candidate = candidate_source()
    async with live(SAMPLE.read_text(encoding="utf-8"), database_url_factory, tmp_path, "a") as a:
        await evaluate(a, batches)
        draft = await a.rules.CreateDraft(pb.CreateDraftRequest(source=candidate))
        before = row_counts(a.rules_url)
        scores_a_before = live_scores(a.score_url)
        report = await a.rules.BacktestRuleSet(
            backtest_pb2.BacktestRuleSetRequest(
                rule_set_id=draft.rule_set.rule_set_id,
                subject_limit=10_000,
                rule_limit=1000,
                purpose="rule-backtest",
            )
        )
        # No effect on live state: the same rows in rules, the same scores in score.
        assert row_counts(a.rules_url) == before
        assert live_scores(a.score_url) == scores_a_before
    async with live(candidate, database_url_factory, tmp_path, "b") as b:
        await evaluate(b, batches)
    scores_a, scores_b = scores_a_before, live_scores(b.score_url)

    assert report.candidate.rule_set_id == draft.rule_set.rule_set_id
    assert (report.baseline.version, report.candidate.version) == (2, 3)
    assert report.events_replayed == before["rules_evaluated_events"]
    assert report.candidate_failed_events == report.baseline_failed_events == 0
    subjects = {s.subject_key: s for s in report.subjects}
    assert len(subjects) == report.overall.subjects
    assert set(scores_a) | set(scores_b) <= set(subjects)
    pairs = []
    for key, subject in subjects.items():
        base = base_result(subject.subject_kind)
        assert (subject.baseline_score, subject.baseline_tier) == scores_a.get(key, base), key
        assert (subject.candidate_score, subject.candidate_tier) == scores_b.get(key, base), key
        pairs.append((scores_a.get(key, base)[1], scores_b.get(key, base)[1]))
    reported = {(m.from_tier, m.to_tier): m.subjects for m in report.overall.migrations}
    assert reported == matrix(pairs)
    changed = sum(
        scores_a.get(k, base_result(s.subject_kind)) != scores_b.get(k, base_result(s.subject_kind))
        for k, s in subjects.items()
    )
    assert report.overall.subjects_changed == changed > 0
    assert sum(b.subjects for b in report.overall.score_changes) == len(subjects)
    # The changed windows fired, so history and consumed events were part of the proof.
    rules = {r.rule_id: r for r in report.overall.rules}
    assert rules["transport.bike_parked_outside_fence_repeatedly"].candidate_firings > 0
    assert rules["traffic.red_light"].points_moved == 7 * rules["traffic.red_light"].baseline_points
    assert any(m.from_tier != m.to_tier for m in report.overall.migrations)
    kinds = {c.value: c.breakdown.subjects for c in report.cohorts if c.dimension == "subject_kind"}
    assert sum(kinds.values()) == len(subjects)
    districts = {c.value: c.breakdown.subjects for c in report.cohorts if c.dimension == "district"}
    assert sum(districts.values()) == len(subjects)
    assert "Siming" in districts


async def test_a_sample_and_a_range_replay_a_deterministic_part_of_the_history(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    batches = history()
    async with live(SAMPLE.read_text(encoding="utf-8"), database_url_factory, tmp_path, "a") as a:
        await evaluate(a, batches)
        draft = await a.rules.CreateDraft(pb.CreateDraftRequest(source=candidate_source()))

        async def backtest(**fields: object) -> backtest_pb2.BacktestRuleSetResponse:
            request = backtest_pb2.BacktestRuleSetRequest(
                rule_set_id=draft.rule_set.rule_set_id,
                subject_limit=10_000,
                purpose="rule-backtest",
                **fields,  # type: ignore[arg-type]
            )
            response: backtest_pb2.BacktestRuleSetResponse = await a.rules.BacktestRuleSet(request)
            return response

        full = await backtest()
        sample = await backtest(sample_fraction=0.5)
        again = await backtest(sample_fraction=0.5)
        assert [s.subject_key for s in sample.subjects] == [s.subject_key for s in again.subjects]
        assert 0 < sample.overall.subjects < full.overall.subjects
        # Subjects are independent: a sampled subject's numbers are its numbers in a full run.
        everyone = {s.subject_key: s for s in full.subjects}
        assert all(everyone[s.subject_key] == s for s in sample.subjects)

        occurred_from = datetime.now(UTC) - timedelta(days=60)
        recent = await backtest(occurred_from=to_timestamp(occurred_from))
        assert 0 < recent.events_replayed < full.events_replayed

        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await backtest(
                sample_fraction=1.5,
                occurred_from=to_timestamp(occurred_from),
                occurred_to=to_timestamp(occurred_from - timedelta(days=1)),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sorted(bad_request(bad.value)) == [
            ("occurred_to", "OUT_OF_RANGE"),
            ("sample_fraction", "OUT_OF_RANGE"),
        ]
        # One backtest at a time per instance: a second one meanwhile is told to retry.
        results = await asyncio.gather(backtest(), backtest(), return_exceptions=True)
        codes = sorted(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results)
        assert codes == ["OK", "RESOURCE_EXHAUSTED"]

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await a.rules.BacktestRuleSet(backtest_pb2.BacktestRuleSetRequest(rule_set_id=9999))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_backtest_lists_subjects_only_for_a_purpose_and_records_the_read(
    database_url: str,
    database_url_factory: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past this many listed subjects one record holds their count and digest.
    monkeypatch.setattr(reads, "PER_SUBJECT_BOUND", 50)
    async with live(SAMPLE.read_text(encoding="utf-8"), database_url_factory, tmp_path, "a") as a:
        await evaluate(a, history())
        draft = await a.rules.CreateDraft(pb.CreateDraftRequest(source=candidate_source()))

        async def backtest(**fields: object) -> backtest_pb2.BacktestRuleSetResponse:
            request = backtest_pb2.BacktestRuleSetRequest(
                rule_set_id=draft.rule_set.rule_set_id,
                **fields,  # type: ignore[arg-type]
            )
            response: backtest_pb2.BacktestRuleSetResponse = await a.rules.BacktestRuleSet(request)
            return response

        # Without a purpose: the aggregate report, no subject, nothing recorded.
        bare = await backtest(subject_limit=10_000)
        assert list(bare.subjects) == []
        assert bare.overall.subjects > 50
        assert bare.overall.subjects_changed > 0
        assert bare.overall.migrations
        assert bare.cohorts
        assert read_records(a.rules_url) == []
        await assert_bad_purposes_refused(
            lambda code, note: backtest(subject_limit=10_000, purpose=code, purpose_note=note)
        )
        assert read_records(a.rules_url) == []

        # With one: up to the bound, one record per subject listed.
        few = await backtest(subject_limit=20, purpose="rule-backtest", purpose_note="RFC 12")
        keys = [s.subject_key for s in few.subjects]
        assert len(keys) == 20
        records = read_records(a.rules_url)
        assert [(r[0], r[2], r[3]) for r in records] == [
            ("read:BacktestRuleSet", "rule-backtest", f"rule_set:{draft.rule_set.rule_set_id}")
        ] * 20
        assert [r[1] for r in records] == sorted(keys)
        assert records[0][4]["purpose_note"] == "RFC 12"
        assert records[0][4]["subjects"] == 20
        assert records[0][4]["as_of"] == few.as_of.ToDatetime(UTC).isoformat()

        # Beyond it, one record with the count and a digest of the keys listed.
        full = await backtest(subject_limit=10_000, purpose="rule-backtest")
        everyone = [s.subject_key for s in full.subjects]
        assert len(everyone) == full.overall.subjects == bare.overall.subjects
        (summary,) = read_records(a.rules_url)[20:]
        assert summary[:4] == (
            "read:BacktestRuleSet",
            None,
            "rule-backtest",
            f"rule_set:{draft.rule_set.rule_set_id}",
        )
        assert summary[4]["subjects"] == len(everyone)
        assert summary[4]["subjects_sha256"] == reads.keys_digest(everyone)
        url = a.rules_url
    monkeypatch.setenv("EGRET_DATABASE_URL", url)
    assert rules_bootstrap.main(["verify-audit"]) == 0
