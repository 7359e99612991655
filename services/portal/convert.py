"""The services' messages and published sources → the portal's records.

Protobuf in, plain data out: the only module besides the gRPC client that knows the wire
forms. Published sources (the active rule set's and policy's YAML) are read with the
project's one YAML loader (kit.safeyaml) and only the fields the public pages show are
kept; a field the portal does not know is ignored, so a newer source still renders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import due_process_pb2, event_pb2, outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from kit.safeyaml import load_yaml
from kit.vocabulary import SUBJECT_KINDS
from services.portal import records as r

_SEVERITY = {
    outcome_pb2.SEVERITY_POSITIVE: "positive",
    outcome_pb2.SEVERITY_MINOR: "minor",
    outcome_pb2.SEVERITY_GENERAL: "general",
    outcome_pb2.SEVERITY_SERIOUS: "serious",
}
_STATUS = {
    query_pb.ENTRY_STATUS_ACTIVE: "active",
    query_pb.ENTRY_STATUS_DISPUTED: "disputed",
    query_pb.ENTRY_STATUS_REVERSED: "reversed",
    query_pb.ENTRY_STATUS_REPAIRED: "repaired",
    query_pb.ENTRY_STATUS_EXPIRED: "expired",
}
_DISPUTE = {
    due_process_pb2.DISPUTE_STATUS_OPEN: "open",
    due_process_pb2.DISPUTE_STATUS_UPHELD: "upheld",
    due_process_pb2.DISPUTE_STATUS_OVERTURNED: "overturned",
}
_REPAIR = {
    due_process_pb2.REPAIR_STATUS_PENDING: "pending",
    due_process_pb2.REPAIR_STATUS_APPROVED: "approved",
    due_process_pb2.REPAIR_STATUS_REJECTED: "rejected",
}
_CAUSE = {
    query_pb.CHANGE_CAUSE_ENTRIES: "entries",
    query_pb.CHANGE_CAUSE_EXPIRY: "expiry",
    query_pb.CHANGE_CAUSE_POLICY: "policy",
    query_pb.CHANGE_CAUSE_CORRECTION: "correction",
    query_pb.CHANGE_CAUSE_DISPUTE: "dispute",
    query_pb.CHANGE_CAUSE_REPAIR: "repair",
}
_KIND = {subject_pb2.SUBJECT_KIND_PERSON: "person", subject_pb2.SUBJECT_KIND_ORGANIZATION: "organization"}


def when(stamp: Timestamp, present: bool = True) -> datetime | None:
    """A timestamp as an aware UTC datetime; None when unset."""
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def _has(message: Any, name: str) -> bool:
    return bool(message.HasField(name))


def dispute(d: due_process_pb2.Dispute) -> r.Dispute:
    return r.Dispute(
        dispute_id=d.dispute_id,
        entry_id=d.entry_id,
        statement=d.statement,
        filed_at=when(d.filed_at),
        deadline=when(d.deadline),
        status=_DISPUTE.get(d.status, "open"),
        resolution_reason=d.resolution_reason,
        resolved_at=when(d.resolved_at),
        overdue=d.overdue,
        resolved_by=d.resolved_by,
        assignee=d.assignee,
        assigned_at=when(d.assigned_at),
    )


def repair(a: due_process_pb2.RepairApplication) -> r.Repair:
    return r.Repair(
        application_id=a.application_id,
        entry_id=a.entry_id,
        evidence=a.evidence,
        evidence_uri=a.evidence_uri,
        applied_at=when(a.applied_at),
        decision_due=when(a.decision_due),
        status=_REPAIR.get(a.status, "pending"),
        decision_reason=a.decision_reason,
        decided_at=when(a.decided_at),
        overdue=a.overdue,
        decided_by=a.decided_by,
    )


def _attribute(value: event_pb2.AttributeValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "timestamp_value":
        moment = when(value.timestamp_value)
        return moment.isoformat() if moment else ""
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind is None:
        return ""
    return str(getattr(value, kind))


def evidence(e: event_pb2.RecordedEvent) -> r.Evidence:
    return r.Evidence(
        source=e.ref.source,
        event_id=e.ref.event_id,
        event_type=e.event_type,
        occurred_at=when(e.occurred_at),
        attributes=tuple(sorted((k, _attribute(v)) for k, v in e.attributes.items())),
        evidence_uri=e.evidence_uri,
    )


def entry(e: query_pb.LedgerEntry) -> r.Entry:
    return r.Entry(
        entry_id=e.entry_id,
        rule_id=e.rule.rule_id,
        rule_title=e.rule.title,
        rule_description=e.rule.description,
        legal_basis=e.rule.legal_basis,
        rule_set=e.rule.rule_set,
        rule_set_version=e.rule.rule_set_version,
        points=e.points,
        category=e.category,
        severity=_SEVERITY.get(e.severity, "minor"),
        status=_STATUS.get(e.status, "active"),
        occurred_at=when(e.occurred_at),
        recorded_at=when(e.recorded_at),
        visible_until=when(e.visible_until),
        reason=e.reason,
        black_list=e.black_list,
        sources=tuple(dict.fromkeys(ref.source for ref in e.event_refs)),
        status_reason=e.status_reason,
        evidence=tuple(evidence(x) for x in e.evidence),
        dispute=dispute(e.dispute) if _has(e, "dispute") else None,
        repair=repair(e.repair) if _has(e, "repair") else None,
    )


def categories(items: Iterable[query_pb.CategoryScore]) -> tuple[r.Category, ...]:
    return tuple(r.Category(c.category, c.points, c.entry_count, c.capped_points) for c in items)


def lists(items: Iterable[query_pb.ListMembership]) -> tuple[r.ListMembership, ...]:
    return tuple(r.ListMembership(m.list_name, tuple(m.reasons), tuple(m.entry_ids)) for m in items)


def explanation(x: query_pb.Explanation) -> r.Explanation:
    return r.Explanation(
        subject_kind=_KIND.get(x.subject_kind, "person"),
        as_of=when(x.as_of),
        policy_version=x.policy_version,
        base_score=x.base_score,
        min_score=x.min_score,
        max_score=x.max_score,
        score=x.score,
        tier=x.tier,
        tiers=tuple(r.Tier(t.tier, t.min_score) for t in x.tiers),
        categories=categories(x.categories),
        lists=lists(x.lists),
        entries=tuple(
            r.ExplainedEntry(
                entry=entry(e.entry),
                contribution=e.contribution,
                capped_points=e.capped_points,
                counting=e.counting,
                repair_possible_from=when(e.repair_possible_from),
            )
            for e in x.entries
        ),
        next_tier=(
            r.NextTier(x.next_tier.tier, x.next_tier.min_score, x.next_tier.points_needed)
            if _has(x, "next_tier")
            else None
        ),
        projection=tuple(
            r.Projection(when(p.at), p.score, p.tier, tuple(p.expiring_entry_ids)) for p in x.projection
        ),
        positive_behaviours=tuple(
            r.PositiveBehaviour(b.rule_id, b.title, b.description, b.points, b.category, b.cap_remaining)
            for b in x.positive_behaviours
        ),
        cap_window_days=x.cap_window_days,
    )


def score_change(c: query_pb.ScoreChange) -> r.ScoreChange:
    return r.ScoreChange(
        changed_at=when(c.changed_at),
        cause=_CAUSE.get(c.cause, "entries"),
        score_before=c.score_before if c.HasField("score_before") else None,
        score=c.score,
        tier_before=c.tier_before,
        tier=c.tier,
        lists_before=tuple(c.lists_before),
        lists=tuple(c.lists),
        added_entry_ids=tuple(c.added_entry_ids),
        expired_entry_ids=tuple(c.expired_entry_ids),
        ended_entry_ids=tuple(c.ended_entry_ids),
        resumed_entry_ids=tuple(c.resumed_entry_ids),
        policy_version=c.policy_version,
        note=c.note,
    )


def benefit(b: query_pb.Benefit) -> r.Benefit:
    return r.Benefit(
        benefit_id=b.benefit_id,
        purpose=b.purpose,
        provider=b.provider,
        considers=tuple(b.considers),
        considers_all=b.considers_all,
        subject_kinds=tuple(_KIND.get(k, "person") for k in b.subject_kinds),
        condition=b.condition,
        provider_id=b.provider_id,
    )


def eligibility(benefit_id: str, x: query_pb.CheckEligibilityResponse) -> r.Eligibility:
    bound = x.purpose_bound_score
    return r.Eligibility(
        benefit_id=benefit_id,
        eligible=x.eligible,
        reasons=tuple(
            r.EligibilityReason(
                condition=reason.condition,
                met=reason.met,
                explanation=reason.explanation,
                entry_ids=tuple(reason.entry_ids),
                disputed_entry_ids=tuple(reason.disputed_entry_ids),
            )
            for reason in x.reasons
        ),
        considers=tuple(bound.considers),
        score=bound.score,
        tier=bound.tier,
        lists=tuple(bound.lists),
        as_of=when(x.as_of),
        policy_version=x.policy_version,
    )


def access_record(a: query_pb.AccessRecord) -> r.AccessRecord:
    return r.AccessRecord(when(a.at), a.actor, a.role, a.purpose, a.method, a.purpose_note)


def consent(c: due_process_pb2.ConsentRecord) -> r.Consent:
    return r.Consent(c.granted, when(c.effective_at), when(c.recorded_at))


def consent_state(response: query_pb.GetConsentResponse) -> r.ConsentState:
    return r.ConsentState(
        consent(response.consent) if response.HasField("consent") else None,
        response.granted,
        response.consent_required,
    )


# -- published sources ---------------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _span(value: Mapping[str, Any] | None, *keys: str) -> str:
    if not isinstance(value, Mapping):
        return ""
    return ", ".join(f"{k} {_text(value[k])}" for k in keys if k in value)


def published_rule_set(
    name: str, version: int, activated_at: datetime | None, source: str
) -> r.PublishedRuleSet:
    """The rules of a rule set's YAML source (docs/rules.md), as the public page shows them."""
    document, _ = load_yaml(source)
    found = []
    for rule in (document or {}).get("rules") or ():
        if not isinstance(rule, Mapping):
            continue
        window = rule.get("window")
        sequence = rule.get("sequence")
        found.append(
            r.PublishedRule(
                rule_id=_text(rule.get("id")),
                title=_text(rule.get("title")),
                description=_text(rule.get("description")),
                event_types=tuple(_text(t) for t in rule.get("event_types") or ()),
                subject_kinds=tuple(_text(k) for k in rule.get("subject_kinds") or SUBJECT_KINDS),
                points=_text(rule.get("points")),
                category=_text(rule.get("category")),
                severity=_text(rule.get("severity")),
                legal_basis=_text(rule.get("legal_basis")),
                black_list=bool(rule.get("black_list")),
                window=_span(window, "count", "within") or (_span(sequence, "within") if sequence else ""),
                cap=_span(rule.get("cap"), "points", "per"),
            )
        )
    return r.PublishedRuleSet(name=name, version=version, activated_at=activated_at, rules=tuple(found))


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _days(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, Mapping):
        return ()
    return tuple((str(k), _int(v)) for k, v in value.items())


