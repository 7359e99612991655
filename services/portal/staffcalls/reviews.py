"""A reviewer's calls: the dispute and repair queues (query), an entry under review with
its subject's history and score (query, purpose `dispute-review` or `repair-review`), and
the decisions (score's ResolveDispute and DecideRepair), and taking or releasing a dispute
(score's AssignDispute)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from egret.common.v1 import due_process_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret.score.v1 import score_service_pb2 as score_pb
from services.portal import convert
from services.portal import records as r
from services.portal.backend import Backend, ServiceError
from services.portal.staff_records import Case, Queued, Score

Purpose = Literal["dispute-review", "repair-review"]
# Who holds the disputes a queue shows: anyone (""), the reviewer ("me"), no one ("none").
Held = Literal["", "me", "none"]
HELD_BY_ME: Held = "me"
HELD_BY_NONE: Held = "none"
HELD = ("", HELD_BY_ME, HELD_BY_NONE)
DISPUTE_REVIEW: Purpose = "dispute-review"
REPAIR_REVIEW: Purpose = "repair-review"
# A queue page; each of its items' entries is read too (for the rule, category and source).
QUEUE_PAGE = 100
# Entry reads of one queue page at once.
CONCURRENT_READS = 8
HISTORY_PAGE = 100

_DISPUTE_DECISIONS = {
    "uphold": due_process_pb2.DISPUTE_DECISION_UPHOLD,
    "overturn": due_process_pb2.DISPUTE_DECISION_OVERTURN,
}
_REPAIR_DECISIONS = {
    "approve": due_process_pb2.REPAIR_DECISION_APPROVE,
    "reject": due_process_pb2.REPAIR_DECISION_REJECT,
}


async def _with_entries(
    backend: Backend, token: str, items: tuple[r.Dispute | r.Repair, ...], purpose: Purpose
) -> tuple[Queued, ...]:
    limit = asyncio.Semaphore(CONCURRENT_READS)

    async def one(item: r.Dispute | r.Repair) -> Queued:
        async with limit:
            try:
                case = await case_of(backend, token, item.entry_id, purpose)
            except ServiceError as error:
                return Queued(item, None, error.code)
        return Queued(item, case.entry)

    return tuple(await asyncio.gather(*(one(i) for i in items)))


async def dispute_queue(
    backend: Backend,
    token: str,
    *,
    overdue_only: bool,
    page_token: str = "",
    department: str = "",
    category: str = "",
    held: Held = "",
) -> r.Page[Queued]:
    """A page of open disputes, earliest deadline first, each with its entry. The service
    applies every filter to the whole queue: held "me" is the caller's own, "none" no one's."""
    request = query_pb.ListDisputesRequest(
        status=due_process_pb2.DISPUTE_STATUS_OPEN,
        overdue_only=overdue_only,
        page_size=QUEUE_PAGE,
        page_token=page_token,
        purpose=DISPUTE_REVIEW,
        department=department,
        category=category,
        assigned_to_caller=held == HELD_BY_ME,
        unassigned_only=held == HELD_BY_NONE,
    )
    response = await backend.call("query", "ListDisputes", request, token)
    disputes = tuple(convert.dispute(d) for d in response.disputes)
    return r.Page(await _with_entries(backend, token, disputes, DISPUTE_REVIEW), response.next_page_token)


async def repair_queue(
    backend: Backend, token: str, *, overdue_only: bool, page_token: str = ""
) -> r.Page[Queued]:
    """A page of pending repair applications, earliest decision date first, each with its entry."""
    request = query_pb.ListRepairApplicationsRequest(
        status=due_process_pb2.REPAIR_STATUS_PENDING,
        overdue_only=overdue_only,
        page_size=QUEUE_PAGE,
        page_token=page_token,
        purpose=REPAIR_REVIEW,
    )
    response = await backend.call("query", "ListRepairApplications", request, token)
    applications = tuple(convert.repair(a) for a in response.applications)
    return r.Page(await _with_entries(backend, token, applications, REPAIR_REVIEW), response.next_page_token)


async def case_of(backend: Backend, token: str, entry_id: str, purpose: Purpose) -> Case:
    """An entry with its evidence, latest dispute and repair application."""
    request = query_pb.GetEntryRequest(entry_id=entry_id, purpose=purpose)
    response = await backend.call("query", "GetEntry", request, token)
    return Case(convert.entry(response.entry), response.entry.subject_key)


async def history(backend: Backend, token: str, case: Case, purpose: Purpose) -> tuple[r.ScoreChange, ...]:
    """The subject's latest score changes (as recorded), newest first: the view model picks
    those around the entry."""
    request = query_pb.ListScoreHistoryRequest(
        subject=_subject(case), page_size=HISTORY_PAGE, purpose=purpose
    )
    response = await backend.call("query", "ListScoreHistory", request, token)
    return tuple(convert.score_change(c) for c in response.changes)


async def score(backend: Backend, token: str, case: Case, purpose: Purpose) -> Score:
    request = query_pb.GetScoreRequest(subject=_subject(case), purpose=purpose)
    response = await backend.call("query", "GetScore", request, token)
    s = response.score
    return Score(s.score, s.tier, convert.when(s.as_of), s.policy_version)


async def resolve_dispute(
    backend: Backend, token: str, dispute_id: str, decision: str, reason: str
) -> r.Dispute:
    request = score_pb.ResolveDisputeRequest(
        dispute_id=dispute_id, decision=_DISPUTE_DECISIONS[decision], reason=reason
    )
    response = await backend.call("score", "ResolveDispute", request, token)
    return convert.dispute(response.dispute)


async def assign_dispute(backend: Backend, token: str, dispute_id: str, *, release: bool) -> r.Dispute:
    """The reviewer takes the dispute for itself, or releases the one it holds."""
    request = score_pb.AssignDisputeRequest(dispute_id=dispute_id, release=release)
    response = await backend.call("score", "AssignDispute", request, token)
    return convert.dispute(response.dispute)


async def decide_repair(
    backend: Backend, token: str, application_id: str, decision: str, reason: str
) -> r.Repair:
    request = score_pb.DecideRepairRequest(
        application_id=application_id, decision=_REPAIR_DECISIONS[decision], reason=reason
    )
    response = await backend.call("score", "DecideRepair", request, token)
    return convert.repair(response.application)


def _subject(case: Case) -> Any:
    return subject_pb2.SubjectRef(subject_key=case.subject_key)


DISPUTE_DECISIONS = tuple(_DISPUTE_DECISIONS)
REPAIR_DECISIONS = tuple(_REPAIR_DECISIONS)
