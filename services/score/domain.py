"""The ledger and the score (pure domain).

Each outcome of a rule firing becomes exactly one ledger entry, keyed by its
outcome id, so redelivery by the rules outbox has no effect. A subject's score is a
pure function of its ledger and the policy (`compute_score`): the store keeps the
result only so that reads are cheap, and `Ledger.verify` proves it still matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Protocol

from kit.errors import Violation
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS
from services.score.policy import ScorePolicy, SubjectPolicy

MAX_ID_LENGTH = 128
MAX_SUBJECT_KEY_LENGTH = 64
MAX_CATEGORY_LENGTH = 64


class EntryStatus(Enum):
    ACTIVE = "active"
    DISPUTED = "disputed"
    REVERSED = "reversed"
    REPAIRED = "repaired"
    EXPIRED = "expired"


# Only active entries count for now; disputes, repairs and expiry over time come later
# and will widen or narrow this without touching the arithmetic.
COUNTING = frozenset({EntryStatus.ACTIVE})


class Scorable(Protocol):
    """What the score needs of an entry."""

    @property
    def points(self) -> int: ...
    @property
    def category(self) -> str: ...
    @property
    def status(self) -> EntryStatus: ...


@dataclass(frozen=True)
class ScoredEntry:
    """The part of a ledger entry the score depends on."""

    points: int
    category: str
    status: EntryStatus


@dataclass(frozen=True)
class CategoryScore:
    category: str
    points: int
    entry_count: int


@dataclass(frozen=True)
class ScoreResult:
    score: int
    tier: str
    policy_version: str
    categories: tuple[CategoryScore, ...]
    entry_count: int


def compute_score(entries: Iterable[Scorable], policy: SubjectPolicy) -> ScoreResult:
    """The score, tier and category breakdown of one subject's ledger under `policy`."""
    points: dict[str, int] = {}
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.status not in COUNTING:
            continue
        points[entry.category] = points.get(entry.category, 0) + entry.points
        counts[entry.category] = counts.get(entry.category, 0) + 1
    score = policy.clamp(policy.base + sum(points.values()))
    return ScoreResult(
        score=score,
        tier=policy.tier_of(score),
        policy_version=policy.version,
        categories=tuple(CategoryScore(c, points[c], counts[c]) for c in sorted(points)),
        entry_count=sum(counts.values()),
    )


@dataclass(frozen=True)
class RuleRef:
    rule_id: str = ""
    rule_set: str = ""
    rule_set_version: int = 0
    title: str = ""
    description: str = ""
    legal_basis: str = ""


@dataclass(frozen=True)
class IncomingOutcome:
    """An outcome as delivered, before validation. `snapshot` is the serialized outcome,
    kept verbatim as the entry's evidence."""

    outcome_id: str
    subject_key: str
    subject_kind: str | None
    rule: RuleRef
    points: int
    category: str
    severity: str | None
    occurred_at: datetime | None
    reason: str
    black_list: bool
    snapshot: bytes


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: str
    subject_key: str
    subject_kind: str
    rule: RuleRef
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    visible_until: datetime
    reason: str
    black_list: bool
    snapshot: bytes


