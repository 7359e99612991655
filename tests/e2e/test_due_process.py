"""Due process across the four processes: a retraction travels ingest → rules → score and
both timelines stay readable; a subject's dispute shows on every read and an overturn
recomputes; every audit chain verifies afterwards."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from devtools.cluster import Cluster
from egret.common.v1 import due_process_pb2, event_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from tests.support.purposes import purposed
from tests.support.scenario import ALICE, EXPECTED, assert_scores_equal_recompute, raw, submit_all
from tests.support.waiting import until


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def _alice_score(cluster: Cluster, **fields: object) -> query_pb.Score:
    async with cluster.channel("query", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        request = query_pb.GetScoreRequest(subject=raw(ALICE), **fields)  # type: ignore[arg-type]
        return (
            await purposed(query_grpc.QueryServiceStub(channel), "subject-request").GetScore(
                request, timeout=10
            )
        ).score


async def _wait_for_score(cluster: Cluster, expected: int) -> query_pb.Score:
    latest: list[query_pb.Score] = []

    async def reached() -> None:
        latest[:] = [await _alice_score(cluster)]
        assert latest[0].score == expected, latest[0].score

    await until(reached, what=f"Alice's score to become {expected}", every_s=0.1)
    return latest[0]


async def test_a_retraction_reverses_the_entry_end_to_end_and_keeps_both_timelines(cluster: Cluster) -> None:
    await submit_all(cluster)
    cluster.wait_drained(timeout_s=60)
    before = datetime.now(UTC)
    assert (await _alice_score(cluster)).score == EXPECTED[ALICE][0] == 996

    # The traffic police withdraw the red-light event (-5 traffic).
    async with cluster.department_channel("traffic-police") as channel:
        response = await ingest_grpc.IngestServiceStub(channel).RetractEvent(
            ingest_pb.RetractEventRequest(
                ref=event_pb2.EventRef(source="traffic-police", event_id="red-1"),
                reason="camera C-17 misread the plate",
            ),
            timeout=10,
        )
    assert not response.already_retracted
    cluster.wait_drained(timeout_s=60)
    now = await _wait_for_score(cluster, 1001)
    assert {c.category: c.points for c in now.categories}.get("traffic", 0) == 0

    # As known then, the red light counted; as corrected, it never did.
    assert (await _alice_score(cluster, as_of=_timestamp(before))).score == 996
    corrected = await _alice_score(cluster, as_of=_timestamp(before), view=query_pb.SCORE_VIEW_AS_CORRECTED)
    assert corrected.score == 1001

    async with cluster.channel("query", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        query = purposed(query_grpc.QueryServiceStub(channel), "subject-request")
        history = await query.ListScoreHistory(
            query_pb.ListScoreHistoryRequest(subject=raw(ALICE)), timeout=10
        )
        latest = history.changes[0]
        assert latest.cause == query_pb.CHANGE_CAUSE_CORRECTION
        assert (latest.score_before, latest.score) == (996, 1001)
        entries = await query.ListEntries(query_pb.ListEntriesRequest(subject=raw(ALICE)), timeout=10)
        red = next(e for e in entries.entries if e.rule.rule_id == "traffic.red_light")
        assert red.status == query_pb.ENTRY_STATUS_REVERSED
        assert list(latest.ended_entry_ids) == [red.entry_id]
    await assert_scores_equal_recompute(cluster)


async def test_a_subjects_dispute_shows_on_every_read_and_an_overturn_recomputes(cluster: Cluster) -> None:
    await submit_all(cluster)
    cluster.wait_drained(timeout_s=60)
    alice = cluster.token(f"person:resident-id:{ALICE}", Role.SUBJECT)
    async with cluster.channel("query", alice) as channel:
        entries = await query_grpc.QueryServiceStub(channel).ListEntries(
            query_pb.ListEntriesRequest(subject=raw(ALICE)), timeout=10
        )
    fare = next(e for e in entries.entries if e.rule.rule_id == "transport.metro_fare_evasion")
    async with cluster.channel("score", alice) as channel:
        filed = await score_grpc.ScoreServiceStub(channel).FileDispute(
            score_pb.FileDisputeRequest(entry_id=fare.entry_id, statement="I had a valid ticket"), timeout=10
        )
    assert filed.dispute.status == due_process_pb2.DISPUTE_STATUS_OPEN

    async with cluster.channel("query", alice) as channel:
        query = query_grpc.QueryServiceStub(channel)
        score = (await query.GetScore(query_pb.GetScoreRequest(subject=raw(ALICE)), timeout=10)).score
        assert list(score.disputed_entry_ids) == [fare.entry_id]
        assert score.score == 996  # still counts until the deadline
        explanation = (
            await query.Explain(query_pb.ExplainRequest(subject=raw(ALICE)), timeout=10)
        ).explanation
        explained = next(e for e in explanation.entries if e.entry.entry_id == fare.entry_id)
        assert explained.entry.status == query_pb.ENTRY_STATUS_DISPUTED
        assert explained.entry.dispute.dispute_id == filed.dispute.dispute_id
        # Positive behaviours come from rules (query calls it with its own service token).
        rewarded = {b.rule_id for b in explanation.positive_behaviours}
        assert {"civic.blood_donation", "civic.volunteer_hours"} <= rewarded

    async with cluster.channel("score", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        await score_grpc.ScoreServiceStub(channel).ResolveDispute(
            score_pb.ResolveDisputeRequest(
                dispute_id=filed.dispute.dispute_id,
                decision=due_process_pb2.DISPUTE_DECISION_OVERTURN,
                reason="the gate log shows a valid ticket",
            ),
            timeout=10,
        )
    await _wait_for_score(cluster, 1006)

    # Alice sees who read her data, and every service's audit chain is intact.
    async with cluster.channel("query", alice) as channel:
        log = await query_grpc.QueryServiceStub(channel).ListAccessLog(
            query_pb.ListAccessLogRequest(subject=raw(ALICE)), timeout=10
        )
    assert {r.actor for r in log.records} >= {"e2e-reviewer"}
    assert {"GetScore", "Explain", "ListEntries"} <= {r.method for r in log.records}
    cluster.stop()
    verify_audit_chains(cluster)


def verify_audit_chains(cluster: Cluster) -> None:
    """`verify-audit` of every service passes (MACs under the cluster's audit key, and every
    automatic anchor the service appended) and prints an anchor, which a second run then
    checks; an anchor that does not match fails the check."""

    def verify(name: str, *anchors: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", f"services.{name}", "verify-audit", *(f"--anchor={a}" for a in anchors)],
            env=cluster.env_for(name),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    for name in cluster.services:
        result = verify(name)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert "audit log intact" in result.stdout
        if "(0 records" in result.stdout:
            assert "anchor:" not in result.stdout  # nothing to anchor yet
            continue
        anchor = re.search(r"^anchor: (\d+:[0-9a-f]{64})$", result.stdout, re.MULTILINE)
        assert anchor is not None, (name, result.stdout)
        # Each service anchored its own head on the way out, at least (EGRET_AUDIT_ANCHOR_FILE).
        automatic = re.search(r"(\d+) automatic anchor\(s\) in \S+ hold", result.stdout)
        assert automatic is not None, (name, result.stdout)
        assert int(automatic.group(1)) >= 1, (name, result.stdout)
        last_line = cluster.anchor_file(name).read_text().splitlines()[-1]
        assert last_line.split()[2:] == anchor.group(1).split(":")
        again = verify(name, anchor.group(1))
        assert again.returncode == 0, (name, again.stdout, again.stderr)
        assert "1 anchor(s) hold" in again.stdout
        seq = anchor.group(1).split(":")[0]
        forged = verify(name, f"{seq}:{'0' * 64}")
        assert forged.returncode == 1, (name, forged.stdout, forged.stderr)
        assert f"seq {seq}: hash differs from its anchor" in forged.stderr
