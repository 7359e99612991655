"""Why a subject has its score, and how it will move (pure domain, for Explain).

Everything is computed with score's own pure function (`compute_score`) over the
subject's entries with their pauses, so the explanation adds up to the score served:
base + contributions after caps, within the bounds. The projection scores the same
ledger at each future instant a counting entry expires or a pause begins or ends (an
open dispute's deadline): with nothing new recorded, the score changes only then, so
these are exact "if nothing else happens" scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from domain.entries import (
    APPROVED,
    OPEN,
    OVERTURNED,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    RepairRecord,
    ScoredEntry,
    counts_at,
    known_at,
    visible_until,
)
from domain.policy import DueProcessPolicy, SubjectPolicy, Tier
from domain.scoring import CategoryScore, ListMembership, compute_score, granted_points


@dataclass(frozen=True)
class PositiveRule:
    """A rule of the active rule set that adds points: `points` is a number or the
    expression for computed points."""

    rule_id: str
    title: str
    description: str
    points: str
    category: str
    # The subject kinds it applies to; empty: every kind.
    subject_kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExplainedEntry:
    facts: EntryFacts
    status: EntryStatus
    status_reason: str
    contribution: int
    capped_points: int
    counting: bool
    repair_possible_from: datetime | None
    dispute: DisputeRecord | None
    repair: RepairRecord | None

    @property
    def dispute_open(self) -> bool:
        return self.dispute is not None and self.dispute.status == OPEN


@dataclass(frozen=True)
class NextTier:
    tier: str
    min_score: int
    points_needed: int


@dataclass(frozen=True)
class Projected:
    at: datetime
    score: int
    tier: str
    expiring_entry_ids: tuple[str, ...]


@dataclass(frozen=True)
class Behaviour:
    rule: PositiveRule
    # Positive points the category may still add today; -1 when uncapped.
    cap_remaining: int


@dataclass(frozen=True)
class Explanation:
    subject_key: str
    subject_kind: str
    as_of: datetime
    policy_version: str
    base_score: int
    min_score: int
    max_score: int
    score: int
    tier: str
    tiers: tuple[Tier, ...]
    categories: tuple[CategoryScore, ...]
    lists: tuple[ListMembership, ...]
    entries: tuple[ExplainedEntry, ...]
    next_tier: NextTier | None
    projection: tuple[Projected, ...]
    positive_behaviours: tuple[Behaviour, ...]
    cap_window_days: int

    @property
    def disputed_entry_ids(self) -> tuple[str, ...]:
        return tuple(sorted(e.facts.entry.entry_id for e in self.entries if e.counting and e.dispute_open))


def shown_status(facts: EntryFacts, now: datetime) -> tuple[EntryStatus, str]:
    """What a read shows for an entry at `now`, and why it does not count (empty while it
    counts): reversed > repaired > disputed > active, with expiry derived from visible_until."""
    status = facts.status
    entry = facts.entry
    until = entry.visible_until
    if status is EntryStatus.REVERSED:
        overturned = [d for d in facts.disputes if d.status == OVERTURNED]
        if facts.reversals:
            r = facts.reversals[0]
            return status, f"reversed: {r.explanation()}"
        if overturned:
            d = overturned[-1]
            return status, f"reversed: dispute {d.dispute_id} overturned: {d.resolution_reason}"
        return status, "reversed"
    if status is EntryStatus.REPAIRED:
        approved = [r for r in facts.repairs if r.status == APPROVED]
        reason = f": application {approved[-1].application_id} approved: {approved[-1].decision_reason}"
        return status, "repaired" + (reason if approved else "")
    if until <= now:
        return (EntryStatus.EXPIRED if status is EntryStatus.ACTIVE else status), (
            f"expired at {until.isoformat()}"
        )
    lapsed = [d for d in facts.disputes if d.overdue(now)]
    if lapsed:
        return status, (
            f"disputed past the deadline {lapsed[-1].deadline.isoformat()}; not counted until decided"
        )
    if entry.recorded_at > now:
        return status, "not yet recorded"
    return status, ""


def explain(
    *,
    subject_key: str,
    subject_kind: str,
    facts: Sequence[EntryFacts],
    policy: SubjectPolicy,
    due_process: DueProcessPolicy,
    now: datetime,
    positive_rules: Sequence[PositiveRule] = (),
) -> Explanation:
    scored = [f.scored for f in facts]
    result = compute_score(scored, policy, now)
    grants = {c.entry_id: c.points for c in result.counted}
    explained = []
    for f in sorted(facts, key=lambda f: (f.entry.occurred_at, f.entry.entry_id), reverse=True):
        e = f.entry
        counting = e.entry_id in grants
        status, reason = shown_status(f, now)
        period = due_process.repair_min_period(e.severity) if e.points < 0 else None
        explained.append(
            ExplainedEntry(
                facts=f,
                status=status,
                status_reason=reason,
                contribution=grants.get(e.entry_id, 0),
                capped_points=e.points - grants[e.entry_id] if counting else 0,
                counting=counting,
                repair_possible_from=None if period is None else e.occurred_at + period,
                dispute=f.disputes[-1] if f.disputes else None,
                repair=f.repairs[-1] if f.repairs else None,
            )
        )
    return Explanation(
        subject_key=subject_key,
        subject_kind=subject_kind,
        as_of=now,
        policy_version=policy.version,
        base_score=policy.base,
        min_score=policy.min_score,
        max_score=policy.max_score,
        score=result.score,
        tier=result.tier,
        tiers=policy.tiers,
        categories=result.categories,
        lists=result.lists,
        entries=tuple(explained),
        next_tier=next_tier(policy, result.score),
        projection=project(scored, policy, now),
        positive_behaviours=tuple(
            Behaviour(r, cap_remaining(scored, policy, r.category, now))
            for r in positive_rules
            if not r.subject_kinds or subject_kind in r.subject_kinds
        ),
        cap_window_days=policy.caps.window_days,
    )


def next_tier(policy: SubjectPolicy, score: int) -> NextTier | None:
    """The lowest tier above the score's, and the points it needs; None at the top."""
    above = [t for t in policy.tiers if t.min > score]
    if not above:
        return None
    nearest = min(above, key=lambda t: t.min)
    return NextTier(nearest.name, nearest.min, nearest.min - score)


