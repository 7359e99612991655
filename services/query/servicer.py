"""QueryService over gRPC: translates protobuf ⇄ domain; errors map to statuses in kit."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import grpc

from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.protoconv import SEVERITY_VALUES, SUBJECT_KIND_NAMES, SUBJECT_KIND_VALUES, to_timestamp
from services.query.domain import RawSubject, Reader, ScoreView, SubjectRef
from services.score.domain import EntryStatus, LedgerEntry

_STATUS = {
    EntryStatus.ACTIVE: pb.ENTRY_STATUS_ACTIVE,
    EntryStatus.DISPUTED: pb.ENTRY_STATUS_DISPUTED,
    EntryStatus.REVERSED: pb.ENTRY_STATUS_REVERSED,
    EntryStatus.REPAIRED: pb.ENTRY_STATUS_REPAIRED,
    EntryStatus.EXPIRED: pb.ENTRY_STATUS_EXPIRED,
}


def subject_ref(ref: subject_pb2.SubjectRef) -> SubjectRef:
    which = ref.WhichOneof("ref")
    if which == "subject_key":
        return SubjectRef(subject_key=ref.subject_key)
    if which == "subject":
        raw = ref.subject
        return SubjectRef(subject=RawSubject(SUBJECT_KIND_NAMES.get(raw.kind), raw.id_scheme, raw.id_value))
    return SubjectRef()


def score_message(view: ScoreView) -> pb.Score:
    s = view.score
    return pb.Score(
        subject_key=s.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[s.subject_kind],
        score=s.score,
        tier=s.tier,
        categories=[
            pb.CategoryScore(category=c.category, points=c.points, entry_count=c.entry_count)
            for c in s.categories
        ],
        as_of=to_timestamp(s.as_of),
        policy_version=s.policy_version,
        base_score=view.base_score,
        entry_count=s.entry_count,
    )


def entry_message(entry: LedgerEntry, *, with_evidence: bool) -> pb.LedgerEntry:
    outcome = outcome_pb2.Outcome.FromString(entry.snapshot)
    rule = entry.rule
    return pb.LedgerEntry(
        entry_id=entry.entry_id,
        subject_key=entry.subject_key,
        rule=outcome_pb2.RuleRef(
            rule_id=rule.rule_id,
            rule_set=rule.rule_set,
            rule_set_version=rule.rule_set_version,
            title=rule.title,
            description=rule.description,
            legal_basis=rule.legal_basis,
        ),
        points=entry.points,
        category=entry.category,
        severity=SEVERITY_VALUES[entry.severity],
        status=_STATUS[entry.status],
        occurred_at=to_timestamp(entry.occurred_at),
        recorded_at=to_timestamp(entry.recorded_at),
        visible_until=to_timestamp(entry.visible_until),
        reason=entry.reason,
        black_list=entry.black_list,
        evidence=outcome.events if with_evidence else [],
        event_refs=[e.ref for e in outcome.events],
    )


class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(self, reader: Reader, executor: Executor) -> None:
        self._reader = reader
        self._executor = executor

    async def GetScore(self, request: pb.GetScoreRequest, context: Any) -> pb.GetScoreResponse:
        view = await run_blocking(self._executor, self._reader.score, subject_ref(request.subject))
        return pb.GetScoreResponse(score=score_message(view))

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Any) -> pb.ListEntriesResponse:
        page = await run_blocking(
            self._executor,
            self._reader.entries,
            subject_ref(request.subject),
            request.page_size,
            request.page_token,
        )
        return pb.ListEntriesResponse(
            entries=[entry_message(e, with_evidence=False) for e in page.entries],
            next_page_token=page.next_page_token,
        )

    async def GetEntry(self, request: pb.GetEntryRequest, context: Any) -> pb.GetEntryResponse:
        entry = await run_blocking(self._executor, self._reader.entry, request.entry_id)
        return pb.GetEntryResponse(entry=entry_message(entry, with_evidence=True))


def register(servicer: QueryServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_QueryServiceServicer_to_server(servicer, server)
