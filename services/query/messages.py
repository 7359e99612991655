"""Protobuf ⇄ domain forms of QueryService's messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from datetime import datetime
from typing import Any

from contracts.due_process_wire import DISPUTE_STATUSES, REPAIR_STATUSES, dispute_message, repair_message
from domain.benefits import Benefit
from domain.entries import CORRECTION, DISPUTE, REPAIR, EntryFacts, EntryStatus, LedgerEntry, View
from domain.history import ENTRIES, EXPIRY, POLICY
from domain.scoring import CategoryScore, ListMembership
from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from kit.errors import InvalidArgument, Violation
from kit.principal import Role, current_principal
from kit.protoconv import SEVERITY_VALUES, SUBJECT_KIND_NAMES, SUBJECT_KIND_VALUES, to_datetime, to_timestamp
from services.query.explain import Explanation, shown_status
from services.query.read_models import HistoryRow, ScoreView
from services.query.stores.access_log import AccessEntry
from services.query.stores.due_process import ListFilter
from services.query.subjects import RawSubject, SubjectRef, current_key

DISPUTE_FILTER = {value: name for name, value in DISPUTE_STATUSES.items()}
REPAIR_FILTER = {value: name for name, value in REPAIR_STATUSES.items()}
_STATUS = {
    EntryStatus.ACTIVE: pb.ENTRY_STATUS_ACTIVE,
    EntryStatus.DISPUTED: pb.ENTRY_STATUS_DISPUTED,
    EntryStatus.REVERSED: pb.ENTRY_STATUS_REVERSED,
    EntryStatus.REPAIRED: pb.ENTRY_STATUS_REPAIRED,
    EntryStatus.EXPIRED: pb.ENTRY_STATUS_EXPIRED,
}


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


def timeline(request: pb.GetScoreRequest | pb.BatchGetScoresRequest) -> View:
    """The timeline a score read asks for: as corrected only at a past instant (now, both agree)."""
    if request.view == pb.SCORE_VIEW_AS_CORRECTED and request.HasField("as_of"):
        return View.AS_CORRECTED
    return View.AS_KNOWN


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


def subject_named(ref: subject_pb2.SubjectRef) -> bool:
    return ref.WhichOneof("ref") is not None


def identifiers(refs: Iterable[subject_pb2.SubjectRef]) -> list[str]:
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


def bound_filter(where: ListFilter) -> dict[str, object]:
    """The filter as a page token binds it (kit.page_tokens)."""
    bound: dict[str, object] = {f.name: getattr(where, f.name) for f in fields(where)}
    if where.subject_key is not None:
        bound["subject_key"] = current_key(where.subject_key)
    return bound


def assignee_filter(request: pb.ListDisputesRequest) -> str | None:
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
