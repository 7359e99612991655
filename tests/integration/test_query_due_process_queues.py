"""Query's half of due process over real gRPC on loopback (score's real server writing the
store, authenticated principals, one injected clock; SQLite and PostgreSQL): the dispute and repair
queues: their filters (department, category, overdue, assignee) across pages, and one dispute or
application read by id and recorded for its subject only.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import outcome_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.score.v1 import score_service_pb2 as score_pb
from kit.columns import Instant
from kit.principal import Role
from tests.support.due_process import ALICE, ALICE_ID, BOB, BOB_ID, DAY, T0
from tests.support.score_and_query import Egret, access_log, code_of, egret, entry, key
from tests.support.status import bad_request

__all__ = ["egret"]  # fixtures, used by name


async def test_dispute_and_repair_queues_filter_and_page(egret: Egret) -> None:
    await egret.apply(
        *(entry(f"d{n}", -5, "transport", days_ago=3) for n in range(3)),
        entry("b1", -5, "transport", days_ago=3, subject_key=BOB),
    )
    ids = []
    for n in range(3):
        egret.clock.now = T0 + n * timedelta(hours=1)
        ids.append((await egret.dispute(f"d{n}")).dispute_id)
    ids.append((await egret.dispute("b1", BOB_ID)).dispute_id)
    await egret.score("reviewer-7", Role.REVIEWER).ResolveDispute(
        score_pb.ResolveDisputeRequest(
            dispute_id=ids[1], decision=dp.DISPUTE_DECISION_UPHOLD, reason="stands"
        )
    )
    r = egret.reviewer
    pages, token = [], ""
    while True:
        page = await r.ListDisputes(pb.ListDisputesRequest(page_size=2, page_token=token))
        pages.append([d.dispute_id for d in page.disputes])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[ids[0], ids[1]], [ids[2], ids[3]]]  # earliest deadline first
    upheld = await r.ListDisputes(pb.ListDisputesRequest(status=dp.DISPUTE_STATUS_UPHELD))
    assert [d.dispute_id for d in upheld.disputes] == [ids[1]]
    bobs = await r.ListDisputes(pb.ListDisputesRequest(subject=key(BOB)))
    assert [d.dispute_id for d in bobs.disputes] == [ids[3]]
    own = await egret.alice.ListDisputes(pb.ListDisputesRequest())
    assert [d.dispute_id for d in own.disputes] == ids[:3]
    assert await code_of(egret.alice.ListDisputes(pb.ListDisputesRequest(subject=key(BOB)))) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    egret.clock.now = T0 + 20 * DAY + timedelta(minutes=90)  # past the first two deadlines
    overdue = await r.ListDisputes(pb.ListDisputesRequest(overdue_only=True))
    assert [(d.dispute_id, d.overdue) for d in overdue.disputes] == [(ids[0], True)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await r.ListDisputes(pb.ListDisputesRequest(page_token="nonsense"))
    assert bad_request(caught.value) == [("page_token", "INVALID_PAGE_TOKEN")]

    # Repair applications: one pending, one rejected.
    alice_score = egret.score(ALICE_ID, Role.SUBJECT)
    egret.clock.now = T0 + 30 * DAY
    await egret.apply(entry("e1", -3, "civic", days_ago=1), entry("e2", -3, "civic", days_ago=1))
    apps = []
    for n, entry_id in enumerate(("e1", "e2")):
        egret.clock.now = T0 + 30 * DAY + n * DAY  # a Wednesday, then a Thursday
        applied = await alice_score.ApplyForRepair(
            score_pb.ApplyForRepairRequest(entry_id=entry_id, evidence="paid")
        )
        apps.append(applied.application.application_id)
    await egret.score("reviewer-7", Role.REVIEWER).DecideRepair(
        score_pb.DecideRepairRequest(application_id=apps[1], decision=dp.REPAIR_DECISION_REJECT, reason="no")
    )
    first = await r.ListRepairApplications(pb.ListRepairApplicationsRequest(page_size=1))
    second = await r.ListRepairApplications(
        pb.ListRepairApplicationsRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [a.application_id for a in [*first.applications, *second.applications]] == apps
    assert second.next_page_token == ""
    pending = await r.ListRepairApplications(
        pb.ListRepairApplicationsRequest(status=dp.REPAIR_STATUS_PENDING)
    )
    assert [a.application_id for a in pending.applications] == [apps[0]]
    egret.clock.now = T0 + 40 * DAY
    late = await r.ListRepairApplications(pb.ListRepairApplicationsRequest(overdue_only=True))
    assert [(a.application_id, a.overdue) for a in late.applications] == [(apps[0], True)]
    assert (await egret.bob.ListRepairApplications(pb.ListRepairApplicationsRequest())).applications == []
    # Listing a subject's queue is a read of its data.
    methods = [x.method for x in await access_log(egret, BOB)]
    assert "ListDisputes" in methods
    assert "ListRepairApplications" in methods


async def test_one_dispute_or_application_is_read_by_id_and_recorded_for_its_subject_only(
    egret: Egret,
) -> None:
    await egret.apply(
        entry("a1", -5, "transport", days_ago=1),
        entry("a2", -5, "transport", days_ago=1),
        entry("b1", -5, "transport", days_ago=1, subject_key=BOB),
    )
    alices = [(await egret.dispute(e)).dispute_id for e in ("a1", "a2")]
    bobs = (await egret.dispute("b1", BOB_ID)).dispute_id
    applied = []
    for entry_id, subject in (("a1", ALICE_ID), ("b1", BOB_ID)):
        response = await egret.score(subject, Role.SUBJECT).ApplyForRepair(
            score_pb.ApplyForRepairRequest(entry_id=entry_id, evidence="paid")
        )
        applied.append(response.application.application_id)
    r = egret.reviewer

    async def read_by(subject_key: str) -> list[str]:
        return [x.method for x in await access_log(egret, subject_key) if x.method != "ListAccessLog"]

    before = {k: await read_by(k) for k in (ALICE, BOB)}
    one = await r.ListDisputes(pb.ListDisputesRequest(dispute_ids=[alices[1]]))
    assert [d.dispute_id for d in one.disputes] == [alices[1]]
    assert one.next_page_token == ""
    app = await r.ListRepairApplications(pb.ListRepairApplicationsRequest(application_ids=[applied[0]]))
    assert [a.application_id for a in app.applications] == [applied[0]]
    # Only the subject of what was read has a record of it; Bob's queue was not read.
    assert await read_by(ALICE) == ["ListRepairApplications", "ListDisputes", *before[ALICE]]  # newest first
    assert await read_by(BOB) == before[BOB]

    several = await r.ListDisputes(pb.ListDisputesRequest(dispute_ids=[bobs, alices[0], alices[0]]))
    assert sorted(d.dispute_id for d in several.disputes) == sorted([alices[0], bobs])
    paged = await r.ListDisputes(pb.ListDisputesRequest(dispute_ids=[bobs, *alices], page_size=2))
    rest = await r.ListDisputes(
        pb.ListDisputesRequest(dispute_ids=[bobs, *alices], page_size=2, page_token=paged.next_page_token)
    )
    assert [len(paged.disputes), len(rest.disputes), rest.next_page_token] == [2, 1, ""]
    # The other filters still apply, and a subject sees only its own.
    assert (
        await r.ListDisputes(pb.ListDisputesRequest(dispute_ids=[bobs], subject=key(ALICE)))
    ).disputes == []
    assert (await egret.alice.ListDisputes(pb.ListDisputesRequest(dispute_ids=[bobs]))).disputes == []
    mine = await egret.alice.ListDisputes(pb.ListDisputesRequest(dispute_ids=[alices[0], bobs]))
    assert [d.dispute_id for d in mine.disputes] == [alices[0]]

    # An unknown id, or one that is no dispute id at all, is an empty page, read of no one.
    before = {k: await read_by(k) for k in (ALICE, BOB)}
    for unknown in ("999999", "nonsense", "²"):
        assert (await r.ListDisputes(pb.ListDisputesRequest(dispute_ids=[unknown]))).disputes == []
        listed = await r.ListRepairApplications(pb.ListRepairApplicationsRequest(application_ids=[unknown]))
        assert listed.applications == []
    assert {k: await read_by(k) for k in (ALICE, BOB)} == before

    for call, named in (
        (r.ListDisputes(pb.ListDisputesRequest(dispute_ids=[str(n) for n in range(101)])), "dispute_ids"),
        (
            r.ListRepairApplications(
                pb.ListRepairApplicationsRequest(application_ids=[str(n) for n in range(101)])
            ),
            "application_ids",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value) == [(named, "OUT_OF_RANGE")]
    hundred = await r.ListDisputes(
        pb.ListDisputesRequest(dispute_ids=[str(10**6 + n) for n in range(99)] + [bobs])
    )
    assert [d.dispute_id for d in hundred.disputes] == [bobs]


def from_source(o: outcome_pb2.Outcome, source: str) -> outcome_pb2.Outcome:
    for e in o.events:
        e.ref.source = source
    return o


async def test_the_dispute_queue_filters_by_department_category_overdue_and_assignee_across_pages(
    egret: Egret, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The department is kept in Python over batches of rows: a tiny batch makes every page
    # span several of them.
    monkeypatch.setattr("services.query.stores.due_process.DEPARTMENT_BATCH", 2)
    sources = ["metro", "library", "metro", "library", "metro"]
    await egret.apply(
        *(from_source(entry(f"d{n}", -5, "transport", days_ago=3), s) for n, s in enumerate(sources)),
        from_source(entry("c0", -5, "civic", days_ago=3), "metro"),
    )
    ids = {}
    for n, entry_id in enumerate(["d0", "d1", "d2", "d3", "d4", "c0"]):
        egret.clock.now = T0 + n * timedelta(hours=1)
        ids[entry_id] = (await egret.dispute(entry_id)).dispute_id
    r = egret.reviewer

    async def listed(**filters: Any) -> list[str]:
        found, token = [], ""
        while True:
            page = await r.ListDisputes(pb.ListDisputesRequest(page_size=1, page_token=token, **filters))
            assert len(page.disputes) == 1 or not page.next_page_token  # short only at the end
            found += [d.dispute_id for d in page.disputes]
            token = page.next_page_token
            if not token:
                return found

    by = [ids[e] for e in ("d0", "d2", "d4", "c0")]
    assert await listed(department="metro") == by  # earliest deadline first
    assert await listed(department="library") == [ids["d1"], ids["d3"]]
    assert await listed(department="fire") == []
    assert await listed(category="civic") == [ids["c0"]]
    assert await listed(department="metro", category="transport") == [ids[e] for e in ("d0", "d2", "d4")]

    # Held by reviewers (AssignDispute writes these columns; set here to test the reads alone).
    score_db = sa.create_engine(database_url)
    with score_db.begin() as db:
        db.execute(
            sa.text(
                "UPDATE score_disputes SET assignee = :who, assigned_at = :at WHERE dispute_id IN (:a, :b)"
            ).bindparams(sa.bindparam("at", type_=Instant())),
            {"who": "reviewer-7", "at": T0, "a": int(ids["d1"]), "b": int(ids["c0"])},
        )
        db.execute(
            sa.text("UPDATE score_disputes SET assignee = 'reviewer-9' WHERE dispute_id = :a"),
            {"a": int(ids["d2"])},
        )
    score_db.dispose()
    mine = await r.ListDisputes(pb.ListDisputesRequest(assigned_to_caller=True))
    assert [(d.dispute_id, d.assignee) for d in mine.disputes] == [
        (ids["d1"], "reviewer-7"),
        (ids["c0"], "reviewer-7"),
    ]
    assert mine.disputes[0].assigned_at.ToDatetime(UTC) == T0
    assert await listed(assignee="reviewer-9") == [ids["d2"]]
    assert await listed(unassigned_only=True) == [ids[e] for e in ("d0", "d3", "d4")]
    assert await listed(unassigned_only=True, department="metro") == [ids["d0"], ids["d4"]]
    assert await listed(assigned_to_caller=True, department="metro") == [ids["c0"]]
    for conflicting, named in (
        ({"assigned_to_caller": True, "assignee": "reviewer-9"}, "assigned_to_caller"),
        ({"unassigned_only": True, "assigned_to_caller": True}, "unassigned_only"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await r.ListDisputes(pb.ListDisputesRequest(**conflicting))
        assert bad_request(caught.value) == [(named, "CONFLICTING_FILTERS")]

    egret.clock.now = T0 + 20 * DAY + timedelta(minutes=150)  # past the first three deadlines
    overdue = await listed(overdue_only=True, department="metro", status=dp.DISPUTE_STATUS_OPEN)
    assert overdue == [ids["d0"], ids["d2"]]
