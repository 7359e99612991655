"""The score service's gRPC API on loopback, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from contracts.score_store import ScoreAuditLog, StoredCategory, StoredEntry, StoredScore, load_entry_facts
from egret.common.v1 import due_process_pb2, outcome_pb2
from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit.db import as_utc, create_engine
from services.score import bootstrap
from services.score.bootstrap import MIGRATIONS, build
from services.score.settings import ScoreSettings
from tests.support.outcomes import oid
from tests.support.outcomes import outcome as make_outcome
from tests.support.purposes import assert_bad_purposes_refused
from tests.support.score import POLICY_FILE, score_settings
from tests.support.servers import running

ALICE = "a1" * 32
BOB = "b2" * 32
# A month ago, so that no entry has reached its visible_until (the shortest period, minor,
# is 90 days); expiry itself is tested at its boundaries with an injected clock.
OCCURRED = (datetime.now(UTC) - timedelta(days=30)).replace(microsecond=0)

MINOR = outcome_pb2.SEVERITY_MINOR
SERIOUS = outcome_pb2.SEVERITY_SERIOUS
POSITIVE = outcome_pb2.SEVERITY_POSITIVE


def outcome(
    outcome_id: str, subject_key: str, points: int, category: str, severity: int = MINOR, *, days_ago: int = 0
) -> outcome_pb2.Outcome:
    occurred_at = OCCURRED - timedelta(days=days_ago)
    return make_outcome(outcome_id, subject_key, points, category, severity=severity, occurred_at=occurred_at)


BATCH = [
    outcome(oid("o1"), ALICE, 10, "civic", POSITIVE),
    outcome(oid("o2"), ALICE, -5, "traffic"),
    outcome(oid("o3"), ALICE, -3, "civic"),
    outcome(oid("o4"), BOB, -50, "traffic", SERIOUS),
]


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> ScoreSettings:
    return score_settings(database_url, tmp_path)


@pytest.fixture
async def score(settings: ScoreSettings) -> AsyncIterator[pb_grpc.ScoreServiceAsyncStub]:
    async with running(settings, build, MIGRATIONS) as address, grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.ScoreServiceStub(channel)


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def stored_scores(db: Engine) -> dict[str, tuple[int, str, int, str]]:
    with db.connect() as c:
        rows = c.execute(sa.select(StoredScore))
        return {r.subject_key: (r.score, r.tier, r.entry_count, r.policy_version) for r in rows}


def stored_categories(db: Engine) -> dict[tuple[str, str], tuple[int, int]]:
    with db.connect() as c:
        rows = c.execute(sa.select(StoredCategory))
        return {(r.subject_key, r.category): (r.points, r.entry_count) for r in rows}


async def test_a_batch_becomes_ledger_entries_and_scores(
    score: pb_grpc.ScoreServiceAsyncStub, db: Engine
) -> None:
    response = await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=BATCH))
    assert (response.applied, response.duplicate, response.subjects_updated) == (4, 0, 2)
    assert stored_scores(db) == {ALICE: (1002, "A", 3, "2026.2"), BOB: (950, "B", 1, "2026.2")}
    assert stored_categories(db) == {
        (ALICE, "civic"): (7, 2),
        (ALICE, "traffic"): (-5, 1),
        (BOB, "traffic"): (-50, 1),
    }
    with db.connect() as c:
        row = c.execute(sa.select(StoredEntry).where(StoredEntry.entry_id == oid("o4"))).one()
    assert (row.subject_key, row.points, row.category, row.severity, row.status) == (
        BOB,
        -50,
        "traffic",
        "serious",
        "active",
    )
    assert (row.rule_id, row.rule_set, row.rule_set_version) == ("traffic.rule", "sample", 2)
    assert as_utc(row.visible_until) == OCCURRED + timedelta(days=1095)
    # The full outcome is kept verbatim as the evidence snapshot, and the rule's texts and
    # the reason are read from it (score migration 0009).
    assert outcome_pb2.Outcome.FromString(row.outcome) == BATCH[3]
    with Session(db) as session:
        facts = load_entry_facts(session, oid("o4"))
    assert facts is not None
    assert facts.entry.rule.legal_basis == "Regulation 7" == BATCH[3].rule.legal_basis
    assert facts.entry.reason == BATCH[3].reason


async def test_a_resent_batch_changes_nothing(score: pb_grpc.ScoreServiceAsyncStub, db: Engine) -> None:
    await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=BATCH))
    before = (stored_scores(db), stored_categories(db))
    again = await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=BATCH))
    assert (again.applied, again.duplicate, again.subjects_updated) == (0, 4, 0)
    assert (stored_scores(db), stored_categories(db)) == before
    partly = await score.ApplyOutcomes(
        pb.ApplyOutcomesRequest(outcomes=[BATCH[0], outcome(oid("o5"), ALICE, 5, "civic", POSITIVE)])
    )
    assert (partly.applied, partly.duplicate, partly.subjects_updated) == (1, 1, 1)
    assert stored_scores(db)[ALICE][:3] == (1007, "A", 4)


async def test_an_invalid_outcome_does_not_block_the_rest(
    score: pb_grpc.ScoreServiceAsyncStub, db: Engine
) -> None:
    no_severity = outcome(oid("bad-1"), ALICE, -5, "traffic")
    no_severity.ClearField("severity")
    no_category = outcome(oid("bad-2"), ALICE, -5, "")
    no_subject = outcome(oid("bad-3"), "", -5, "traffic")
    no_id = outcome("", ALICE, -5, "traffic")
    # Keys and ids are stored as bytes (kit.columns.Hex): anything else is refused as invalid.
    not_hex = [outcome("o-9", ALICE, -5, "traffic"), outcome(oid("bad-4"), "Alice", -5, "traffic")]
    response = await score.ApplyOutcomes(
        pb.ApplyOutcomesRequest(
            outcomes=[no_severity, BATCH[1], no_category, no_subject, no_id, *not_hex, BATCH[3]],
            reversals=[
                pb.Reversal(outcome_id="o-9", retraction=due_process_pb2.Retraction(subject_key=ALICE))
            ],
        )
    )
    assert (response.applied, response.duplicate, response.subjects_updated) == (2, 0, 2)
    with db.connect() as c:
        assert sorted(c.scalars(sa.select(StoredEntry.entry_id))) == [oid("o2"), oid("o4")]
    assert stored_scores(db) == {ALICE: (995, "A", 1, "2026.2"), BOB: (950, "B", 1, "2026.2")}


async def test_an_empty_batch_is_a_no_op(score: pb_grpc.ScoreServiceAsyncStub) -> None:
    response = await score.ApplyOutcomes(pb.ApplyOutcomesRequest())
    assert (response.applied, response.duplicate, response.subjects_updated) == (0, 0, 0)


async def test_an_oversized_batch_is_refused(score: pb_grpc.ScoreServiceAsyncStub) -> None:
    many = [outcome(oid(f"o{i}"), ALICE, 1, "civic", POSITIVE) for i in range(51)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=many))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_verify_finds_stored_scores_match_their_ledgers(score: pb_grpc.ScoreServiceAsyncStub) -> None:
    subjects = [f"{i:064x}" for i in range(5)]
    await score.ApplyOutcomes(
        pb.ApplyOutcomesRequest(
            outcomes=[outcome(oid(f"o{i}"), subjects[i % 5], -i, "traffic") for i in range(12)]
        )
    )
    result = await score.VerifyScores(pb.VerifyScoresRequest())
    assert (result.subjects_checked, result.mismatch_count, list(result.mismatches)) == (5, 0, [])


async def test_verify_detects_a_corrupted_score(
    score: pb_grpc.ScoreServiceAsyncStub,
    db: Engine,
    settings: ScoreSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=BATCH))
    assert bootstrap.verify(settings) == 0
    with db.begin() as c:
        c.execute(
            sa.text("UPDATE score_subjects SET score = 1100, tier = 'AAA' WHERE subject_key = :k"),
            {"k": bytes.fromhex(BOB)},
        )
    result = await score.VerifyScores(pb.VerifyScoresRequest(max_mismatches=5, purpose="operations"))
    assert (result.subjects_checked, result.mismatch_count) == (2, 1)
    assert result.mismatches[0] == pb.ScoreMismatch(
        subject_key=BOB, stored_score=1100, recomputed_score=950, stored_tier="AAA", recomputed_tier="B"
    )
    capsys.readouterr()
    assert bootstrap.verify(settings) == 1
    printed = capsys.readouterr().out
    assert "mismatches: 1" in printed
    assert f"{BOB}: stored 1100 AAA, recomputed 950 B" in printed


async def test_verify_names_mismatched_subjects_only_for_a_purpose_and_records_the_read(
    score: pb_grpc.ScoreServiceAsyncStub, db: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=BATCH))
    with db.begin() as c:
        c.execute(
            sa.text("UPDATE score_subjects SET score = 1 WHERE subject_key IN (:a, :b)"),
            # Keys are stored as the bytes their hex spells (kit.columns.Hex).
            {"a": bytes.fromhex(ALICE), "b": bytes.fromhex(BOB)},
        )
    # Without a purpose: the counts, no subject, nothing recorded.
    counts = await score.VerifyScores(pb.VerifyScoresRequest())
    assert (counts.subjects_checked, counts.mismatch_count, list(counts.mismatches)) == (2, 2, [])
    assert read_records(db) == []
    await assert_bad_purposes_refused(
        lambda code, note: score.VerifyScores(pb.VerifyScoresRequest(purpose=code, purpose_note=note))
    )
    assert read_records(db) == []
    # With one: the subjects, and one record per subject listed, before the answer.
    named = await score.VerifyScores(pb.VerifyScoresRequest(purpose="operations", purpose_note="ticket 42"))
    assert sorted(m.subject_key for m in named.mismatches) == sorted([ALICE, BOB])
    detail = {"purpose_note": "ticket 42", "subjects": 2, "subjects_checked": 2, "mismatch_count": 2}
    assert read_records(db) == [
        ("read:VerifyScores", ALICE, "operations", "scores", detail),
        ("read:VerifyScores", BOB, "operations", "scores", detail),
    ]
    monkeypatch.setenv("EGRET_DATABASE_URL", database_url)
    monkeypatch.setenv("EGRET_POLICY_FILE", str(POLICY_FILE))
    assert bootstrap.main(["verify-audit"]) == 0


def read_records(db: Engine) -> list[tuple[str, str | None, str, str, dict[str, object]]]:
    with db.connect() as c:
        rows = c.execute(
            sa.select(ScoreAuditLog.action, ScoreAuditLog.subject_key, ScoreAuditLog.purpose)
            .add_columns(ScoreAuditLog.target, ScoreAuditLog.detail)
            .where(ScoreAuditLog.action.startswith("read:"))
            .order_by(ScoreAuditLog.subject_key)
        ).all()
    return [(a, k, p, t, json.loads(d)) for a, k, p, t, d in rows]


async def test_verify_cli_exits_non_zero_on_a_mismatch(
    score: pb_grpc.ScoreServiceAsyncStub, db: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await score.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=BATCH))
    monkeypatch.setenv("EGRET_DATABASE_URL", database_url)
    monkeypatch.setenv("EGRET_POLICY_FILE", str(POLICY_FILE))
    assert bootstrap.main(["verify"]) == 0
    with db.begin() as c:
        c.execute(sa.text("DELETE FROM score_categories"))
        c.execute(sa.text("DELETE FROM score_subjects WHERE subject_key = :k"), {"k": bytes.fromhex(ALICE)})
    assert bootstrap.main(["verify"]) == 1


async def test_verify_refuses_an_out_of_range_limit(score: pb_grpc.ScoreServiceAsyncStub) -> None:
    for limit in (-1, 1001):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await score.VerifyScores(pb.VerifyScoresRequest(max_mismatches=limit))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
