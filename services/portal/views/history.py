"""*History*: the score over time, as known then and as corrected, as a chart (drawn by
services.portal.charts from the `Chart` below and served as an image) and as a table with the
cause of every change (the chart's text alternative)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import words

# A shorter history is drawn over a week, so the date axis shows days rather than hours.
SHORTEST_SPAN = timedelta(days=7)


@dataclass(frozen=True)
class Series:
    label: str
    # (instant, score) at each change, oldest first, and the last score held until now:
    # drawn as steps, the score holding until the next change.
    points: tuple[tuple[datetime, int], ...]


@dataclass(frozen=True)
class Threshold:
    score: int
    label: str


@dataclass(frozen=True)
class Chart:
    """What the chart shows, every word already in the reader's language."""

    title: str
    summary: str  # the score and its trend in a sentence: the image's alt text and <desc>
    score_label: str  # the vertical axis
    start: datetime
    end: datetime
    known: Series
    corrected: Series | None  # None when no correction changed a score
    thresholds: tuple[Threshold, ...]


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


def timeline(changes: tuple[r.ScoreChange, ...], until: datetime) -> tuple[tuple[datetime, int], ...]:
    """(instant, score) after each change, oldest first, and the last score again at `until`."""
    dated = sorted(((c.changed_at, c.score) for c in changes if c.changed_at is not None), key=lambda p: p[0])
    if dated and until > dated[-1][0]:
        dated.append((until, dated[-1][1]))
    return tuple(dated)


def thresholds(tiers: tuple[r.Tier, ...], low: int, high: int) -> tuple[int, ...]:
    """The thresholds of the tiers the score passed through and of the tier just above:
    the band the person is in, and the line to reach next."""
    starts = sorted(t.min_score for t in tiers)
    floor = max((s for s in starts if s <= low), default=None)
    ceiling = min((s for s in starts if s > high), default=None)
    return tuple(
        s
        for s in starts
        if (floor is None or s >= floor) and (ceiling is None or s <= ceiling) and s > min(starts)
    )


def summary(t: Localiser, points: tuple[tuple[datetime, int], ...]) -> str:
    start, end = t.date(points[0][0]), t.date(points[-1][0])
    scores = [score for _, score in points]
    first, now = scores[0], scores[-1]
    values = {
        "start": start,
        "end": end,
        "first": t.number(first),
        "now": t.number(now),
        "low": t.number(min(scores)),
        "high": t.number(max(scores)),
    }
    if now > first:
        return t.gettext(
            "Your score went up from %(first)s on %(start)s to %(now)s on %(end)s "
            "(lowest %(low)s, highest %(high)s).",
            **values,
        )
    if now < first:
        return t.gettext(
            "Your score went down from %(first)s on %(start)s to %(now)s on %(end)s "
            "(lowest %(low)s, highest %(high)s).",
            **values,
        )
    return t.gettext(
        "Your score is %(now)s on %(end)s, as it was on %(start)s (lowest %(low)s, highest %(high)s).",
        **values,
    )


def chart(
    t: Localiser,
    known: tuple[r.ScoreChange, ...],
    corrected: tuple[r.ScoreChange, ...],
    now: datetime,
    *,
    tiers: tuple[r.Tier, ...] = (),
    differs: bool = True,
) -> Chart | None:
    # The last scores are held to the end of the current hour rather than to this instant,
    # so the same history draws the same chart for an hour (drawn charts are cached).
    now = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    known_points = timeline(known, now)
    if not known_points:
        return None
    corrected_points = timeline(corrected, now) if differs else ()
    every = known_points + corrected_points
    end = max(*(at for at, _ in every), now)
    start = min(*(at for at, _ in every), end - SHORTEST_SPAN)
    scores = [score for _, score in every]
    return Chart(
        title=t.gettext("Your score over time"),
        summary=summary(t, known_points),
        score_label=t.gettext("Score"),
        start=start,
        end=end,
        known=Series(t.gettext("As known at the time"), known_points),
        corrected=Series(t.gettext("As corrected since"), corrected_points) if corrected_points else None,
        thresholds=tuple(
            Threshold(
                score,
                t.gettext(
                    "%(tier)s from %(score)s",
                    tier=next(tier.name for tier in tiers if tier.min_score == score),
                    score=t.number(score),
                ),
            )
            for score in thresholds(tiers, min(scores), max(scores))
        ),
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
    differs = [c.score for c in known] != [c.score for c in corrected]
    return HistoryView(
        chart=chart(t, known, corrected, now, tiers=tiers, differs=differs),
        known=tuple(change_row(t, c) for c in known),
        corrected=tuple(change_row(t, c) for c in corrected),
        differs=differs,
    )
