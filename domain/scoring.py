"""The score: a pure function of a subject's entries, the policy, an instant and a view.

Caps per category and period, tiers, and red and black lists are computed here
(`compute_score`); the score service stores the result only so that reads are cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from domain.entries import Scorable, View, _boundaries, _pauses, known_at, visible_until
from domain.policy import SubjectPolicy

RED = "red"
BLACK = "black"


@dataclass(frozen=True)
class CategoryScore:
    category: str
    # The points the category's visible entries add, after caps.
    points: int
    entry_count: int
    # Positive points of visible entries withheld by the category's cap.
    capped: int = 0


@dataclass(frozen=True)
class CountedEntry:
    """One visible entry and the points it adds to the score after caps."""

    entry_id: str
    category: str
    points: int
    negative: bool
    black_list: bool
    visible_until: datetime


@dataclass(frozen=True)
class ListMembership:
    """Why a subject is on a list: the rule of the policy it met and the entries behind it."""

    name: str
    reasons: tuple[str, ...]
    entry_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScoreState:
    """What a history row compares: a change of any of these is a history event."""

    score: int
    tier: str
    red: bool
    black: bool


@dataclass(frozen=True)
class ScoreResult:
    score: int
    tier: str
    policy_version: str
    categories: tuple[CategoryScore, ...]
    entry_count: int
    as_of: datetime | None = None
    lists: tuple[ListMembership, ...] = ()
    counted: tuple[CountedEntry, ...] = ()
    # When the score next changes with no new event: the earliest visible_until of a
    # counting entry, or pause start or end (a dispute's deadline) after as_of; None when
    # nothing is due.
    next_change_at: datetime | None = None

    def on_list(self, name: str) -> ListMembership | None:
        return next((m for m in self.lists if m.name == name), None)

    @property
    def state(self) -> ScoreState:
        return ScoreState(
            self.score, self.tier, self.on_list(RED) is not None, self.on_list(BLACK) is not None
        )


def granted_points(entries: Sequence[Scorable], policy: SubjectPolicy) -> dict[str, int]:
    """The points each entry may add after the rolling per-category cap on positives.

    Positives are taken in event-time order (entry id breaks ties, so the result does not
    depend on arrival order); each adds at most what is left of its category's limit over
    the window (occurred_at - window, occurred_at]. Every window of that length then holds at
    most the limit. The allowance depends only on which entries are known, not on whether
    older ones have since expired, so an entry's contribution never changes while it counts.
    """
    allowed: dict[str, int] = {}
    positives: dict[str, list[Scorable]] = {}
    for e in entries:
        if e.points > 0 and policy.caps.limit(e.category) is not None:
            positives.setdefault(e.category, []).append(e)
        else:
            allowed[e.entry_id] = e.points
    window = policy.caps.window
    for category, items in positives.items():
        limit = policy.caps.limit(category)
        assert limit is not None
        items.sort(key=lambda e: (e.occurred_at, e.entry_id))
        granted: list[tuple[datetime, int]] = []
        start = 0
        in_window = 0
        for e in items:
            while start < len(granted) and granted[start][0] <= e.occurred_at - window:
                in_window -= granted[start][1]
                start += 1
            grant = max(0, min(e.points, limit - in_window))
            granted.append((e.occurred_at, grant))
            in_window += grant
            allowed[e.entry_id] = grant
    return allowed


def compute_score(
    entries: Iterable[Scorable],
    policy: SubjectPolicy,
    as_of: datetime,
    *,
    categories: frozenset[str] | None = None,
    view: View = View.AS_KNOWN,
) -> ScoreResult:
    """The score, tier, lists and category breakdown of one subject's ledger under `policy`,
    exactly as it stood at `as_of` on `view`'s timeline.

    An entry counts at `as_of` when `counts_at` says so: known then (recorded by then on
    the as-known timeline, occurred by then on the corrected one, where void entries never
    count), `as_of` before its visible_until, and `as_of` in none of its pauses. Caps are
    computed over the entries known then (`known_at`), so a paused entry keeps its share of
    the cap and its contribution does not change when it counts again. `categories`
    restricts the ledger to a benefit's purpose (None: every category).
    """
    entries = list(entries)
    known = [
        e for e in entries if known_at(e, as_of, view) and (categories is None or e.category in categories)
    ]
    allowed = granted_points(known, policy)
    points: dict[str, int] = {}
    counts: dict[str, int] = {}
    capped: dict[str, int] = {}
    counted: list[CountedEntry] = []
    upcoming: list[datetime] = []
    for e in sorted(known, key=lambda e: (e.occurred_at, e.entry_id)):
        until = visible_until(e, policy)
        # A pause that starts or ends later changes the score with no new event (a
        # dispute's deadline passing undecided); so may a void pause of an expired entry
        # (it frees cap), hence every known entry's boundaries.
        upcoming += [b for b in _boundaries(e) if b > as_of]
        if as_of >= until or any(p.covers(as_of) for p in _pauses(e) or ()):
            continue
        grant = allowed[e.entry_id]
        points[e.category] = points.get(e.category, 0) + grant
        counts[e.category] = counts.get(e.category, 0) + 1
        capped[e.category] = capped.get(e.category, 0) + (e.points - grant)
        counted.append(CountedEntry(e.entry_id, e.category, grant, e.points < 0, e.black_list, until))
    score = policy.clamp(policy.base + sum(points.values()))
    tier = policy.tier_of(score)
    return ScoreResult(
        score=score,
        tier=tier,
        policy_version=policy.version,
        categories=tuple(CategoryScore(c, points[c], counts[c], capped[c]) for c in sorted(points)),
        entry_count=len(counted),
        as_of=as_of,
        lists=_lists(tier, counted, policy),
        counted=tuple(counted),
        next_change_at=min(
            [*(c.visible_until for c in counted), *upcoming, *_arrivals(entries, as_of, view, categories)],
            default=None,
        ),
    )


def _arrivals(
    entries: Sequence[Scorable], as_of: datetime, view: View, categories: frozenset[str] | None
) -> Iterator[datetime]:
    # On the corrected timeline an entry recorded early with a future event time starts
    # counting at its occurred_at.
    if view is View.AS_CORRECTED:
        for e in entries:
            if e.occurred_at > as_of and (categories is None or e.category in categories):
                yield e.occurred_at


def on_lists(tier: str, negative: bool, flagged: bool, policy: SubjectPolicy) -> tuple[bool, bool]:
    """(red, black): whether a subject of `tier` is on each list, given whether any counting
    entry is negative and whether any is black-list flagged."""
    criteria = policy.lists
    red = tier in criteria.red_tiers and not (criteria.red_requires_no_negative and negative)
    black = tier in criteria.black_tiers or (criteria.black_on_flag and flagged)
    return red, black


def _lists(tier: str, counted: Sequence[CountedEntry], policy: SubjectPolicy) -> tuple[ListMembership, ...]:
    criteria = policy.lists
    memberships = []
    red, _ = on_lists(tier, any(c.negative for c in counted), False, policy)
    if red:
        reasons = [f"tier {tier}"]
        if criteria.red_requires_no_negative:
            reasons.append("no counting negative entry")
        memberships.append(ListMembership(RED, tuple(reasons)))
    black_reasons = []
    flagged = [c.entry_id for c in counted if c.black_list] if criteria.black_on_flag else []
    if tier in criteria.black_tiers:
        black_reasons.append(f"tier {tier}")
    if flagged:
        black_reasons.append(
            f"{len(flagged)} counting black-list-flagged entr{'y' if len(flagged) == 1 else 'ies'}"
        )
    if black_reasons:
        memberships.append(ListMembership(BLACK, tuple(black_reasons), tuple(flagged)))
    return tuple(memberships)


def list_names(state: ScoreState | None) -> tuple[str, ...]:
    if state is None:
        return ()
    return tuple(n for n, on in ((RED, state.red), (BLACK, state.black)) if on)
