"""*History*: the score over time, as known then and as corrected, as a chart drawn on the
server (an SVG built from the data: no script, no inline style, readable with JavaScript
off) and as a table with the cause of every change (the chart's text alternative)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words

WIDTH, HEIGHT = 720, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 36


@dataclass(frozen=True)
class Tick:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Threshold:
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot_left: int
    plot_right: int
    plot_top: int
    plot_bottom: int
    known: str  # SVG polyline points
    corrected: str  # "" when identical to known
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    thresholds: tuple[Threshold, ...]
    summary: str  # the chart's description, for screen readers


@dataclass(frozen=True)
class ChangeRow:
    date: str
    cause: str
    before: str
    after: str
    tier: str  # "A → AA" or "A"
    note: str
    entry_links: tuple[tuple[str, str], ...]  # (what happened to it, entry id)


@dataclass(frozen=True)
class HistoryView:
    chart: Chart | None
    known: tuple[ChangeRow, ...]
    corrected: tuple[ChangeRow, ...]
    differs: bool


def steps(changes: tuple[r.ScoreChange, ...], until: datetime) -> list[tuple[datetime, int]]:
    """The score as a step function: (instant, score) corners, oldest first, held until `until`."""
    ordered = sorted((c for c in changes if c.changed_at is not None), key=lambda c: c.changed_at)  # type: ignore[arg-type,return-value]
    corners: list[tuple[datetime, int]] = []
    for change in ordered:
        assert change.changed_at is not None
        if corners:
            corners.append((change.changed_at, corners[-1][1]))
        corners.append((change.changed_at, change.score))
    if corners and until > corners[-1][0]:
        corners.append((until, corners[-1][1]))
    return corners


def nice_step(span: float, count: int = 4) -> int:
    """A round tick interval (1, 2, 5 times a power of ten) giving about `count` ticks."""
    raw = max(span / count, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return int(factor * power)
    return int(10 * power)


def chart(
    t: Localiser,
    known: tuple[r.ScoreChange, ...],
    corrected: tuple[r.ScoreChange, ...],
    now: datetime,
    tiers: tuple[r.Tier, ...] = (),
) -> Chart | None:
    known_steps = steps(known, now)
    corrected_steps = steps(corrected, now)
    if not known_steps:
        return None
    every = known_steps + corrected_steps
    start, end = min(p[0] for p in every), max(*(p[0] for p in every), now)
    low, high = min(p[1] for p in every), max(p[1] for p in every)
    step = nice_step(max(high - low, 10))
    low, high = (low // step) * step, -((-high) // step) * step
    if high == low:
        high = low + step
    seconds = max((end - start).total_seconds(), 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        return round(LEFT + plot_w * (at - start).total_seconds() / seconds, 1)

    def y(score: float) -> float:
        return round(TOP + plot_h * (high - score) / (high - low), 1)

    def line(points: list[tuple[datetime, int]]) -> str:
        return " ".join(f"{x(at)},{y(score)}" for at, score in points)

    y_ticks = tuple(Tick(LEFT, y(v), t.number(v)) for v in range(low, high + 1, step))
    x_ticks = tuple(
        Tick(x(at), HEIGHT - BOTTOM, t.date(at))
        for at in dict.fromkeys((start, start + (end - start) / 2, end))
    )
    thresholds = tuple(
        Threshold(y(tier.min_score), tier.name) for tier in tiers if low < tier.min_score < high
    )
    last = known_steps[-1][1]
    summary = t.gettext(
        "Your score from %(start)s to %(end)s: lowest %(low)s, highest %(high)s, now %(now)s.",
        start=t.date(start),
        end=t.date(end),
        low=t.number(min(p[1] for p in known_steps)),
        high=t.number(max(p[1] for p in known_steps)),
        now=t.number(last),
    )
    corrected_line = line(corrected_steps) if corrected_steps and corrected_steps != known_steps else ""
    return Chart(
        WIDTH,
        HEIGHT,
        LEFT,
        WIDTH - RIGHT,
        TOP,
        HEIGHT - BOTTOM,
        line(known_steps),
        corrected_line,
        x_ticks,
        y_ticks,
        thresholds,
        summary,
    )


def change_row(t: Localiser, c: r.ScoreChange) -> ChangeRow:
    links = (
        *((t.gettext("added"), e) for e in c.added_entry_ids),
        *((t.gettext("expired"), e) for e in c.expired_entry_ids),
        *((t.gettext("stopped counting"), e) for e in c.ended_entry_ids),
        *((t.gettext("counts again"), e) for e in c.resumed_entry_ids),
    )
    tier = f"{c.tier_before} \u2192 {c.tier}" if c.tier_before and c.tier_before != c.tier else c.tier
    return ChangeRow(
        date=t.datetime(c.changed_at),
        cause=words.cause(t, c.cause),
        before=t.number(c.score_before) if c.score_before is not None else "",
        after=t.number(c.score),
        tier=tier,
        note=c.note,
        entry_links=tuple(links),
    )


def history(
    t: Localiser,
    known: tuple[r.ScoreChange, ...],
    corrected: tuple[r.ScoreChange, ...],
    now: datetime,
    tiers: tuple[r.Tier, ...] = (),
) -> HistoryView:
    # The corrected timeline dates changes by event time, so instants nearly always differ;
    # the scores it passes through are what tells a correction.
    known_scores = [c.score for c in known]
    corrected_scores = [c.score for c in corrected]
    return HistoryView(
        chart=chart(t, known, corrected, now, tiers),
        known=tuple(change_row(t, c) for c in known),
        corrected=tuple(change_row(t, c) for c in corrected),
        differs=known_scores != corrected_scores,
    )
