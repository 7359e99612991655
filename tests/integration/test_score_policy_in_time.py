"""Score policy end to end through score and query on loopback, with one injected clock,
on SQLite and on PostgreSQL: caps, expiry at visible_until (before and after the sweep),
scores as of a past instant, lists and their history, eligibility, distributions, and
policy preview and activation."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.protoconv import to_timestamp
from services.query.bootstrap import MIGRATIONS as QUERY_MIGRATIONS
from services.query.bootstrap import build as build_query
from services.score.bootstrap import MIGRATIONS
from services.score.bootstrap import build as build_score
from services.score.settings import ScoreSettings
from tests.support import waiting
from tests.support.events import ORGANIZATION
from tests.support.outcomes import oid
from tests.support.outcomes import outcome as make_outcome
from tests.support.query import query_settings, score_beside_query_settings
from tests.support.score import POLICY_FILE
from tests.support.servers import running
from tests.support.status import bad_request

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
ALICE = "a1" * 32
BOB = "b2" * 32
ACME = "c3" * 32
MINOR_DAYS = 90
POSITIVE = outcome_pb2.SEVERITY_POSITIVE
MINOR = outcome_pb2.SEVERITY_MINOR
GENERAL = outcome_pb2.SEVERITY_GENERAL
SERIOUS = outcome_pb2.SEVERITY_SERIOUS


class Clock:
    """The one clock score and query read, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def outcome(
    outcome_id: str,
    subject_key: str,
    points: int,
    category: str,
    severity: int,
    *,
    occurred_at: datetime = T0,
    black_list: bool = False,
    kind: int | None = None,
) -> outcome_pb2.Outcome:
    o = make_outcome(outcome_id, subject_key, points, category, severity=severity, occurred_at=occurred_at)
    o.black_list = black_list
    if kind is not None:
        o.subject_kind = kind  # type: ignore[assignment]
    return o


def key(subject_key: str) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(subject_key=subject_key)


@dataclass
class Egret:
    clock: Clock
    score: score_grpc.ScoreServiceAsyncStub
    query: pb_grpc.QueryServiceAsyncStub

    async def apply(self, *outcomes: outcome_pb2.Outcome) -> None:
        await self.score.ApplyOutcomes(score_pb.ApplyOutcomesRequest(outcomes=outcomes))

    async def get(self, subject_key: str, as_of: datetime | None = None) -> pb.Score:
        request = pb.GetScoreRequest(subject=key(subject_key))
        if as_of is not None:
            request.as_of.CopyFrom(to_timestamp(as_of))
        return (await self.query.GetScore(request)).score

    async def history(self, subject_key: str) -> list[pb.ScoreChange]:
        page = await self.query.ListScoreHistory(pb.ListScoreHistoryRequest(subject=key(subject_key)))
        return list(reversed(page.changes))  # oldest first reads easier


@pytest.fixture
async def egret(database_url: str, tmp_path: Path) -> AsyncIterator[Egret]:
    clock = Clock(T0 + timedelta(days=1))
    score = replace(score_beside_query_settings(database_url, tmp_path), sweep_interval_s=0.05)
    async with (
        running_score(score, clock) as score_address,
        running_query(database_url, tmp_path, clock) as query_address,
        grpc.aio.insecure_channel(score_address) as score_channel,
        grpc.aio.insecure_channel(query_address) as query_channel,
    ):
        yield Egret(
            clock, score_grpc.ScoreServiceStub(score_channel), pb_grpc.QueryServiceStub(query_channel)
        )


def running_score(settings: ScoreSettings, clock: Clock) -> AbstractAsyncContextManager[str]:
    return running(settings, functools.partial(build_score, clock=clock), MIGRATIONS)


def running_query(database_url: str, tmp_path: Path, clock: Clock) -> AbstractAsyncContextManager[str]:
    return running(
        query_settings(database_url, tmp_path), functools.partial(build_query, clock=clock), QUERY_MIGRATIONS
    )