def outcome_violations(outcome: IncomingOutcome) -> list[Violation]:
    """Every problem of one outcome; empty when it can become a ledger entry."""
    problems = []
    for name, value, limit in (
        ("outcome_id", outcome.outcome_id, MAX_ID_LENGTH),
        ("subject_key", outcome.subject_key, MAX_SUBJECT_KEY_LENGTH),
        ("category", outcome.category, MAX_CATEGORY_LENGTH),
    ):
        if not value:
            problems.append(Violation(name, "is required", "REQUIRED"))
        elif len(value) > limit:
            problems.append(Violation(name, f"must be at most {limit} characters", "TOO_LONG"))
    for name, value in (("rule.rule_id", outcome.rule.rule_id), ("rule.rule_set", outcome.rule.rule_set)):
        if len(value) > MAX_ID_LENGTH:
            problems.append(Violation(name, f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    if outcome.subject_kind not in SUBJECT_KINDS:
        problems.append(Violation("subject_kind", "is required", "REQUIRED"))
    if outcome.severity not in SEVERITIES:
        problems.append(Violation("severity", "is required", "REQUIRED"))
    if outcome.occurred_at is None:
        problems.append(Violation("occurred_at", "is required", "REQUIRED"))
    return problems


@dataclass(frozen=True)
class Rejected:
    outcome_id: str
    violations: tuple[Violation, ...]


@dataclass(frozen=True)
class ApplyResult:
    applied: int
    duplicate: int
    subjects_updated: int
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True)
class Recorded:
    applied: int
    subjects_updated: int


Rescore = Callable[[str, Iterable[Scorable]], ScoreResult]


@dataclass(frozen=True)
class SubjectLedger:
    """A subject's stored score (None when no score row exists) and its ledger."""

    subject_key: str
    subject_kind: str
    stored_score: int | None
    stored_tier: str | None
    entries: tuple[ScoredEntry, ...]


class LedgerStore(Protocol):
    def record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        """In one transaction: store each entry whose id is new, then recompute with
        `rescore(kind, entries)` and store the score of every subject that gained one."""
        ...

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        """Every subject that has ledger entries, in pages ordered by subject key."""
        ...


@dataclass(frozen=True)
class Mismatch:
    subject_key: str
    stored_score: int
    recomputed_score: int
    stored_tier: str
    recomputed_tier: str


@dataclass(frozen=True)
class VerifyResult:
    subjects_checked: int
    mismatch_count: int
    mismatches: tuple[Mismatch, ...] = ()


class Ledger:
    """Applies outcomes to the ledger and checks stored scores against recomputes."""

    def __init__(self, *, policy: ScorePolicy, store: LedgerStore, clock: Callable[[], datetime]) -> None:
        self._policy = policy
        self._store = store
        self._clock = clock

    def rescore(self, kind: str, entries: Iterable[Scorable]) -> ScoreResult:
        return compute_score(entries, self._policy.for_kind(kind))

    def apply(self, outcomes: Sequence[IncomingOutcome]) -> ApplyResult:
        """Record a batch; invalid outcomes are skipped, never block the others."""
        now = self._clock()
        rejected: list[Rejected] = []
        fresh: dict[str, LedgerEntry] = {}
        duplicate = 0
        for outcome in outcomes:
            violations = outcome_violations(outcome)
            if violations:
                rejected.append(Rejected(outcome.outcome_id, tuple(violations)))
            elif outcome.outcome_id in fresh:
                duplicate += 1
            else:
                fresh[outcome.outcome_id] = self._entry(outcome, now)
        recorded = self._store.record(list(fresh.values()), self.rescore) if fresh else Recorded(0, 0)
        return ApplyResult(
            applied=recorded.applied,
            duplicate=duplicate + len(fresh) - recorded.applied,
            subjects_updated=recorded.subjects_updated,
            rejected=tuple(rejected),
        )

    def _entry(self, outcome: IncomingOutcome, now: datetime) -> LedgerEntry:
        assert outcome.subject_kind is not None
        assert outcome.severity is not None
        assert outcome.occurred_at is not None
        policy = self._policy.for_kind(outcome.subject_kind)
        return LedgerEntry(
            entry_id=outcome.outcome_id,
            subject_key=outcome.subject_key,
            subject_kind=outcome.subject_kind,
            rule=outcome.rule,
            points=outcome.points,
            category=outcome.category,
            severity=outcome.severity,
            status=EntryStatus.ACTIVE,
            occurred_at=outcome.occurred_at,
            recorded_at=now,
            visible_until=outcome.occurred_at + policy.visibility(outcome.severity),
            reason=outcome.reason,
            black_list=outcome.black_list,
            snapshot=outcome.snapshot,
        )

    def verify(self, max_mismatches: int, page_size: int = 1000) -> VerifyResult:
        """Recompute every subject's score from its ledger; report those that differ."""
        checked = 0
        mismatches: list[Mismatch] = []
        count = 0
        for page in self._store.subject_pages(page_size):
            for subject in page:
                checked += 1
                result = self.rescore(subject.subject_kind, subject.entries)
                if (subject.stored_score, subject.stored_tier) == (result.score, result.tier):
                    continue
                count += 1
                if len(mismatches) < max_mismatches:
                    mismatches.append(
                        Mismatch(
                            subject_key=subject.subject_key,
                            stored_score=subject.stored_score or 0,
                            recomputed_score=result.score,
                            stored_tier=subject.stored_tier or "",
                            recomputed_tier=result.tier,
                        )
                    )
        return VerifyResult(subjects_checked=checked, mismatch_count=count, mismatches=tuple(mismatches))
