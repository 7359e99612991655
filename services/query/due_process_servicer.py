"""QueryService with due process: the reads of QueryServicer plus what every subject
read now shares (the stated purpose, the access record committed before the answer is
sent, the disputed flags, entries' dispute and repair), and the due-process RPCs
(Explain, ListDisputes, ListRepairApplications, ListAccessLog).

Every read naming a subject is recorded once per subject, as `read:<Method>`, with the
principal, role and stated purpose (kit.audit.record), in query's own hash-chained log
(services.query.access_log). The record is committed before the response leaves: a read
whose record cannot be written fails with UNAVAILABLE (record-then-serve).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any, TypeVar

from contracts.due_process_wire import (
    DISPUTE_STATUSES,
    REPAIR_STATUSES,
    consent_message,
    dispute_message,
    repair_message,
)
from domain.entries import EntryFacts, EntryStatus, View
from egret.common.v1 import subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from kit import audit
from kit.auth import Role, current_principal
from kit.db import run_blocking
from kit.errors import InvalidArgument, NotFound, Unavailable, Violation
from kit.logging import get_logger
from kit.protoconv import SUBJECT_KIND_VALUES, to_datetime, to_timestamp
from kit.purposes import Purposes, StatedPurpose
from services.query import metrics
from services.query.access import require_own_subject
from services.query.access_log import (
    ACCESS_LOG_PERIOD,
    READ_PREFIX,
    AccessEntry,
    AccessRecorder,
    SqlAccessLog,
)
from services.query.corrected import corrected_history
from services.query.domain import (
    Reader,
    SubjectKey,
    SubjectRef,
    current_key,
    decode_token,
    page_size,
)
from services.query.due_process import (
    ListFilter,
    SqlDueProcessReader,
    decode_key,
    dispute_page,
    id_filter,
    repair_page,
)
from services.query.explain import Explanation, PositiveRule, explain, shown_status
from services.query.rules_client import RulesClient
from services.query.servicer import (
    QueryServicer,
    category_messages,
    change_message,
    entry_message,
    list_messages,
    score_message,
    subject_ref,
)

log = get_logger(__name__)
T = TypeVar("T")

_STATUS = {
    EntryStatus.ACTIVE: pb.ENTRY_STATUS_ACTIVE,
    EntryStatus.DISPUTED: pb.ENTRY_STATUS_DISPUTED,
    EntryStatus.REVERSED: pb.ENTRY_STATUS_REVERSED,
    EntryStatus.REPAIRED: pb.ENTRY_STATUS_REPAIRED,
    EntryStatus.EXPIRED: pb.ENTRY_STATUS_EXPIRED,
}
_DISPUTE_FILTER = {value: name for name, value in DISPUTE_STATUSES.items()}
_REPAIR_FILTER = {value: name for name, value in REPAIR_STATUSES.items()}


@dataclass(frozen=True)
class DueProcessDeps:
    """What the due-process reads need beyond the score reader."""

    recorder: AccessRecorder
    access_log: SqlAccessLog
    due: SqlDueProcessReader
    purposes: Purposes
    rules: RulesClient | None = None


def _subject_named(ref: subject_pb2.SubjectRef) -> bool:
    return ref.WhichOneof("ref") is not None


def _identifiers(refs: Iterable[subject_pb2.SubjectRef]) -> list[str]:
    """The identifiers the requests names, which its purpose note must not repeat."""
    named = (r.subject.id_value if r.WhichOneof("ref") == "subject" else r.subject_key for r in refs)
    return [identifier for identifier in named if identifier]


def annotate_entry(message: pb.LedgerEntry, facts: EntryFacts | None, now: datetime) -> pb.LedgerEntry:
    """Sets the due-process fields of an entry read: status as of `now`, why it does not
    count, its latest dispute and repair application."""
    if facts is None:
        return message
    status, reason = shown_status(facts, now)
    message.status = _STATUS[status]
    message.status_reason = reason
    if facts.disputes:
        message.dispute.CopyFrom(dispute_message(facts.disputes[-1], now))
    if facts.repairs:
        message.repair.CopyFrom(repair_message(facts.repairs[-1], now))
    return message


class DueProcessQueryServicer(QueryServicer):
    """QueryServicer with access records, purposes, disputed flags and the due-process RPCs."""

    def __init__(
        self, reader: Reader, executor: Executor, due_process: DueProcessDeps | None = None, **options: Any
    ) -> None:
        super().__init__(reader, executor, **options)
        self._reader = reader
        self._executor = executor
        self._due_process = due_process

    # --- shared by every subject read ---------------------------------------------------

    def _purpose(self, request: Any, *subjects: subject_pb2.SubjectRef) -> StatedPurpose:
        """The request's purpose code and note, checked before any read (INVALID_ARGUMENT
        naming the field): a configured code the caller's role may state, required from
        all but a subject reading its own data, and a short note naming no identifier."""
        return self._deps().purposes.check(
            current_principal(), request.purpose, request.purpose_note, identifiers=_identifiers(subjects)
        )

    async def _record_reads(
        self, method: str, subject_keys: Sequence[str | None], purpose: StatedPurpose
    ) -> None:
        """Commit one access record per subject before the answer is sent; a record that
        cannot be written fails the read with UNAVAILABLE.

        A record names the subject by its current generation's key when query derived the
        key (from a raw id or the subject's token; also while score still holds the subject
        under the previous one), with that generation. A key given by the caller or read from
        score's rows is recorded as it is, its generation unknown (NULL): ListAccessLog
        matches keys, not generations (services.query.access_log)."""
        deps = self._due_process
        if deps is None or not subject_keys:
            return
        metrics.read(method, purpose.code)
        at = deps.recorder.now()
        generation = self._reader.current_key_id
        records = [
            audit.record(
                READ_PREFIX + method,
                at,
                subject_key=None if key is None else current_key(key),
                purpose=purpose.code,
                target="" if key is None else current_key(key),
                detail=purpose.detail(),
                subject_key_id=generation if isinstance(key, SubjectKey) else None,
            )
            for key in subject_keys
        ]
        try:
            await deps.recorder.record(records)
        except Exception as exc:  # whatever the store raised: the read must not be served
            raise Unavailable("the access log cannot be written; the read was not served") from exc

    async def _disputed(self, subject_keys: Sequence[str], at: datetime) -> dict[str, tuple[str, ...]]:
        deps = self._due_process
        if deps is None or not subject_keys:
            return {}
        if (
            self._inline_reads
            and len(subject_keys) == 1
            and not deps.due.has_undecided_dispute(subject_keys[0])
        ):
            # The common answer, from one prepared index probe on the loop (as the score read).
            return {}
        return await run_blocking(self._executor, deps.due.open_disputed, subject_keys, at)

    def _deps(self) -> DueProcessDeps:
        if self._due_process is None:
            raise Unavailable("due-process reads are not configured")
        return self._due_process

    def _own_key(self, ref: subject_pb2.SubjectRef) -> str:
        key = self._reader.subject_key(subject_ref(ref))
        require_own_subject(current_principal(), key)
        return key

    async def _serve(self, method: str, keys: Sequence[str], purpose: StatedPurpose, read: Awaitable[T]) -> T:
        """Run the read and commit its access records together: the answer leaves only
        once both succeeded (the read's own error first, else UNAVAILABLE for the log)."""
        answer, recorded = await asyncio.gather(
            read, self._record_reads(method, keys, purpose), return_exceptions=True
        )
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(recorded, BaseException):
            raise recorded
        return answer

    # --- the reads of QueryServicer, with purpose, access records and disputed flags -------

    async def GetScore(self, request: pb.GetScoreRequest, context: Any) -> pb.GetScoreResponse:
        ref = subject_ref(request.subject)
        key = self._reader.subject_key(ref)
        purpose = self._purpose(request, request.subject)
        self._own(request.subject)
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        at = as_of or self._reader.now()
        if as_of is None and self._inline_reads:
            # The hot path (a current score from a local store): record, then read on the
            # loop; no task is spawned unless the subject has an undecided dispute.
            await self._record_reads("GetScore", [key], purpose)
            view = self._reader.current_score(ref)
            if view is None:  # an expiry passed, a policy changed, no row: recompute
                view = await run_blocking(self._executor, self._reader.score, ref, None)
            response = pb.GetScoreResponse(score=score_message(view))
            response.score.disputed_entry_ids.extend((await self._disputed([key], at)).get(key, ()))
            return response
        if request.view == pb.SCORE_VIEW_AS_CORRECTED and as_of is not None:
            read: Awaitable[Any] = run_blocking(
                self._executor, self._reader.score, ref, as_of, View.AS_CORRECTED
            )
        else:
            read = super().GetScore(request, context)
        answer, disputed = await asyncio.gather(
            self._serve("GetScore", [key], purpose, read), self._disputed([key], at)
        )
        response = (
            answer
            if isinstance(answer, pb.GetScoreResponse)
            else pb.GetScoreResponse(score=score_message(answer))
        )
        response.score.disputed_entry_ids.extend(disputed.get(key, ()))
        return response

    async def BatchGetScores(
        self, request: pb.BatchGetScoresRequest, context: Any
    ) -> pb.BatchGetScoresResponse:
        try:
            keys = [
                self._reader.subject_key(subject_ref(s), f"subjects[{i}]")
                for i, s in enumerate(request.subjects)
            ]
        except InvalidArgument:
            return await super().BatchGetScores(request, context)  # raises with every problem listed
        purpose = self._purpose(request, *request.subjects)
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        at = as_of or self._reader.now()
        view = (
            View.AS_CORRECTED
            if request.view == pb.SCORE_VIEW_AS_CORRECTED and as_of is not None
            else View.AS_KNOWN
        )
        refs = [subject_ref(s) for s in request.subjects]
        read = run_blocking(self._executor, self._reader.batch, refs, as_of, view)
        distinct = sorted(set(keys))
        views, disputed = await asyncio.gather(
            self._serve("BatchGetScores", distinct, purpose, read), self._disputed(distinct, at)
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

    async def ListScoreHistory(
        self, request: pb.ListScoreHistoryRequest, context: Any
    ) -> pb.ListScoreHistoryResponse:
        ref = subject_ref(request.subject)
        key = self._reader.subject_key(ref)
        purpose = self._purpose(request, request.subject)
        self._own(request.subject)
        if request.as_corrected:
            read: Awaitable[pb.ListScoreHistoryResponse] = self._corrected_history(request, key)
        else:
            read = super().ListScoreHistory(request, context)
        return await self._serve("ListScoreHistory", [key], purpose, read)

    async def _corrected_history(
        self, request: pb.ListScoreHistoryRequest, key: str
    ) -> pb.ListScoreHistoryResponse:
        deps = self._deps()
        size = page_size(request.page_size)
        binding = {"method": "ListScoreHistory", "subject_key": current_key(key), "as_corrected": True}
        before = decode_token(self._reader.tokens, request.page_token, int, bound_to=binding)
        facts = await run_blocking(self._executor, deps.due.facts, key)
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

    async def CheckEligibility(
        self, request: pb.CheckEligibilityRequest, context: Any
    ) -> pb.CheckEligibilityResponse:
        ref = subject_ref(request.subject)
        try:
            key = self._reader.subject_key(ref)
        except InvalidArgument:
            return await super().CheckEligibility(request, context)  # every problem listed
        purpose = self._purpose(request, request.subject)
        self._own(request.subject)
        at = to_datetime(request.as_of) if request.HasField("as_of") else self._reader.now()
        response, disputed = await asyncio.gather(
            self._serve("CheckEligibility", [key], purpose, super().CheckEligibility(request, context)),
            self._disputed([key], at),
        )
        open_ids = set(disputed.get(key, ()))
        for reason in response.reasons:
            reason.disputed_entry_ids.extend(e for e in reason.entry_ids if e in open_ids)
        return response

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Any) -> pb.ListEntriesResponse:
        key = self._reader.subject_key(subject_ref(request.subject))
        purpose = self._purpose(request, request.subject)
        self._own(request.subject)
        response = await self._serve("ListEntries", [key], purpose, super().ListEntries(request, context))
        await self._annotate(response.entries)
        return response

    async def GetEntry(self, request: pb.GetEntryRequest, context: Any) -> pb.GetEntryResponse:
        purpose = self._purpose(request)
        response = await super().GetEntry(request, context)  # NOT_FOUND first, for a stranger too
        await self._annotate([response.entry])
        await self._record_reads("GetEntry", [response.entry.subject_key], purpose)
        return response

    async def _annotate(self, entries: Sequence[pb.LedgerEntry]) -> None:
        deps = self._due_process
        if deps is None or not entries:
            return
        facts = await run_blocking(self._executor, deps.due.facts_of, [e.entry_id for e in entries])
        now = self._reader.now()
        for message in entries:
            annotate_entry(message, facts.get(message.entry_id), now)

    # --- Explain -------------------------------------------------------------------------

    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.ExplainResponse:
        deps = self._deps()
        key = self._own_key(request.subject)
        purpose = self._purpose(request, request.subject)
        now = self._reader.now()
        # Served only where a score is: NOT_FOUND for no entries, FAILED_PRECONDITION without consent.
        view = await run_blocking(self._executor, self._reader.score, SubjectRef(subject_key=key), None)
        facts = await run_blocking(self._executor, deps.due.facts, key)
        kind = view.score.subject_kind
        active = self._reader.policies().at(now)
        policy, due_policy = active.for_kind(kind), active.due_process
        rules: Sequence[PositiveRule] | None = None
        if deps.rules is not None:
            rules = await deps.rules.positive_rules()
        explanation = explain(
            subject_key=key,
            subject_kind=kind,
            facts=facts,
            policy=policy,
            due_process=due_policy,
            now=now,
            positive_rules=rules or (),
        )
        await self._record_reads("Explain", [key], purpose)
        return pb.ExplainResponse(explanation=explanation_message(explanation))

    # --- ListDisputes / ListRepairApplications --------------------------------------------

    def _list_filter(self, ref: subject_pb2.SubjectRef, status: str | None, overdue_only: bool) -> ListFilter:
        principal = current_principal()
        subject = principal is not None and principal.role is Role.SUBJECT
        # A subject lists only its own: the filter is forced to its key (named, or its token's:
        # an unset ref names the subject caller itself, found as a raw id is).
        key = self._reader.subject_key(subject_ref(ref)) if subject or _subject_named(ref) else None
        if subject and key is not None:
            require_own_subject(principal, key)
        return ListFilter(status=status, subject_key=key, overdue_only=overdue_only)

    async def _record_listed(
        self, method: str, where: ListFilter, keys: Sequence[str], purpose: StatedPurpose
    ) -> None:
        listed = [where.subject_key] if where.subject_key is not None else sorted(set(keys))
        await self._record_reads(method, listed, purpose)

    async def ListDisputes(self, request: pb.ListDisputesRequest, context: Any) -> pb.ListDisputesResponse:
        deps = self._deps()
        status = _DISPUTE_FILTER.get(request.status) if request.status else None
        where = replace(
            self._list_filter(request.subject, status, request.overdue_only),
            department=request.department or None,
            category=request.category or None,
            assignee=_assignee_filter(request),
            unassigned_only=request.unassigned_only,
            ids=id_filter(request.dispute_ids, "dispute_ids"),
        )
        purpose = self._purpose(request, request.subject)
        size = page_size(request.page_size)
        binding = {"method": "ListDisputes", "where": _bound_filter(where)}
        after = decode_key(self._reader.tokens, request.page_token, bound_to=binding)
        now = self._reader.now()
        rows = await run_blocking(self._executor, deps.due.disputes, where, now, after, size + 1)
        page = dispute_page(rows, size, self._reader.tokens, bound_to=binding)
        await self._record_listed("ListDisputes", where, [d.subject_key for d in page.disputes], purpose)
        return pb.ListDisputesResponse(
            disputes=[dispute_message(d, now) for d in page.disputes], next_page_token=page.next_page_token
        )

    async def ListRepairApplications(
        self, request: pb.ListRepairApplicationsRequest, context: Any
    ) -> pb.ListRepairApplicationsResponse:
        deps = self._deps()
        status = _REPAIR_FILTER.get(request.status) if request.status else None
        where = replace(
            self._list_filter(request.subject, status, request.overdue_only),
            ids=id_filter(request.application_ids, "application_ids"),
        )
        purpose = self._purpose(request, request.subject)
        size = page_size(request.page_size)
        binding = {"method": "ListRepairApplications", "where": _bound_filter(where)}
        after = decode_key(self._reader.tokens, request.page_token, bound_to=binding)
        now = self._reader.now()
        rows = await run_blocking(self._executor, deps.due.repairs, where, now, after, size + 1)
        page = repair_page(rows, size, self._reader.tokens, bound_to=binding)
        await self._record_listed(
            "ListRepairApplications", where, [r.subject_key for r in page.applications], purpose
        )
        return pb.ListRepairApplicationsResponse(
            applications=[repair_message(r, now) for r in page.applications],
            next_page_token=page.next_page_token,
        )

    # --- GetConsent ------------------------------------------------------------------------

    async def GetConsent(self, request: pb.GetConsentRequest, context: Any) -> pb.GetConsentResponse:
        key = self._own_key(request.subject)
        purpose = self._purpose(request, request.subject)
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        view = await self._serve(
            "GetConsent",
            [key],
            purpose,
            run_blocking(self._executor, self._reader.consent, subject_ref(request.subject), as_of),
        )
        response = pb.GetConsentResponse(
            granted=view.granted,
            consent_required=view.required,
            as_of=to_timestamp(view.as_of),
            policy_version=view.policy_version,
        )
        if view.consent is not None:
            response.consent.CopyFrom(consent_message(view.consent))
        return response

    # --- ListAccessLog ---------------------------------------------------------------------

    async def ListAccessLog(self, request: pb.ListAccessLogRequest, context: Any) -> pb.ListAccessLogResponse:
        deps = self._deps()
        key = self._own_key(request.subject)
        purpose = self._purpose(request, request.subject)
        size = page_size(request.page_size)
        binding = {"method": "ListAccessLog", "subject_key": current_key(key)}
        before = decode_token(self._reader.tokens, request.page_token, int, bound_to=binding)
        # Recorded first: this read is part of the log it shows.
        await self._record_reads("ListAccessLog", [key], purpose)
        since = deps.recorder.now() - ACCESS_LOG_PERIOD
        # Named by raw id, the subject's records are found under every generation's key.
        keys = self._reader.recorded_keys(subject_ref(request.subject))
        rows = await run_blocking(self._executor, deps.access_log.page, keys, since, before, size + 1)
        page = rows[:size]
        return pb.ListAccessLogResponse(
            records=[access_record_message(r) for r in page],
            next_page_token=self._reader.tokens.encode(page[-1].seq, bound_to=binding)
            if len(rows) > size
            else "",
        )


def _bound_filter(where: ListFilter) -> dict[str, object]:
    """The filter as a page token binds it (kit.page_tokens)."""
    bound: dict[str, object] = {f.name: getattr(where, f.name) for f in fields(where)}
    if where.subject_key is not None:
        bound["subject_key"] = current_key(where.subject_key)
    return bound


def _assignee_filter(request: pb.ListDisputesRequest) -> str | None:
    """The reviewer whose disputes are asked for: the one named, or the caller itself."""
    if request.assigned_to_caller and request.assignee:
        raise InvalidArgument(
            "invalid request",
            [Violation("assigned_to_caller", "cannot be set with assignee", "CONFLICTING_FILTERS")],
        )
    if request.unassigned_only and (request.assignee or request.assigned_to_caller):
        raise InvalidArgument(
            "invalid request",
            [Violation("unassigned_only", "cannot be set with an assignee filter", "CONFLICTING_FILTERS")],
        )
    if request.assigned_to_caller:
        principal = current_principal()
        # Insecure development mode has no caller: it holds nothing.
        return principal.loggable_id if principal is not None else "anonymous"
    return request.assignee or None


def access_record_message(entry: AccessEntry) -> pb.AccessRecord:
    return pb.AccessRecord(
        at=to_timestamp(entry.at),
        actor=entry.actor,
        role=entry.role,
        purpose=entry.purpose,
        method=entry.method,
        purpose_note=entry.purpose_note,
    )


def explanation_message(x: Explanation) -> pb.Explanation:
    message = pb.Explanation(
        subject_key=x.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[x.subject_kind],
        as_of=to_timestamp(x.as_of),
        policy_version=x.policy_version,
        base_score=x.base_score,
        min_score=x.min_score,
        max_score=x.max_score,
        score=x.score,
        tier=x.tier,
        tiers=[pb.TierThreshold(tier=t.name, min_score=t.min) for t in x.tiers],
        categories=category_messages(x.categories),
        lists=list_messages(x.lists),
        projection=[
            pb.ProjectedScore(
                at=to_timestamp(p.at), score=p.score, tier=p.tier, expiring_entry_ids=p.expiring_entry_ids
            )
            for p in x.projection
        ],
        positive_behaviours=[
            pb.PositiveBehaviour(
                rule_id=b.rule.rule_id,
                title=b.rule.title,
                description=b.rule.description,
                points=b.rule.points,
                category=b.rule.category,
                cap_remaining=b.cap_remaining,
            )
            for b in x.positive_behaviours
        ],
        cap_window_days=x.cap_window_days,
    )
    if x.next_tier is not None:
        message.next_tier.CopyFrom(
            pb.NextTier(
                tier=x.next_tier.tier,
                min_score=x.next_tier.min_score,
                points_needed=x.next_tier.points_needed,
            )
        )
    for e in x.entries:
        explained = pb.ExplainedEntry(
            entry=annotate_entry(
                entry_message(e.facts.entry, with_evidence=True, now=x.as_of), e.facts, x.as_of
            ),
            contribution=e.contribution,
            capped_points=e.capped_points,
            counting=e.counting,
        )
        if e.repair_possible_from is not None:
            explained.repair_possible_from.CopyFrom(to_timestamp(e.repair_possible_from))
        message.entries.append(explained)
    return message