async def test_the_cap_counts_exactly_plus_fifty_and_withholds_the_point_beyond(egret: Egret) -> None:
    await egret.apply(
        outcome("c1", ALICE, 30, "civic", POSITIVE),
        outcome("c2", ALICE, 20, "civic", POSITIVE, occurred_at=T0 + timedelta(hours=1)),
    )
    at_cap = await egret.get(ALICE)
    assert (at_cap.score, at_cap.tier) == (1050, "AAA")
    await egret.apply(outcome("c3", ALICE, 1, "civic", POSITIVE, occurred_at=T0 + timedelta(hours=2)))
    beyond = await egret.get(ALICE)
    assert beyond.score == 1050
    assert [(c.category, c.points, c.capped_points, c.entry_count) for c in beyond.categories] == [
        ("civic", 50, 1, 3)
    ]
    assert [(m.list_name, list(m.reasons)) for m in beyond.lists] == [
        ("red", ["tier AAA", "no counting negative entry"])
    ]


async def test_an_entry_stops_counting_at_visible_until_with_no_event(egret: Egret) -> None:
    await egret.apply(
        outcome(oid("m1"), BOB, -5, "traffic", MINOR), outcome(oid("p1"), BOB, 3, "civic", POSITIVE)
    )
    until = T0 + timedelta(days=MINOR_DAYS)
    egret.clock.now = until - timedelta(microseconds=1)
    before = await egret.get(BOB)
    assert (before.score, before.entry_count) == (998, 2)
    # Exactly at visible_until query recomputes on read, whether or not the sweep has run.
    egret.clock.now = until
    at = await egret.get(BOB)
    assert (at.score, at.entry_count) == (1003, 1)
    entries = (await egret.query.ListEntries(pb.ListEntriesRequest(subject=key(BOB)))).entries
    assert {e.entry_id: e.status for e in entries} == {
        oid("m1"): pb.ENTRY_STATUS_EXPIRED,
        oid("p1"): pb.ENTRY_STATUS_ACTIVE,
    }

    async def swept() -> None:
        changes = await egret.history(BOB)
        assert [(c.cause, c.score, list(c.added_entry_ids), list(c.expired_entry_ids)) for c in changes] == [
            (pb.CHANGE_CAUSE_ENTRIES, 998, [oid("m1"), oid("p1")], []),
            (pb.CHANGE_CAUSE_EXPIRY, 1003, [], [oid("m1")]),
        ]
        assert changes[1].changed_at.ToDatetime(UTC) == until
        assert (changes[1].score_before, changes[1].HasField("score_before")) == (998, True)
        assert not changes[0].HasField("score_before")

    await waiting.until(swept, what="the sweep's expiry change in BOB's history")
    verified = await egret.score.VerifyScores(score_pb.VerifyScoresRequest())
    assert (verified.subjects_checked, verified.mismatch_count) == (1, 0)


async def test_get_score_as_of_returns_the_score_as_it_was(egret: Egret) -> None:
    first = egret.clock.now
    await egret.apply(outcome(oid("g1"), BOB, -10, "finance", GENERAL))
    egret.clock.now = first + timedelta(days=2)
    await egret.apply(outcome(oid("g2"), BOB, -20, "finance", GENERAL, occurred_at=T0 - timedelta(days=30)))
    egret.clock.now = T0 + timedelta(days=400)
    assert (await egret.get(BOB)).score == 1000  # both expired by now
    then = await egret.get(BOB, as_of=first + timedelta(days=1))
    assert (then.score, then.entry_count, then.as_of.ToDatetime(UTC)) == (990, 1, first + timedelta(days=1))
    # g2 was recorded later, though it happened earlier.
    assert (await egret.get(BOB, as_of=first + timedelta(days=2))).score == 970
    # g2 expired at its own visible_until (occurred + 365 days), before g1.
    assert (await egret.get(BOB, as_of=T0 + timedelta(days=335))).score == 990
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.get(BOB, as_of=first - timedelta(seconds=1))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.get(BOB, as_of=egret.clock.now + timedelta(seconds=1))
    assert bad_request(caught.value) == [("as_of", "OUT_OF_RANGE")]


