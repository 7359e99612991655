"""Events flow ingest → rules → score and come back from query, across four processes."""

from __future__ import annotations

import pytest

from devtools.cluster import Cluster
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from kit.principal import Role
from tests.support.events import ORGANIZATION, event
from tests.support.purposes import purposed
from tests.support.scenario import (
    ACME,
    ALICE,
    EXPECTED,
    SCENARIO,
    assert_expected_scores,
    assert_scores_equal_recompute,
    at,
    raw,
    submit_all,
)

pytestmark = pytest.mark.e2e


async def test_hand_computed_scenario_lands_the_expected_scores(cluster: Cluster) -> None:
    responses = await submit_all(cluster)
    assert sum(r.counts.accepted for r in responses) == len(SCENARIO)
    cluster.wait_drained(timeout_s=60)
    await assert_expected_scores(cluster)
    assert await assert_scores_equal_recompute(cluster) == len(EXPECTED)

    async with cluster.channel("query", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        query = purposed(query_grpc.QueryServiceStub(channel), "subject-request")
        page = await query.ListEntries(query_pb.ListEntriesRequest(subject=raw(ALICE), page_size=10))
        assert [e.rule.rule_id for e in page.entries] == [
            "transport.metro_fare_evasion",
            "civic.volunteer_hours",
            "traffic.red_light",
            "civic.blood_donation",
            "library.late_return",
        ]
        late = page.entries[-1]
        entry = (await query.GetEntry(query_pb.GetEntryRequest(entry_id=late.entry_id))).entry
        assert (entry.points, entry.category, entry.rule.rule_set_version) == (-3, "civic", 2)
        (evidence,) = entry.evidence
        assert (evidence.ref.source, evidence.ref.event_id) == ("library", "lib-1")
        assert evidence.attributes["days_late"].int_value == 40
        assert ALICE not in str(entry)


async def test_resent_batches_and_duplicates_never_double_count(cluster: Cluster) -> None:
    await submit_all(cluster)
    cluster.wait_drained(timeout_s=60)
    again = await submit_all(cluster)
    assert sum(r.counts.duplicate for r in again) == len(SCENARIO)
    assert sum(r.counts.accepted for r in again) == 0
    cluster.wait_drained(timeout_s=60)
    await assert_expected_scores(cluster)
    await assert_scores_equal_recompute(cluster)


async def test_invalid_events_are_rejected_with_field_detail_while_the_rest_of_their_batch_lands(
    cluster: Cluster,
) -> None:
    good = event("ok-1", "library.book_returned_late", ALICE, {"days_late": 45}, occurred_at=at(1))
    bad = event(
        "bad-1", "library.book_returned_late", ALICE, {"days_late": -2, "shelf": "A3"}, occurred_at=at(1)
    )
    wrong_kind = event("bad-2", "library.book_returned_late", ACME, {"days_late": 45}, kind=ORGANIZATION)
    async with cluster.department_channel("library") as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        response = await stub.SubmitEvents(
            ingest_pb.SubmitEventsRequest(source="library", events=[bad, good, wrong_kind]), timeout=10
        )
    assert [r.status for r in response.results] == [
        ingest_pb.EVENT_STATUS_REJECTED,
        ingest_pb.EVENT_STATUS_ACCEPTED,
        ingest_pb.EVENT_STATUS_REJECTED,
    ]
    assert [(v.field, v.reason) for v in response.results[0].violations] == [
        ("events[0].attributes.days_late", "OUT_OF_RANGE"),
        ("events[0].attributes.shelf", "UNKNOWN"),
    ]
    assert [(v.field, v.reason) for v in response.results[2].violations] == [
        ("events[2].subject.kind", "NOT_ALLOWED")
    ]
    cluster.wait_drained(timeout_s=60)
    async with cluster.channel("query", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        found = await purposed(query_grpc.QueryServiceStub(channel), "subject-request").GetScore(
            query_pb.GetScoreRequest(subject=raw(ALICE))
        )
    assert (found.score.score, found.score.entry_count) == (997, 1)
