"""QueryService over gRPC: translates protobuf ⇄ domain; errors map to statuses in kit.

Every read naming a subject goes through the read pipeline (services.query.read_pipeline):
its subject key, the stated purpose, the per-datum check, then the read served together
with its access record. Reads of a subject's score also flag the entries under an undecided
dispute; entries read carry their dispute and repair application (docs/due-process.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from datetime import datetime
from typing import Any

import grpc

from contracts.due_process_wire import consent_message, dispute_message, repair_message
from egret.common.v1 import subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import InvalidArgument, NotFound
from kit.logging import get_logger
from kit.principal import Role, current_principal
from kit.protoconv import SUBJECT_KIND_NAMES, SUBJECT_KIND_VALUES, to_timestamp
from kit.purposes import StatedPurpose
from services.query.access import require_own_benefit, require_own_subject
from services.query.corrected import corrected_history
from services.query.domain import Reader
from services.query.explain import PositiveRule, explain
from services.query.messages import (
    DISPUTE_FILTER,
    REPAIR_FILTER,
    access_record_message,
    annotate_entry,
    assignee_filter,
    benefit_message,
    bound_filter,
    change_message,
    entry_message,
    explanation_message,
    optional_time,
    score_message,
    subject_named,
    subject_ref,
    timeline,
)
from services.query.paging import decode_token, page_size
from services.query.read_pipeline import ReadPipeline
from services.query.rules_client import RulesClient
from services.query.stores.access_log import ACCESS_LOG_PERIOD, SqlAccessLog
from services.query.stores.due_process import (
    ListFilter,
    SqlDueProcessReader,
    decode_key,
    dispute_page,
    id_filter,
    repair_page,
)
from services.query.subjects import SubjectRef, current_key

log = get_logger(__name__)


class QueryServicer(pb_grpc.QueryServiceServicer):
    """Every QueryService RPC, over the collaborators it is given."""

    def __init__(
        self,
        *,
        reader: Reader,
        due_process: SqlDueProcessReader,
        access_log: SqlAccessLog,
        reads: ReadPipeline,
        executor: Executor,
        rules: RulesClient | None = None,
        inline_reads: bool = False,
    ) -> None:
        self._reader = reader
        self._due = due_process
        self._access_log = access_log
        self._reads = reads
        self._executor = executor
        self._rules = rules
        # With a local store (SQLite), a current score is one point read of ~50 µs: cheaper
        # on the event loop than the hop to a worker thread and back, and free of the wait
        # for the GIL between the two. Anything more goes to the executor.
        self._inline_reads = inline_reads

    # --- shared by every subject read ----------------------------------------------------

    def _subject_read(self, request: Any, ref: subject_pb2.SubjectRef) -> tuple[str, StatedPurpose]:
        """The key of the one subject `request` reads and its stated purpose, once the caller
        is known to be allowed to read that subject (subjects see only their own data)."""
        key = self._reader.subject_key(subject_ref(ref))
        return key, self._allowed(request, ref, key)

    def _allowed(self, request: Any, ref: subject_pb2.SubjectRef, key: str) -> StatedPurpose:
        """The stated purpose, then the per-datum check: subjects see only their own data."""
        purpose = self._reads.purpose(request, ref)
        require_own_subject(current_principal(), key)
        return purpose

    async def _disputed(self, subject_keys: Sequence[str], at: datetime) -> dict[str, tuple[str, ...]]:
        if not subject_keys:
            return {}
        if (
            self._inline_reads
            and len(subject_keys) == 1
            and not self._due.has_undecided_dispute(subject_keys[0])
        ):
            # The common answer, from one prepared index probe on the loop (as the score read).
            return {}
        return await run_blocking(self._executor, self._due.open_disputed, subject_keys, at)

    async def _annotate(self, entries: Sequence[pb.LedgerEntry]) -> None:
        if not entries:
            return
        facts = await run_blocking(self._executor, self._due.facts_of, [e.entry_id for e in entries])
        now = self._reader.now()
        for message in entries:
            annotate_entry(message, facts.get(message.entry_id), now)

    # --- scores ----------------------------------------------------------------------------

    async def GetScore(self, request: pb.GetScoreRequest, context: Any) -> pb.GetScoreResponse:
        key, purpose = self._subject_read(request, request.subject)
        # The key found once: a raw id is not checked and hashed again by the read.
        ref, as_of = SubjectRef(subject_key=key), optional_time(request, "as_of")
        at = as_of or self._reader.now()
        if as_of is None and self._inline_reads:
            # The hot path (a current score from a local store): record, then read on the
            # loop; no task is spawned unless the subject has an undecided dispute.
            await self._reads.record("GetScore", [key], purpose)
            view = self._reader.current_score(ref)
            if view is None:  # an expiry passed, a policy changed, no row: recompute
                view = await run_blocking(self._executor, self._reader.score, ref, None)
            response = pb.GetScoreResponse(score=score_message(view))
            response.score.disputed_entry_ids.extend((await self._disputed([key], at)).get(key, ()))
            return response
        read = run_blocking(self._executor, self._reader.score, ref, as_of, timeline(request))
        found, disputed = await asyncio.gather(
            self._reads.serve("GetScore", [key], purpose, read), self._disputed([key], at)
        )
        response = pb.GetScoreResponse(score=score_message(found))
        response.score.disputed_entry_ids.extend(disputed.get(key, ()))
        return response

    async def BatchGetScores(
        self, request: pb.BatchGetScoresRequest, context: Any
    ) -> pb.BatchGetScoresResponse:
        refs = [subject_ref(s) for s in request.subjects]
        as_of = optional_time(request, "as_of")
        try:
            keys = [self._reader.subject_key(ref, f"subjects[{i}]") for i, ref in enumerate(refs)]
        except InvalidArgument:
            # The batch read lists every problem, the batch's size first.
            await run_blocking(self._executor, self._reader.batch, refs, as_of)
            raise
        purpose = self._reads.purpose(request, *request.subjects)
        at = as_of or self._reader.now()
        read = run_blocking(self._executor, self._reader.batch, refs, as_of, timeline(request))
        distinct = sorted(set(keys))
        views, disputed = await asyncio.gather(
            self._reads.serve("BatchGetScores", distinct, purpose, read), self._disputed(distinct, at)
        )
        results = []
        for key, found in zip(keys, views, strict=True):
            if found is None:
                results.append(pb.BatchScoreResult())
                continue
            score = score_message(found)
            score.disputed_entry_ids.extend(disputed.get(key, ()))
            results.append(pb.BatchScoreResult(found=True, score=score))
        return pb.BatchGetScoresResponse(results=results)

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
        key, purpose = self._subject_read(request, request.subject)
        if request.as_corrected:
            read: Awaitable[pb.ListScoreHistoryResponse] = self._corrected_history(request, key)
        else:
            read = self._history(request, key)
        return await self._reads.serve("ListScoreHistory", [key], purpose, read)

    async def _history(self, request: pb.ListScoreHistoryRequest, key: str) -> pb.ListScoreHistoryResponse:
        page = await run_blocking(
            self._executor,
            self._reader.history,
            SubjectRef(subject_key=key),
            request.page_size,
            request.page_token,
        )
        return pb.ListScoreHistoryResponse(
            changes=[change_message(c) for c in page.changes], next_page_token=page.next_page_token
        )

    async def _corrected_history(
        self, request: pb.ListScoreHistoryRequest, key: str
    ) -> pb.ListScoreHistoryResponse:
        size = page_size(request.page_size)
        binding = {"method": "ListScoreHistory", "subject_key": current_key(key), "as_corrected": True}
        before = decode_token(self._reader.tokens, request.page_token, int, bound_to=binding)
        facts = await run_blocking(self._executor, self._due.facts, key)
        if not facts:
            raise NotFound("no score is held for this subject")
        kind = facts[0].entry.subject_kind
        now = self._reader.now()
        book = self._reader.policies()
        self._reader.require_consent(book.at(now).for_kind(kind), key, now)
        rows = corrected_history([f.scored for f in facts], book, kind, now)
        newest = [r for r in reversed(rows) if before is None or r.history_id < before]
        page = newest[:size]
        return pb.ListScoreHistoryResponse(
            changes=[change_message(c) for c in page],
            next_page_token=(
                self._reader.tokens.encode(page[-1].history_id, bound_to=binding)
                if len(newest) > size
                else ""
            ),
        )

    # --- eligibility and benefits ----------------------------------------------------------

    async def CheckEligibility(
        self, request: pb.CheckEligibilityRequest, context: Any
    ) -> pb.CheckEligibilityResponse:
        try:
            key = self._reader.subject_key(subject_ref(request.subject))
        except InvalidArgument:
            return await self._eligibility(request)  # every problem listed
        purpose = self._allowed(request, request.subject, key)
        at = optional_time(request, "as_of") or self._reader.now()
        response, disputed = await asyncio.gather(
            self._reads.serve("CheckEligibility", [key], purpose, self._eligibility(request, key)),
            self._disputed([key], at),
        )
        open_ids = set(disputed.get(key, ()))
        for reason in response.reasons:
            reason.disputed_entry_ids.extend(e for e in reason.entry_ids if e in open_ids)
        return response

    async def _eligibility(
        self, request: pb.CheckEligibilityRequest, key: str | None = None
    ) -> pb.CheckEligibilityResponse:
        """`key`: the subject's key when already found (None: the request's ref, whose
        problems the read lists)."""
        ref = subject_ref(request.subject) if key is None else SubjectRef(subject_key=key)
        principal = current_principal()
        if principal is not None and principal.role is Role.SUBJECT:
            require_own_subject(principal, self._reader.subject_key(ref))
        provider_id = self._reader.benefit_provider(request.benefit_id)
        if provider_id is not None:
            require_own_benefit(principal, provider_id)
        view = await run_blocking(
            self._executor,
            self._reader.eligibility,
            ref,
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

    # --- ledger entries --------------------------------------------------------------------

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Any) -> pb.ListEntriesResponse:
        key, purpose = self._subject_read(request, request.subject)
        response = await self._reads.serve("ListEntries", [key], purpose, self._entries(request))
        await self._annotate(response.entries)
        return response

    async def _entries(self, request: pb.ListEntriesRequest) -> pb.ListEntriesResponse:
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
        purpose = self._reads.purpose(request)
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
        response = pb.GetEntryResponse(entry=entry_message(entry, with_evidence=True, now=self._reader.now()))
        await self._annotate([response.entry])
        # Whose entry it is is known only once it is read.
        await self._reads.record("GetEntry", [response.entry.subject_key], purpose)
        return response

    # --- due process -----------------------------------------------------------------------

    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.ExplainResponse:
        key, purpose = self._subject_read(request, request.subject)
        now = self._reader.now()
        # Served only where a score is: NOT_FOUND for no entries, FAILED_PRECONDITION without consent.
        view = await run_blocking(self._executor, self._reader.score, SubjectRef(subject_key=key), None)
        facts = await run_blocking(self._executor, self._due.facts, key)
        kind = view.score.subject_kind
        active = self._reader.policies().at(now)
        rules: Sequence[PositiveRule] | None = None
        if self._rules is not None:
            rules = await self._rules.positive_rules()
        explanation = explain(
            subject_key=key,
            subject_kind=kind,
            facts=facts,
            policy=active.for_kind(kind),
            due_process=active.due_process,
            now=now,
            positive_rules=rules or (),
        )
        await self._reads.record("Explain", [key], purpose)
        return pb.ExplainResponse(explanation=explanation_message(explanation))

    def _list_filter(
        self, request: Any, status: str | None, overdue_only: bool
    ) -> tuple[ListFilter, StatedPurpose]:
        """The filter of a due-process list and its stated purpose. A subject lists only its
        own: the filter is forced to its key (named, or its token's: an unset ref names the
        subject caller itself, found as a raw id is)."""
        ref = request.subject
        principal = current_principal()
        subject = principal is not None and principal.role is Role.SUBJECT
        if subject or subject_named(ref):
            key, purpose = self._subject_read(request, ref)
        else:
            key, purpose = None, self._reads.purpose(request, ref)
        return ListFilter(status=status, subject_key=key, overdue_only=overdue_only), purpose

    async def _record_listed(
        self, method: str, where: ListFilter, keys: Sequence[str], purpose: StatedPurpose
    ) -> None:
        listed = [where.subject_key] if where.subject_key is not None else sorted(set(keys))
        await self._reads.record(method, listed, purpose)

    async def ListDisputes(self, request: pb.ListDisputesRequest, context: Any) -> pb.ListDisputesResponse:
        status = DISPUTE_FILTER.get(request.status) if request.status else None
        where, purpose = self._list_filter(request, status, request.overdue_only)
        where = replace(
            where,
            department=request.department or None,
            category=request.category or None,
            assignee=assignee_filter(request),
            unassigned_only=request.unassigned_only,
            ids=id_filter(request.dispute_ids, "dispute_ids"),
        )
        size = page_size(request.page_size)
        binding = {"method": "ListDisputes", "where": bound_filter(where)}
        after = decode_key(self._reader.tokens, request.page_token, bound_to=binding)
        now = self._reader.now()
        rows = await run_blocking(self._executor, self._due.disputes, where, now, after, size + 1)
        page = dispute_page(rows, size, self._reader.tokens, bound_to=binding)
        await self._record_listed("ListDisputes", where, [d.subject_key for d in page.disputes], purpose)
        return pb.ListDisputesResponse(
            disputes=[dispute_message(d, now) for d in page.disputes], next_page_token=page.next_page_token
        )

    async def ListRepairApplications(
        self, request: pb.ListRepairApplicationsRequest, context: Any
    ) -> pb.ListRepairApplicationsResponse:
        status = REPAIR_FILTER.get(request.status) if request.status else None
        where, purpose = self._list_filter(request, status, request.overdue_only)
        where = replace(where, ids=id_filter(request.application_ids, "application_ids"))
        size = page_size(request.page_size)
        binding = {"method": "ListRepairApplications", "where": bound_filter(where)}
        after = decode_key(self._reader.tokens, request.page_token, bound_to=binding)
        now = self._reader.now()
        rows = await run_blocking(self._executor, self._due.repairs, where, now, after, size + 1)
        page = repair_page(rows, size, self._reader.tokens, bound_to=binding)
        await self._record_listed(
            "ListRepairApplications", where, [r.subject_key for r in page.applications], purpose
        )
        return pb.ListRepairApplicationsResponse(
            applications=[repair_message(r, now) for r in page.applications],
            next_page_token=page.next_page_token,
        )

    async def GetConsent(self, request: pb.GetConsentRequest, context: Any) -> pb.GetConsentResponse:
        key, purpose = self._subject_read(request, request.subject)
        read = run_blocking(
            self._executor,
            self._reader.consent,
            subject_ref(request.subject),
            optional_time(request, "as_of"),
        )
        view = await self._reads.serve("GetConsent", [key], purpose, read)
        response = pb.GetConsentResponse(
            granted=view.granted,
            consent_required=view.required,
            as_of=to_timestamp(view.as_of),
            policy_version=view.policy_version,
        )
        if view.consent is not None:
            response.consent.CopyFrom(consent_message(view.consent))
        return response

    async def ListAccessLog(self, request: pb.ListAccessLogRequest, context: Any) -> pb.ListAccessLogResponse:
        key, purpose = self._subject_read(request, request.subject)
        size = page_size(request.page_size)
        binding = {"method": "ListAccessLog", "subject_key": current_key(key)}
        before = decode_token(self._reader.tokens, request.page_token, int, bound_to=binding)
        # Recorded first: this read is part of the log it shows.
        await self._reads.record("ListAccessLog", [key], purpose)
        since = self._reads.now() - ACCESS_LOG_PERIOD
        # Named by raw id, the subject's records are found under every generation's key.
        keys = self._reader.recorded_keys(subject_ref(request.subject))
        rows = await run_blocking(self._executor, self._access_log.page, keys, since, before, size + 1)
        page = rows[:size]
        return pb.ListAccessLogResponse(
            records=[access_record_message(r) for r in page],
            next_page_token=self._reader.tokens.encode(page[-1].seq, bound_to=binding)
            if len(rows) > size
            else "",
        )


def register(servicer: QueryServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_QueryServiceServicer_to_server(servicer, server)
