"""What query's reads answer with, and what score's store gives them (plain data)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from domain.benefits import Benefit, Eligibility
from domain.consent import Consent, may_serve
from domain.entries import LedgerEntry
from domain.scoring import CategoryScore, ListMembership


@dataclass(frozen=True)
class SubjectScore:
    subject_key: str
    subject_kind: str
    score: int
    tier: str
    categories: tuple[CategoryScore, ...]
    as_of: datetime
    policy_version: str
    entry_count: int
    lists: tuple[ListMembership, ...] = ()
    next_change_at: datetime | None = None


@dataclass(frozen=True)
class ConsentView:
    """The consent in force for a subject at an instant, and whether the policy in force
    then requires it (False when the subject's kind is not known: no score is held)."""

    consent: Consent | None
    required: bool
    as_of: datetime
    policy_version: str

    @property
    def granted(self) -> bool:
        return may_serve(True, self.consent)


@dataclass(frozen=True)
class ScoreView:
    score: SubjectScore
    base_score: int


@dataclass(frozen=True)
class HistoryRow:
    history_id: int
    changed_at: datetime
    recorded_at: datetime
    cause: str
    policy_version: str
    score_before: int | None
    score: int
    tier_before: str
    tier: str
    lists_before: tuple[str, ...]
    lists: tuple[str, ...]
    added_entry_ids: tuple[str, ...]
    expired_entry_ids: tuple[str, ...]
    # Due process (docs/due-process.md): entries ended by a decision or correction, entries
    # counting again, and what happened.
    ended_entry_ids: tuple[str, ...] = ()
    resumed_entry_ids: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class HistoryPage:
    changes: tuple[HistoryRow, ...]
    next_page_token: str


@dataclass(frozen=True)
class Distribution:
    # (kind, tier) -> subjects
    by_kind: dict[tuple[str, str], int] = field(default_factory=dict)
    # (category, kind, purpose-bound tier) -> subjects
    by_category: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # (kind, list) -> subjects
    lists: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class RawDistribution:
    """What the store counts: tiers and lists per kind, and subjects per (kind, category,
    category points), which the domain turns into purpose-bound tiers."""

    tiers: Sequence[tuple[str, str, int]]
    lists: Sequence[tuple[str, str, int]]
    category_points: Sequence[tuple[str, str, int, int]]


@dataclass(frozen=True)
class EligibilityView:
    benefit: Benefit
    eligibility: Eligibility
    as_of: datetime
    policy_version: str


@dataclass(frozen=True)
class BenefitPage:
    benefits: tuple[Benefit, ...]
    next_page_token: str


@dataclass(frozen=True)
class EntryPage:
    entries: tuple[LedgerEntry, ...]
    next_page_token: str