# The next changes a projection shows: each costs a whole score computation, so the
# projection of a long ledger stays linear in its length (a page shows the near future).
MAX_PROJECTED = 12


def project(entries: Sequence[ScoredEntry], policy: SubjectPolicy, now: datetime) -> tuple[Projected, ...]:
    """The score at each of the next MAX_PROJECTED future instants a counting entry
    expires or a pause starts or ends, with the entries that stop counting then."""
    instants: set[datetime] = set()
    for e in entries:
        if not known_at(e, now):
            continue
        until = visible_until(e, policy)
        if counts_at(e, policy, now) and until > now:
            instants.add(until)
        for p in e.pauses:
            for b in (p.start, p.end):
                if b is not None and now < b < until:
                    instants.add(b)
    projected = []
    for at in sorted(instants)[:MAX_PROJECTED]:
        before = at - timedelta(microseconds=1)
        stopping = tuple(
            sorted(
                e.entry_id for e in entries if counts_at(e, policy, before) and not counts_at(e, policy, at)
            )
        )
        result = compute_score(entries, policy, at)
        projected.append(Projected(at, result.score, result.tier, stopping))
    return tuple(projected)


def cap_remaining(entries: Sequence[ScoredEntry], policy: SubjectPolicy, category: str, now: datetime) -> int:
    """Positive points `category` may still add at `now` under its cap: the limit minus
    what positive entries known now were granted over the window ending now; -1 when the
    category has no cap."""
    limit = policy.caps.limit(category)
    if limit is None:
        return -1
    known = [e for e in entries if known_at(e, now)]
    window_start = now - policy.caps.window
    # The same allowance score computes: in event-time order, each positive adds at most
    # what is left of the limit over its window.
    granted = granted_points(known, policy)
    used = sum(
        granted.get(e.entry_id, 0)
        for e in known
        if e.category == category and e.points > 0 and window_start < e.occurred_at <= now
    )
    return max(0, limit - used)
