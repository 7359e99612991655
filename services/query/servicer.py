"""QueryService over gRPC: translates protobuf ⇄ domain; errors map to statuses in kit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from datetime import datetime
from typing import Any

import grpc

from domain.benefits import Benefit
from domain.entries import CORRECTION, DISPUTE, REPAIR, EntryStatus, LedgerEntry
from domain.history import ENTRIES, EXPIRY, POLICY
from domain.scoring import CategoryScore, ListMembership
from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import NotFound
from kit.logging import get_logger
from kit.principal import Role, current_principal
from kit.protoconv import SEVERITY_VALUES, SUBJECT_KIND_NAMES, SUBJECT_KIND_VALUES, to_datetime, to_timestamp
from services.query.access import require_own_benefit, require_own_subject
from services.query.domain import HistoryRow, RawSubject, Reader, ScoreView, SubjectRef

_STATUS = {
    EntryStatus.ACTIVE: pb.ENTRY_STATUS_ACTIVE,
    EntryStatus.DISPUTED: pb.ENTRY_STATUS_DISPUTED,
    EntryStatus.REVERSED: pb.ENTRY_STATUS_REVERSED,
    EntryStatus.REPAIRED: pb.ENTRY_STATUS_REPAIRED,
    EntryStatus.EXPIRED: pb.ENTRY_STATUS_EXPIRED,
}


log = get_logger(__name__)


def subject_ref(ref: subject_pb2.SubjectRef) -> SubjectRef:
    """The domain form of a request's SubjectRef. Unset, it names the caller when the caller
    is a subject (its token's keys); for anyone else it stays unset, and the read refuses it
    (INVALID_ARGUMENT, REQUIRED)."""
    which = ref.WhichOneof("ref")
    if which == "subject_key":
        return SubjectRef(subject_key=ref.subject_key)
    if which == "subject":
        raw = ref.subject
        return SubjectRef(subject=RawSubject(SUBJECT_KIND_NAMES.get(raw.kind), raw.id_scheme, raw.id_value))
    principal = current_principal()
    if principal is not None and principal.role is Role.SUBJECT and principal.subject_key:
        return SubjectRef(own=principal.generation_keys or (("", principal.subject_key),))
    return SubjectRef()


def category_messages(categories: Iterable[CategoryScore]) -> list[pb.CategoryScore]:
    return [
        pb.CategoryScore(
            category=c.category, points=c.points, entry_count=c.entry_count, capped_points=c.capped
        )
        for c in categories
    ]


def list_messages(lists: Iterable[ListMembership]) -> list[pb.ListMembership]:
    return [pb.ListMembership(list_name=m.name, reasons=m.reasons, entry_ids=m.entry_ids) for m in lists]


def score_message(view: ScoreView) -> pb.Score:
    s = view.score
    return pb.Score(
        subject_key=s.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[s.subject_kind],
        score=s.score,
        tier=s.tier,
        categories=category_messages(s.categories),
        lists=list_messages(s.lists),
        as_of=to_timestamp(s.as_of),
        policy_version=s.policy_version,
        base_score=view.base_score,
        entry_count=s.entry_count,
    )


def optional_time(message: Any, name: str) -> datetime | None:
    return to_datetime(getattr(message, name)) if message.HasField(name) else None


_CAUSES = {
    ENTRIES: pb.CHANGE_CAUSE_ENTRIES,
    EXPIRY: pb.CHANGE_CAUSE_EXPIRY,
    POLICY: pb.CHANGE_CAUSE_POLICY,
    CORRECTION: pb.CHANGE_CAUSE_CORRECTION,
    DISPUTE: pb.CHANGE_CAUSE_DISPUTE,
    REPAIR: pb.CHANGE_CAUSE_REPAIR,
}


def change_message(row: HistoryRow) -> pb.ScoreChange:
    change = pb.ScoreChange(
        changed_at=to_timestamp(row.changed_at),
        cause=_CAUSES.get(row.cause, pb.CHANGE_CAUSE_UNSPECIFIED),
        score=row.score,
        tier_before=row.tier_before,
        tier=row.tier,
        lists_before=row.lists_before,
        lists=row.lists,
        added_entry_ids=row.added_entry_ids,
        expired_entry_ids=row.expired_entry_ids,
        ended_entry_ids=row.ended_entry_ids,
        resumed_entry_ids=row.resumed_entry_ids,
        note=row.note,
        policy_version=row.policy_version,
        recorded_at=to_timestamp(row.recorded_at),
    )
    if row.score_before is not None:
        change.score_before = row.score_before
    return change


def benefit_message(benefit: Benefit) -> pb.Benefit:
    return pb.Benefit(
        benefit_id=benefit.benefit_id,
        purpose=benefit.purpose,
        provider=benefit.provider,
        considers=sorted(benefit.considers or ()),
        considers_all=benefit.considers is None,
        subject_kinds=[SUBJECT_KIND_VALUES[k] for k in benefit.subject_kinds],
        condition=benefit.condition.describe(),
        provider_id=benefit.provider_id,
    )


def now_or_expired(entry: LedgerEntry, now: datetime) -> EntryStatus:
    # Expiry is not stored: an active entry past its visible_until reads as expired.
    if entry.status is EntryStatus.ACTIVE and entry.visible_until <= now:
        return EntryStatus.EXPIRED
    return entry.status


def entry_message(entry: LedgerEntry, *, with_evidence: bool, now: datetime) -> pb.LedgerEntry:
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
        status=_STATUS[now_or_expired(entry, now)],
        occurred_at=to_timestamp(entry.occurred_at),
        recorded_at=to_timestamp(entry.recorded_at),
        visible_until=to_timestamp(entry.visible_until),
        reason=entry.reason,
        black_list=entry.black_list,
        evidence=outcome.events if with_evidence else [],
        event_refs=[e.ref for e in outcome.events],
    )


class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(self, reader: Reader, executor: Executor, *, inline_reads: bool = False) -> None:
        self._reader = reader
        self._executor = executor
        # With a local store (SQLite), a current score is one point read of ~50 µs: cheaper
        # on the event loop than the hop to a worker thread and back, and free of the wait
        # for the GIL between the two. Anything more goes to the executor.
        self._inline_reads = inline_reads

    def _own(self, ref: Any) -> None:
        """Per-datum check before any read: subjects see only their own data."""
        principal = current_principal()
        if principal is not None and principal.role is Role.SUBJECT:
            require_own_subject(principal, self._reader.subject_key(subject_ref(ref)))

    async def GetScore(self, request: pb.GetScoreRequest, context: Any) -> pb.GetScoreResponse:
        self._own(request.subject)
        ref, as_of = subject_ref(request.subject), optional_time(request, "as_of")
        view = self._reader.current_score(ref) if self._inline_reads and as_of is None else None
        if view is None:
            view = await run_blocking(self._executor, self._reader.score, ref, as_of)
        return pb.GetScoreResponse(score=score_message(view))

    async def BatchGetScores(
        self, request: pb.BatchGetScoresRequest, context: Any
    ) -> pb.BatchGetScoresResponse:
        views = await run_blocking(
            self._executor,
            self._reader.batch,
            [subject_ref(s) for s in request.subjects],
            optional_time(request, "as_of"),
        )
        return pb.BatchGetScoresResponse(
            results=[
                pb.BatchScoreResult(found=True, score=score_message(v)) if v else pb.BatchScoreResult()
                for v in views
            ]
        )

    async def GetTierDistribution(
        self, request: pb.GetTierDistributionRequest, context: Any
    ) -> pb.GetTierDistributionResponse:
        kind = SUBJECT_KIND_NAMES.get(request.subject_kind)
        d = await run_blocking(self._executor, self._reader.distribution, kind)
        return pb.GetTierDistributionResponse(
            by_kind=[
                pb.TierCount(subject_kind=SUBJECT_KIND_VALUES[k], tier=t, subjects=n)
                for (k, t), n in sorted(d.by_kind.items())
            ],
            by_category=[
                pb.CategoryTierCount(category=c, subject_kind=SUBJECT_KIND_VALUES[k], tier=t, subjects=n)
                for (c, k, t), n in sorted(d.by_category.items())
            ],
            lists=[
                pb.ListCount(subject_kind=SUBJECT_KIND_VALUES[k], list_name=name, subjects=n)
                for (k, name), n in sorted(d.lists.items())
            ],
        )

    async def ListScoreHistory(
        self, request: pb.ListScoreHistoryRequest, context: Any
    ) -> pb.ListScoreHistoryResponse:
        self._own(request.subject)
        page = await run_blocking(
            self._executor,
            self._reader.history,
            subject_ref(request.subject),
            request.page_size,
            request.page_token,
        )
        return pb.ListScoreHistoryResponse(
            changes=[change_message(c) for c in page.changes], next_page_token=page.next_page_token
        )

    async def CheckEligibility(
        self, request: pb.CheckEligibilityRequest, context: Any
    ) -> pb.CheckEligibilityResponse:
        self._own(request.subject)
        principal = current_principal()
        provider_id = self._reader.benefit_provider(request.benefit_id)
        if provider_id is not None:
            require_own_benefit(principal, provider_id)
        view = await run_blocking(
            self._executor,
            self._reader.eligibility,
            subject_ref(request.subject),
            request.benefit_id,
            optional_time(request, "as_of"),
        )
        log.info(
            "eligibility checked",
            benefit_id=request.benefit_id,
            caller=principal.loggable_id if principal else "insecure",
            eligible=view.eligibility.eligible,
        )
        result = view.eligibility
        return pb.CheckEligibilityResponse(
            eligible=result.eligible,
            reasons=[
                pb.EligibilityReason(
                    path=r.path,
                    condition=r.condition,
                    met=r.met,
                    explanation=r.explanation,
                    entry_ids=r.entry_ids,
                )
                for r in result.reasons
            ],
            purpose_bound_score=pb.PurposeBoundScore(
                considers=sorted(view.benefit.considers or ()),
                score=result.score.score,
                tier=result.score.tier,
                lists=[m.name for m in result.score.lists],
            ),
            as_of=to_timestamp(view.as_of),
            policy_version=view.policy_version,
        )

    async def ListBenefits(self, request: pb.ListBenefitsRequest, context: Any) -> pb.ListBenefitsResponse:
        page = self._reader.benefits(request.page_size, request.page_token)
        return pb.ListBenefitsResponse(
            benefits=[benefit_message(b) for b in page.benefits], next_page_token=page.next_page_token
        )

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Any) -> pb.ListEntriesResponse:
        self._own(request.subject)
        page = await run_blocking(
            self._executor,
            self._reader.entries,
            subject_ref(request.subject),
            request.page_size,
            request.page_token,
        )
        return pb.ListEntriesResponse(
            entries=[entry_message(e, with_evidence=False, now=self._reader.now()) for e in page.entries],
            next_page_token=page.next_page_token,
        )

    async def GetEntry(self, request: pb.GetEntryRequest, context: Any) -> pb.GetEntryResponse:
        entry = await run_blocking(self._executor, self._reader.entry, request.entry_id)
        principal = current_principal()
        if (
            principal is not None
            and principal.role is Role.SUBJECT
            and not self._reader.same_subject(entry.subject_key, principal.subject_key)
        ):
            # Entry ids are deterministic: answering otherwise than for an unknown id would
            # tell a stranger that the entry exists.
            raise NotFound(f"no ledger entry {request.entry_id!r}")
        return pb.GetEntryResponse(entry=entry_message(entry, with_evidence=True, now=self._reader.now()))


def register(servicer: QueryServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_QueryServiceServicer_to_server(servicer, server)
