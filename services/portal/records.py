"""What the portal reads from the services, as plain data: no protobuf, no grpc.

`services.portal.convert` fills these from the services' messages; the view models
(`services.portal.views`) turn them into what the pages show. Subject keys are not kept:
the portal never shows or logs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Category:
    name: str
    points: int
    entry_count: int
    capped_points: int = 0


@dataclass(frozen=True)
class ListMembership:
    name: str  # "red" or "black"
    reasons: tuple[str, ...]
    entry_ids: tuple[str, ...]


@dataclass(frozen=True)
class Tier:
    name: str
    min_score: int


@dataclass(frozen=True)
class Dispute:
    dispute_id: str
    entry_id: str
    statement: str
    filed_at: datetime | None
    deadline: datetime | None
    status: str  # open, upheld, overturned
    resolution_reason: str = ""
    resolved_at: datetime | None = None
    overdue: bool = False
    resolved_by: str = ""  # the reviewer (staff pages only)
    assignee: str = ""  # the reviewer holding it (staff pages only), "" for no one
    assigned_at: datetime | None = None


@dataclass(frozen=True)
class Repair:
    application_id: str
    entry_id: str
    evidence: str
    evidence_uri: str
    applied_at: datetime | None
    decision_due: datetime | None
    status: str  # pending, approved, rejected
    decision_reason: str = ""
    decided_at: datetime | None = None
    overdue: bool = False
    decided_by: str = ""  # the reviewer (staff pages only)


@dataclass(frozen=True)
class Evidence:
    source: str
    event_id: str
    event_type: str
    occurred_at: datetime | None
    attributes: tuple[tuple[str, str], ...]
    evidence_uri: str = ""


@dataclass(frozen=True)
class Entry:
    entry_id: str
    rule_id: str
    rule_title: str
    rule_description: str
    legal_basis: str
    rule_set: str
    rule_set_version: int
    points: int
    category: str
    severity: str  # positive, minor, general, serious
    status: str  # active, disputed, reversed, repaired, expired
    occurred_at: datetime | None
    recorded_at: datetime | None
    visible_until: datetime | None
    reason: str
    black_list: bool
    sources: tuple[str, ...]
    status_reason: str = ""
    evidence: tuple[Evidence, ...] = ()
    dispute: Dispute | None = None
    repair: Repair | None = None


@dataclass(frozen=True)
class ExplainedEntry:
    entry: Entry
    contribution: int
    capped_points: int
    counting: bool
    repair_possible_from: datetime | None


@dataclass(frozen=True)
class Projection:
    at: datetime | None
    score: int
    tier: str
    expiring_entry_ids: tuple[str, ...]


@dataclass(frozen=True)
class PositiveBehaviour:
    rule_id: str
    title: str
    description: str
    points: str
    category: str
    cap_remaining: int  # -1: uncapped


@dataclass(frozen=True)
class NextTier:
    tier: str
    min_score: int
    points_needed: int


@dataclass(frozen=True)
class Explanation:
    subject_kind: str  # person, organization
    as_of: datetime | None
    policy_version: str
    base_score: int
    min_score: int
    max_score: int
    score: int
    tier: str
    tiers: tuple[Tier, ...]
    categories: tuple[Category, ...]
    lists: tuple[ListMembership, ...]
    entries: tuple[ExplainedEntry, ...]
    next_tier: NextTier | None
    projection: tuple[Projection, ...]
    positive_behaviours: tuple[PositiveBehaviour, ...]
    cap_window_days: int


@dataclass(frozen=True)
class ScoreChange:
    changed_at: datetime | None
    cause: str  # entries, expiry, policy, correction, dispute, repair
    score_before: int | None
    score: int
    tier_before: str
    tier: str
    lists_before: tuple[str, ...]
    lists: tuple[str, ...]
    added_entry_ids: tuple[str, ...]
    expired_entry_ids: tuple[str, ...]
    ended_entry_ids: tuple[str, ...]
    resumed_entry_ids: tuple[str, ...]
    policy_version: str
    note: str


@dataclass(frozen=True)
class Benefit:
    benefit_id: str
    purpose: str
    provider: str
    considers: tuple[str, ...]
    considers_all: bool
    subject_kinds: tuple[str, ...]
    condition: str
    provider_id: str = ""  # the provider's principal id (its token's `sub`)


@dataclass(frozen=True)
class EligibilityReason:
    condition: str
    met: bool
    explanation: str
    entry_ids: tuple[str, ...]
    disputed_entry_ids: tuple[str, ...]


@dataclass(frozen=True)
class Eligibility:
    benefit_id: str
    eligible: bool
    reasons: tuple[EligibilityReason, ...]
    considers: tuple[str, ...]
    score: int
    tier: str
    lists: tuple[str, ...]
    as_of: datetime | None
    policy_version: str


@dataclass(frozen=True)
class AccessRecord:
    at: datetime | None
    actor: str
    role: str
    purpose: str
    method: str
    purpose_note: str


@dataclass(frozen=True)
class Consent:
    granted: bool
    effective_at: datetime | None
    recorded_at: datetime | None


@dataclass(frozen=True)
class ConsentState:
    """The consent in force for the person now (query's GetConsent)."""

    # The record in force; None when the person never gave or withdrew consent.
    consent: Consent | None
    granted: bool
    # Whether the city's policy requires consent before a score is served.
    required: bool


@dataclass(frozen=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str = ""


@dataclass(frozen=True)
class PublishedRule:
    """A rule of the active rule set, as its published source states it."""

    rule_id: str
    title: str
    description: str
    event_types: tuple[str, ...]
    subject_kinds: tuple[str, ...]
    points: str
    category: str
    severity: str
    legal_basis: str
    black_list: bool = False
    window: str = ""
    cap: str = ""


@dataclass(frozen=True)
class PublishedRuleSet:
    name: str
    version: int
    activated_at: datetime | None
    rules: tuple[PublishedRule, ...]


@dataclass(frozen=True)
class KindPolicy:
    """One subject kind's part of the active score policy."""

    kind: str
    base: int
    min_score: int
    max_score: int
    tiers: tuple[Tier, ...]
    visibility_days: tuple[tuple[str, int], ...]
    cap_window_days: int
    positive_per_category: int
    red_tiers: tuple[str, ...]
    black_tiers: tuple[str, ...]
    black_flagged_entries: bool
    consent_required: bool


@dataclass(frozen=True)
class PublishedPolicy:
    version: str
    activated_at: datetime | None
    dispute_deadline_days: int
    repair_min_period_days: tuple[tuple[str, int], ...]
    repair_decision_working_days: int
    kinds: tuple[KindPolicy, ...] = field(default_factory=tuple)