def published_policy(source: str, activated_at: datetime | None) -> r.PublishedPolicy:
    """The score policy's YAML source (config/policy.yaml's shape), as the public pages show it."""
    document, _ = load_yaml(source)
    document = document if isinstance(document, Mapping) else {}
    repair_section = document.get("repair") or {}
    kinds = []
    for kind, policy in (document.get("policies") or {}).items():
        if not isinstance(policy, Mapping):
            continue
        bounds = policy.get("bounds") or {}
        caps = policy.get("caps") or {}
        policy_lists = policy.get("lists") or {}
        red = policy_lists.get("red") or {}
        black = policy_lists.get("black") or {}
        kinds.append(
            r.KindPolicy(
                kind=str(kind),
                base=_int(policy.get("base")),
                min_score=_int(bounds.get("min")),
                max_score=_int(bounds.get("max")),
                tiers=tuple(
                    r.Tier(_text(t.get("name")), _int(t.get("min")))
                    for t in policy.get("tiers") or ()
                    if isinstance(t, Mapping)
                ),
                visibility_days=_days(policy.get("visibility_days")),
                cap_window_days=_int(caps.get("window_days")),
                positive_per_category=_int(caps.get("positive_per_category")),
                red_tiers=tuple(_text(t) for t in red.get("tiers") or ()),
                black_tiers=tuple(_text(t) for t in black.get("tiers") or ()),
                black_flagged_entries=bool(black.get("flagged_entries")),
                consent_required=bool(policy.get("consent_required")),
            )
        )
    return r.PublishedPolicy(
        version=_text(document.get("version")),
        activated_at=activated_at,
        dispute_deadline_days=_int((document.get("disputes") or {}).get("deadline_days"), 20),
        repair_min_period_days=_days(repair_section.get("min_period_days")),
        repair_decision_working_days=_int(repair_section.get("decision_working_days"), 3),
        kinds=tuple(kinds),
    )
