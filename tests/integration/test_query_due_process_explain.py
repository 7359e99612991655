"""Query's half of due process over real gRPC on loopback (score's real server writing the
store, authenticated principals, one injected clock; SQLite and PostgreSQL): disputed flags on every
read; Explain (its sums, the dates entries expire, the active rule sets' positive behaviours, and
without them when rules is down); the corrected timeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, timedelta
from pathlib import Path

import grpc

from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import event_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.protoconv import to_timestamp
from kit.settings import PeerSettings
from services.query.bootstrap import MIGRATIONS as QUERY_MIGRATIONS
from services.query.bootstrap import build as build_query
from services.rules.bootstrap import MIGRATIONS as RULES_MIGRATIONS
from services.rules.bootstrap import build as build_rules
from services.score.bootstrap import MIGRATIONS as SCORE_MIGRATIONS
from services.score.bootstrap import build as build_score
from tests.support.due_process import ALICE, DAY, GENERAL, T0, Clock
from tests.support.outcomes import oid
from tests.support.query import query_settings
from tests.support.rules import rules_settings
from tests.support.score import POLICY_FILE, score_settings
from tests.support.score_and_query import Egret, code_of, egret, entry, key
from tests.support.servers import running

__all__ = ["egret"]  # fixtures, used by name


async def test_an_open_dispute_is_flagged_on_every_read(egret: Egret) -> None:
    await egret.apply(entry(oid("t1"), -5, "transport", days_ago=3), entry("c1", 10, "civic", days_ago=2))
    dispute = await egret.dispute(oid("t1"))
    score = (await egret.reviewer.GetScore(pb.GetScoreRequest(subject=key()))).score
    assert list(score.disputed_entry_ids) == [oid("t1")]
    batch = await egret.reviewer.BatchGetScores(pb.BatchGetScoresRequest(subjects=[key()]))
    assert list(batch.results[0].score.disputed_entry_ids) == [oid("t1")]
    eligibility = await egret.alice.CheckEligibility(
        pb.CheckEligibilityRequest(subject=key(), benefit_id="bike.deposit_free")
    )
    # Both conditions rest on t1 (the tier counts it, and it is a negative transport entry).
    assert [(list(r.entry_ids), list(r.disputed_entry_ids)) for r in eligibility.reasons] == [
        ([oid("t1")], [oid("t1")]),
        ([oid("t1")], [oid("t1")]),
    ]
    listed = {
        x.entry_id: x for x in (await egret.alice.ListEntries(pb.ListEntriesRequest(subject=key()))).entries
    }
    assert listed[oid("t1")].status == pb.ENTRY_STATUS_DISPUTED
    assert listed[oid("t1")].dispute.dispute_id == dispute.dispute_id
    assert listed["c1"].status == pb.ENTRY_STATUS_ACTIVE
    assert not listed["c1"].HasField("dispute")
    got = (await egret.alice.GetEntry(pb.GetEntryRequest(entry_id=oid("t1")))).entry
    assert got.status == pb.ENTRY_STATUS_DISPUTED
    assert got.dispute.statement == "not me"
    explained = {
        x.entry.entry_id: x
        for x in (await egret.alice.Explain(pb.ExplainRequest(subject=key()))).explanation.entries
    }
    assert explained[oid("t1")].entry.status == pb.ENTRY_STATUS_DISPUTED
    assert explained[oid("t1")].counting
    # Past the deadline undecided, it stops counting and says why.
    egret.clock.now = T0 + 21 * DAY
    score = (await egret.reviewer.GetScore(pb.GetScoreRequest(subject=key()))).score
    assert list(score.disputed_entry_ids) == []
    got = (await egret.alice.GetEntry(pb.GetEntryRequest(entry_id=oid("t1")))).entry
    assert got.dispute.overdue
    assert "past the deadline" in got.status_reason


async def test_explain_adds_up_and_projects_the_dates_entries_expire(egret: Egret) -> None:
    await egret.apply(
        entry("c1", 30, "civic", days_ago=10),
        entry("c2", 30, "civic", days_ago=5),
        entry("f1", -10, "finance", days_ago=200, severity=GENERAL),
        entry(oid("t1"), -5, "traffic", days_ago=30),
        entry(oid("old"), -7, "traffic", days_ago=100),
    )
    x = (await egret.alice.Explain(pb.ExplainRequest(subject=key(), purpose="own-record"))).explanation
    # 1000 + 30 + 20 (10 withheld by the +50 cap) - 10 - 5; "old" expired at 90 days.
    assert (x.score, x.tier, x.base_score, x.min_score, x.max_score) == (1035, "AA", 1000, 0, 2000)
    assert [(t.tier, t.min_score) for t in x.tiers][:3] == [("AAA", 1050), ("AA", 1030), ("A", 960)]
    assert (x.next_tier.tier, x.next_tier.min_score, x.next_tier.points_needed) == ("AAA", 1050, 15)
    assert x.cap_window_days == 365
    rows = {e.entry.entry_id: e for e in x.entries}
    assert [e.entry.entry_id for e in x.entries] == [
        "c2",
        "c1",
        oid("t1"),
        oid("old"),
        "f1",
    ]  # newest event first
    assert [(rows[i].contribution, rows[i].capped_points, rows[i].counting) for i in rows] == [
        (20, 10, True),
        (30, 0, True),
        (-5, 0, True),
        (0, 0, False),
        (-10, 0, True),
    ]
    assert rows[oid("old")].entry.status == pb.ENTRY_STATUS_EXPIRED
    assert "expired" in rows[oid("old")].entry.status_reason
    assert rows["f1"].repair_possible_from.ToDatetime(UTC) == T0 - 110 * DAY  # general: 90 days
    assert rows[oid("t1")].repair_possible_from.ToDatetime(UTC) == T0 - 30 * DAY  # minor: at once
    assert not rows["c1"].HasField("repair_possible_from")
    assert len(rows["c1"].entry.evidence) == 1
    assert rows["c1"].entry.rule.legal_basis == "Regulation 7"
    assert [(c.category, c.points, c.capped_points) for c in x.categories] == [
        ("civic", 50, 10),
        ("finance", -10, 0),
        ("traffic", -5, 0),
    ]
    assert [(p.at.ToDatetime(UTC), p.score, p.tier, list(p.expiring_entry_ids)) for p in x.projection] == [
        (T0 + 60 * DAY, 1040, "AA", [oid("t1")]),
        (T0 + 165 * DAY, 1050, "AAA", ["f1"]),
        (T0 + 720 * DAY, 1020, "A", ["c1"]),
        (T0 + 725 * DAY, 1000, "A", ["c2"]),
    ]
    # No rules service configured: no positive behaviours, the explanation is still served.
    assert list(x.positive_behaviours) == []
    # Only the subject itself (and staff) may ask.
    assert (
        await code_of(egret.bob.Explain(pb.ExplainRequest(subject=key())))
        is grpc.StatusCode.PERMISSION_DENIED
    )


async def test_as_corrected_reads_never_count_a_reversed_entry(egret: Egret) -> None:
    await egret.apply(
        entry(oid("keep"), 5, "civic", days_ago=10), entry(oid("wrong"), -10, "finance", days_ago=10)
    )
    egret.clock.now = T0 + DAY
    reversal = score_pb.Reversal(
        outcome_id=oid("wrong"),
        retraction=dp.Retraction(
            ref=event_pb2.EventRef(source="library", event_id="wrong-0"),
            subject_key=ALICE,
            reason="sent in error",
            retracted_at=to_timestamp(T0 + DAY),
            retracted_by="library",
        ),
    )
    # A replacement, recorded late with its own (earlier) event time.
    await egret.apply(entry(oid("fixed"), -4, "finance", days_ago=9), reversals=(reversal,))
    egret.clock.now = T0 + 2 * DAY
    at = to_timestamp(T0 + timedelta(hours=12))

    async def score_at(view: int) -> int:
        got = await egret.reviewer.GetScore(pb.GetScoreRequest(subject=key(), as_of=at, view=view))  # type: ignore[arg-type]
        return got.score.score

    assert await score_at(pb.SCORE_VIEW_AS_KNOWN) == 995
    # As corrected, "wrong" never counted and "fixed" counted from its event time.
    assert await score_at(pb.SCORE_VIEW_AS_CORRECTED) == 1001
    now = (await egret.reviewer.GetScore(pb.GetScoreRequest(subject=key()))).score.score
    assert now == 1001  # now, both timelines agree
    known = await egret.reviewer.ListScoreHistory(pb.ListScoreHistoryRequest(subject=key()))
    assert next((c.cause, c.score) for c in known.changes) == (pb.CHANGE_CAUSE_CORRECTION, 1001)
    assert list(known.changes[0].ended_entry_ids) == [oid("wrong")]
    assert "retracted" in known.changes[0].note
    corrected = await egret.reviewer.ListScoreHistory(
        pb.ListScoreHistoryRequest(subject=key(), as_corrected=True)
    )
    assert [
        (c.changed_at.ToDatetime(UTC), c.cause, c.score, list(c.added_entry_ids)) for c in corrected.changes
    ] == [
        (T0 - 9 * DAY, pb.CHANGE_CAUSE_ENTRIES, 1001, [oid("fixed")]),
        (T0 - 10 * DAY, pb.CHANGE_CAUSE_ENTRIES, 1005, [oid("keep")]),
    ]
    assert not corrected.changes[1].HasField("score_before")
    assert corrected.changes[0].score_before == 1005


async def test_explain_lists_the_active_rule_sets_positive_behaviours_with_cap_room(
    database_url: str, database_url_factory: Callable[[str], str], tmp_path: Path
) -> None:
    sample = (POLICY_FILE.parent / "rulesets" / "sample.yaml").read_text()
    clock = Clock(T0)
    rules = rules_settings(database_url_factory("rules"), tmp_path, "127.0.0.1:9", source=sample)
    async with (
        running(rules, build_rules, RULES_MIGRATIONS) as rules_address,
        running(
            score_settings(database_url, tmp_path),
            functools.partial(build_score, clock=clock),
            SCORE_MIGRATIONS,
        ) as score_address,
        running(
            replace(query_settings(database_url, tmp_path), rules=PeerSettings(rules_address, 2.0)),
            functools.partial(build_query, clock=clock),
            QUERY_MIGRATIONS,
        ) as query_address,
        grpc.aio.insecure_channel(score_address) as score_channel,
        grpc.aio.insecure_channel(query_address) as query_channel,
    ):
        await score_grpc.ScoreServiceStub(score_channel).ApplyOutcomes(
            score_pb.ApplyOutcomesRequest(outcomes=[entry("c1", 30, "civic", days_ago=10)])
        )
        query = pb_grpc.QueryServiceStub(query_channel)
        for _ in range(2):  # the second answer comes from the cached rule set
            x = (await query.Explain(pb.ExplainRequest(subject=key()))).explanation
            behaviours = {b.rule_id: (b.points, b.category, b.cap_remaining) for b in x.positive_behaviours}
            assert behaviours == {
                "transport.bike_parked_in_fence": ("1", "transport", 50),
                "civic.volunteer_hours": ("2 * (hours // 10)", "civic", 20),
                "civic.blood_donation": ("10", "civic", 20),
                "finance.tax_paid_on_time": ("10", "finance", 50),
                "library.returns_on_time": ("5", "civic", 20),
            }  # commerce.inspection_passed is for organizations only


async def test_explain_is_served_without_positive_behaviours_when_rules_is_down(
    database_url: str, tmp_path: Path
) -> None:
    clock = Clock(T0)
    async with (
        running(
            score_settings(database_url, tmp_path),
            functools.partial(build_score, clock=clock),
            SCORE_MIGRATIONS,
        ) as score_address,
        running(
            replace(query_settings(database_url, tmp_path), rules=PeerSettings("127.0.0.1:9", 0.5)),
            functools.partial(build_query, clock=clock),
            QUERY_MIGRATIONS,
        ) as query_address,
        grpc.aio.insecure_channel(score_address) as score_channel,
        grpc.aio.insecure_channel(query_address) as query_channel,
    ):
        await score_grpc.ScoreServiceStub(score_channel).ApplyOutcomes(
            score_pb.ApplyOutcomesRequest(outcomes=[entry("c1", 30, "civic", days_ago=10)])
        )
        x = (
            await pb_grpc.QueryServiceStub(query_channel).Explain(pb.ExplainRequest(subject=key()))
        ).explanation
        assert (x.score, list(x.positive_behaviours)) == (1030, [])
