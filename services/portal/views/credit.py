"""*My credit*: the score, its tier and what the tier means, the categories, the lists, the
policy version and the path to the next tier, from one explanation."""

from __future__ import annotations

from dataclasses import dataclass

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words


@dataclass(frozen=True)
class TierRow:
    name: str
    threshold: str  # "1,050 and above", "960 to 1,029"
    meaning: str
    current: bool


@dataclass(frozen=True)
class CategoryRow:
    name: str
    points: str
    entries: str
    capped: str  # "" or "5 points withheld by the cap"


@dataclass(frozen=True)
class ListRow:
    name: str
    code: str
    reasons: tuple[str, ...]
    entry_ids: tuple[str, ...]


@dataclass(frozen=True)
class BehaviourRow:
    title: str
    description: str
    points: str
    category: str
    room: str  # what the cap still allows


@dataclass(frozen=True)
class ProjectionRow:
    date: str
    score: str
    tier: str
    stops: str


@dataclass(frozen=True)
class CreditView:
    score: str
    tier: str
    tier_meaning: str
    base: str
    bounds: str
    policy_version: str
    as_of: str
    tiers: tuple[TierRow, ...]
    categories: tuple[CategoryRow, ...]
    lists: tuple[ListRow, ...]
    not_on_a_list: bool
    next_tier: str  # "" at the top tier
    behaviours: tuple[BehaviourRow, ...]
    cap_window: str
    projection: tuple[ProjectionRow, ...]
    counting: int
    disputed: int


def tier_rows(t: Localiser, tiers: tuple[r.Tier, ...], current: str) -> tuple[TierRow, ...]:
    """Tiers highest first, each with its score range and meaning."""
    ordered = sorted(tiers, key=lambda tier: tier.min_score, reverse=True)
    rows = []
    upper: int | None = None
    for tier in ordered:
        if upper is None:
            threshold = t.gettext("%(min)s and above", min=t.number(tier.min_score))
        else:
            threshold = t.gettext(
                "%(min)s to %(max)s",
                min=t.number(tier.min_score),
                max=t.number(max(tier.min_score, upper - 1)),
            )
        rows.append(TierRow(tier.name, threshold, words.tier_meaning(t, tier.name), tier.name == current))
        upper = tier.min_score
    return tuple(rows)


def category_rows(t: Localiser, categories: tuple[r.Category, ...]) -> tuple[CategoryRow, ...]:
    return tuple(
        CategoryRow(
            name=words.category(t, c.name),
            points=t.signed(c.points),
            entries=t.ngettext("%(num)s entry", "%(num)s entries", c.entry_count),
            capped=(
                t.gettext("%(points)s points withheld by the cap", points=t.number(c.capped_points))
                if c.capped_points
                else ""
            ),
        )
        for c in sorted(categories, key=lambda c: c.name)
    )


def next_tier_text(t: Localiser, next_tier: r.NextTier | None) -> str:
    if next_tier is None:
        return t.gettext("You are in the highest tier.")
    return t.ngettext(
        "%(num)s more point reaches tier %(tier)s (%(min)s).",
        "%(num)s more points reach tier %(tier)s (%(min)s).",
        next_tier.points_needed,
        tier=next_tier.tier,
        min=t.number(next_tier.min_score),
    )


def room_text(t: Localiser, cap_remaining: int, window_days: int) -> str:
    if cap_remaining < 0:
        return t.gettext("No limit in this category")
    if cap_remaining == 0:
        return t.gettext(
            "The category's limit is reached for now: it adds no more points until older ones age out"
        )
    return t.gettext(
        "Can still add up to %(points)s points in this category (limit per %(days)s days)",
        points=t.number(cap_remaining),
        days=t.number(window_days),
    )


def credit(t: Localiser, x: r.Explanation) -> CreditView:
    counting = [e for e in x.entries if e.counting]
    disputed = [e for e in counting if e.entry.status == "disputed"]
    return CreditView(
        score=t.number(x.score),
        tier=x.tier,
        tier_meaning=words.tier_meaning(t, x.tier),
        base=t.number(x.base_score),
        bounds=t.gettext("%(min)s to %(max)s", min=t.number(x.min_score), max=t.number(x.max_score)),
        policy_version=x.policy_version,
        as_of=t.datetime(x.as_of),
        tiers=tier_rows(t, x.tiers, x.tier),
        categories=category_rows(t, x.categories),
        lists=tuple(ListRow(words.list_name(t, m.name), m.name, m.reasons, m.entry_ids) for m in x.lists),
        not_on_a_list=not x.lists,
        next_tier=next_tier_text(t, x.next_tier),
        behaviours=tuple(
            BehaviourRow(
                title=b.title,
                description=words.general(b.description),
                points=b.points if not b.points.lstrip("-").isdigit() else t.signed(int(b.points)),
                category=words.category(t, b.category),
                room=room_text(t, b.cap_remaining, x.cap_window_days),
            )
            for b in x.positive_behaviours
        ),
        cap_window=t.number(x.cap_window_days),
        projection=tuple(
            ProjectionRow(
                date=t.date(p.at),
                score=t.number(p.score),
                tier=p.tier,
                stops=t.ngettext(
                    "%(num)s entry stops counting", "%(num)s entries stop counting", len(p.expiring_entry_ids)
                ),
            )
            for p in x.projection
        ),
        counting=len(counting),
        disputed=len(disputed),
    )