async def test_entering_and_leaving_lists_are_history_events(egret: Egret) -> None:
    await egret.apply(
        outcome("c1", ALICE, 50, "civic", POSITIVE), outcome(oid("t1"), ALICE, 10, "transport", POSITIVE)
    )
    egret.clock.now += timedelta(days=1)
    await egret.apply(outcome(oid("r1"), ALICE, -1, "traffic", MINOR, occurred_at=egret.clock.now))
    egret.clock.now += timedelta(days=1)
    await egret.apply(
        outcome("f1", ALICE, -10, "transport", GENERAL, occurred_at=egret.clock.now, black_list=True)
    )
    changes = await egret.history(ALICE)
    assert [
        (c.score, c.tier, list(c.lists_before), list(c.lists), list(c.added_entry_ids)) for c in changes
    ] == [
        (1060, "AAA", [], ["red"], [oid("t1"), "c1"]),
        (1059, "AAA", ["red"], [], [oid("r1")]),
        (1049, "AA", [], ["black"], ["f1"]),
    ]
    score = await egret.get(ALICE)
    assert [(m.list_name, list(m.entry_ids)) for m in score.lists] == [("black", ["f1"])]
    page = await egret.query.ListScoreHistory(pb.ListScoreHistoryRequest(subject=key(ALICE), page_size=2))
    rest = await egret.query.ListScoreHistory(
        pb.ListScoreHistoryRequest(subject=key(ALICE), page_size=2, page_token=page.next_page_token)
    )
    assert [c.score for c in [*page.changes, *rest.changes]] == [1049, 1059, 1060]
    assert rest.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.query.ListScoreHistory(pb.ListScoreHistoryRequest(subject=key(ALICE), page_token="x"))
    assert bad_request(caught.value) == [("page_token", "INVALID_PAGE_TOKEN")]


async def test_eligibility_is_purpose_bound_and_cites_entries(egret: Egret) -> None:
    await egret.apply(
        outcome(oid("bike-1"), ALICE, 2, "transport", POSITIVE),
        outcome(oid("court-1"), ALICE, -100, "legal", SERIOUS, black_list=True),
    )
    bike = await egret.query.CheckEligibility(
        pb.CheckEligibilityRequest(subject=key(ALICE), benefit_id="bike.deposit_free")
    )
    assert bike.eligible
    assert (bike.purpose_bound_score.score, bike.purpose_bound_score.tier) == (1002, "A")
    assert list(bike.purpose_bound_score.considers) == ["transport"]
    assert [(r.path, r.met, list(r.entry_ids)) for r in bike.reasons] == [
        ("condition.all[0]", True, [oid("bike-1")]),
        ("condition.all[1]", True, []),
    ]
    priority = await egret.query.CheckEligibility(
        pb.CheckEligibilityRequest(subject=key(ALICE), benefit_id="priority_service")
    )
    assert not priority.eligible
    assert (priority.purpose_bound_score.tier, list(priority.purpose_bound_score.lists)) == ("B", ["black"])
    assert set(priority.reasons[0].entry_ids) == {oid("bike-1"), oid("court-1")}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.query.CheckEligibility(
            pb.CheckEligibilityRequest(subject=key(ALICE), benefit_id="spa.free")
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.query.CheckEligibility(pb.CheckEligibilityRequest(subject=key("nope")))
    assert bad_request(caught.value) == [("subject.subject_key", "INVALID"), ("benefit_id", "REQUIRED")]


async def test_batch_scores_distribution_and_benefits(egret: Egret) -> None:
    await egret.apply(
        outcome("a1", ALICE, 10, "civic", POSITIVE),
        outcome("b1", BOB, -50, "traffic", SERIOUS),
        outcome(oid("o1"), ACME, 5, "commerce", POSITIVE, kind=ORGANIZATION),
    )
    batch = await egret.query.BatchGetScores(
        pb.BatchGetScoresRequest(subjects=[key(ALICE), key("0" * 64), key(ACME)])
    )
    assert [(r.found, r.score.score) for r in batch.results] == [(True, 1010), (False, 0), (True, 1005)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.query.BatchGetScores(pb.BatchGetScoresRequest(subjects=[key(ALICE), key("bad")]))
    assert bad_request(caught.value) == [("subjects[1].subject_key", "INVALID")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.query.BatchGetScores(pb.BatchGetScoresRequest())
    assert bad_request(caught.value) == [("subjects", "OUT_OF_RANGE")]

    d = await egret.query.GetTierDistribution(pb.GetTierDistributionRequest())
    person, org = subject_pb2.SUBJECT_KIND_PERSON, subject_pb2.SUBJECT_KIND_ORGANIZATION
    assert sorted((c.subject_kind, c.tier, c.subjects) for c in d.by_kind) == [
        (person, "A", 1),
        (person, "B", 1),
        (org, "A", 1),
    ]
    assert sorted((c.category, c.subject_kind, c.tier, c.subjects) for c in d.by_category) == [
        ("civic", person, "A", 1),
        ("commerce", org, "A", 1),
        ("traffic", person, "B", 1),
    ]
    only_orgs = await egret.query.GetTierDistribution(pb.GetTierDistributionRequest(subject_kind=org))
    assert [(c.subject_kind, c.tier) for c in only_orgs.by_kind] == [(org, "A")]

    first = await egret.query.ListBenefits(pb.ListBenefitsRequest(page_size=3))
    second = await egret.query.ListBenefits(
        pb.ListBenefitsRequest(page_size=3, page_token=first.next_page_token)
    )
    assert [b.benefit_id for b in [*first.benefits, *second.benefits]] == [
        "bike.deposit_free",
        "library.deposit_free",
        "metro.discount",
        "priority_service",
        "procurement.eligible",
    ]
    assert second.next_page_token == ""
    procurement = second.benefits[1]
    assert (list(procurement.considers), list(procurement.subject_kinds)) == (
        ["commerce", "finance", "legal"],
        [org],
    )


async def test_a_policy_is_previewed_then_activated_and_past_scores_keep_their_policy(egret: Egret) -> None:
    await egret.apply(outcome(oid("g1"), BOB, -45, "finance", GENERAL))
    before = egret.clock.now
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.score.PreviewPolicy(score_pb.PreviewPolicyRequest(policy_yaml="version: ''\npolicies: 3"))
    assert bad_request(caught.value) == [
        ("policy_yaml.version", "INVALID_POLICY"),
        ("policy_yaml.policies", "INVALID_POLICY"),
        ("policy_yaml.policies.person", "INVALID_POLICY"),
        ("policy_yaml.policies.organization", "INVALID_POLICY"),
    ]
    proposed = POLICY_FILE.read_text().replace('"2026.2"', '"2026.3"').replace("base: 1000", "base: 1020")
    preview = (await egret.score.PreviewPolicy(score_pb.PreviewPolicyRequest(policy_yaml=proposed))).report
    assert (preview.current_version, preview.proposed_version, preview.tier_changed) == (
        "2026.2",
        "2026.3",
        1,
    )
    assert [(m.from_tier, m.to_tier, m.subjects) for m in preview.migrations] == [("B", "A", 1)]
    assert (await egret.get(BOB)).score == 955  # a preview changes nothing

    egret.clock.now += timedelta(hours=1)
    activated = await egret.score.ActivatePolicy(
        score_pb.ActivatePolicyRequest(
            policy_yaml=proposed, activated_by="reviewer 7", expected_current_version="2026.2"
        )
    )
    assert activated.subjects_recomputed == 1
    now = await egret.get(BOB)
    assert (now.score, now.tier, now.policy_version, now.base_score) == (975, "A", "2026.3", 1020)
    past = await egret.get(BOB, as_of=before)
    assert (past.score, past.policy_version, past.base_score) == (955, "2026.2", 1000)
    assert (await egret.history(BOB))[-1].cause == pb.CHANGE_CAUSE_POLICY
    policies = await egret.score.ListPolicies(score_pb.ListPoliciesRequest())
    assert [(a.version, a.activated_by) for a in policies.activations] == [
        ("2026.2", "policy file policy.yaml"),
        ("2026.3", "reviewer 7"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await egret.score.ActivatePolicy(
            score_pb.ActivatePolicyRequest(policy_yaml=proposed, activated_by="x")
        )
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    verified = await egret.score.VerifyScores(score_pb.VerifyScoresRequest())
    assert verified.mismatch_count == 0
