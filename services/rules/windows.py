"""Event-time pattern selection for windows, sequences and caps: pure functions, no durable-rules.

durable-rules decides which events match a rule's conditions (and, for sequences,
which pairs join on the correlation attribute). What it cannot do is decide, in event
time and with late data, which of those events form a window that has not fired
yet: its own count/distinct/cap operators work on arrival order inside a session, and
a session cannot outlive a batch (1024-session limit). These functions make that
decision from the subject's matched events, new and historical, and the outcomes
earlier evaluations emitted, as a deterministic function of those inputs, so that
re-evaluating the same inputs (after a crash or a restart) gives the same firings.

The canonical choice is "earliest first": a window is formed by the earliest unused
events that fit in its duration, and a sequence's second step takes the earliest
unused first step before it. The *_region functions settle one rule's region of event
time against the outcomes emitted before, so that the result does not depend on the
order events arrived in. docs/rules.md ("Event time") states the semantics these implement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, Protocol, TypeVar


class Timed(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def occurred_at(self) -> datetime: ...


T = TypeVar("T", bound=Timed)
P = TypeVar("P")
S = TypeVar("S", bound=tuple[Timed, ...])


def event_time_order(event: Timed) -> tuple[datetime, str]:
    """The total order every selection uses: event time, then key for events at the same instant."""
    return (event.occurred_at, event.key)


def select_windows(events: Iterable[T], count: int, within: timedelta) -> list[tuple[T, ...]]:
    """Disjoint windows of ``count`` events, each spanning at most ``within``, earliest first.

    ``events`` are the candidates (matching, same subject and group, not used by an
    earlier firing). Scanning in event time, the earliest unused event starts a window
    with the next ``count - 1`` unused events no later than ``within`` after it; an
    event that cannot start one can belong to none (any window holding it would start
    at or before it), so it is passed over.
    """
    ordered = sorted(events, key=event_time_order)
    used = [False] * len(ordered)
    windows: list[tuple[T, ...]] = []
    for start, first in enumerate(ordered):
        if used[start]:
            continue
        deadline = first.occurred_at + within
        chosen = [start]
        for later in range(start + 1, len(ordered)):
            if len(chosen) == count or ordered[later].occurred_at > deadline:
                break
            if not used[later]:
                chosen.append(later)
        if len(chosen) == count:
            for position in chosen:
                used[position] = True
            windows.append(tuple(ordered[position] for position in chosen))
    return windows


def select_pairs(pairs: Iterable[tuple[T, T]], within: timedelta) -> list[tuple[T, T]]:
    """Disjoint (first, second) pairs, each second strictly after its first and at most ``within`` later.

    ``pairs`` are the joins durable-rules found (steps' conditions and correlation),
    among events no earlier firing used. Seconds are taken in event time, each with
    the earliest first still unused; an event is in at most one chosen pair, in
    either role.
    """
    firsts_of: dict[str, list[T]] = {}
    seconds: dict[str, T] = {}
    for first, second in pairs:
        if first.occurred_at < second.occurred_at <= first.occurred_at + within:
            firsts_of.setdefault(second.key, []).append(first)
            seconds[second.key] = second
    used: set[str] = set()
    chosen: list[tuple[T, T]] = []
    for second in sorted(seconds.values(), key=event_time_order):
        if second.key in used:
            continue
        for first in sorted(firsts_of[second.key], key=event_time_order):
            if first.key not in used:
                used.update((first.key, second.key))
                chosen.append((first, second))
                break
    return chosen


def period_of(at: datetime, anchor: datetime, per: timedelta) -> int:
    """Which cap period ``at`` falls in: periods of ``per`` laid end to end from ``anchor``."""
    return (at - anchor) // per


def capped(cap: int, earlier: Iterable[int], new: Sequence[int]) -> list[int]:
    """What each new firing of one period may give, in absolute points.

    ``earlier`` are the uncapped absolute points of the period's firings from earlier
    evaluations. Whatever order those were evaluated in, each received
    min(points, cap - given so far), so together they gave exactly
    min(cap, sum(earlier)): the new firings (in event time order) share what is left.
    """
    given = min(cap, sum(earlier))
    allowed: list[int] = []
    for points in new:
        share = min(points, cap - given)
        allowed.append(share)
        given += share
    return allowed


@dataclass(frozen=True)
class PriorOutcome:
    """An active outcome an earlier evaluation emitted for a window, sequence or capped rule.

    ``event_keys`` are in event-time order; ``first_at`` and ``last_at`` are the occurred_at
    of the first and last of them (equal for a per-event outcome of a capped rule).
    """

    outcome_id: str
    rule_id: str
    subject_key: str
    event_keys: tuple[str, ...]
    first_at: datetime
    last_at: datetime
    points: int


@dataclass(frozen=True)
class Region(Generic[P]):
    """What changes in one rule's region of event time: patterns to fire, prior outcomes to reverse."""

    fire: list[P]
    superseded: list[PriorOutcome]


# The canonical choice of every selection below is a left-to-right scan in event time
# (select_windows, select_pairs, capped): what it decides before some instant depends
# only on events before that instant (plus, for a window, its duration). So when new
# events arrive (or one is retracted) at ``since``, every prior outcome that starts
# early enough is already canonical and stays ("frozen", its events used), and only the
# region after it is scanned again, with every event there, new and old. Comparing
# that region's canonical patterns with its prior outcomes says what to fire and what
# to reverse; the result is the same whatever order and batches the events came in.


def window_region(
    matched: Iterable[T],
    prior: Sequence[PriorOutcome],
    *,
    since: datetime,
    count: int,
    within: timedelta,
    group_of: Callable[[T], tuple[bool, object]],
) -> Region[tuple[T, ...]]:
    """A window rule's region from ``since - within`` on. ``group_of(event)`` is
    (belongs to a group, the group's value)."""
    start = since - within
    frozen = {key for o in prior if o.first_at < start for key in o.event_keys}
    groups: dict[object, list[T]] = {}
    for event in matched:
        if event.occurred_at < start or event.key in frozen:
            continue
        belongs, value = group_of(event)
        if belongs:
            groups.setdefault(value, []).append(event)
    canonical = [chosen for members in groups.values() for chosen in select_windows(members, count, within)]
    return _diff(canonical, [o for o in prior if o.first_at >= start])


def pair_region(
    pairs: Iterable[tuple[T, T]], prior: Sequence[PriorOutcome], since: datetime, within: timedelta
) -> Region[tuple[T, T]]:
    """A sequence rule's region: every pair whose second step is at or after ``since``."""
    frozen = {key for o in prior if o.last_at < since for key in o.event_keys}
    candidates = [
        (first, second)
        for first, second in pairs
        if second.occurred_at >= since and first.key not in frozen and second.key not in frozen
    ]
    return _diff(list(select_pairs(candidates, within)), [o for o in prior if o.last_at >= since])


def cap_region(
    matched: Iterable[tuple[T, int]],
    prior: Sequence[PriorOutcome],
    *,
    since: datetime,
    anchor: datetime,
    per: timedelta,
    cap: int,
) -> Region[tuple[T, int]]:
    """A capped per-event rule's region: every period from ``since``'s on, each period's
    firings given ``min(points, what is left)`` in event-time order. ``matched`` are
    (event, uncapped points) of the rule's matches, new and old."""
    first_period = period_of(since, anchor, per)
    by_period: dict[int, list[tuple[T, int]]] = {}
    for event, points in sorted(matched, key=lambda pair: event_time_order(pair[0])):
        period = period_of(event.occurred_at, anchor, per)
        if period >= first_period:
            by_period.setdefault(period, []).append((event, points))
    canonical: list[tuple[T, int]] = []
    for firings in by_period.values():
        allowed = capped(cap, (), [abs(points) for _, points in firings])
        for (event, points), share in zip(firings, allowed, strict=True):
            if share > 0:
                canonical.append((event, share if points > 0 else -share))
    open_ = [o for o in prior if period_of(o.first_at, anchor, per) >= first_period]
    fire_keys = {(event.key, points) for event, points in canonical}
    kept = {(o.event_keys[0], o.points) for o in open_} & fire_keys
    return Region(
        fire=[(event, points) for event, points in canonical if (event.key, points) not in kept],
        superseded=[o for o in open_ if (o.event_keys[0], o.points) not in kept],
    )


def _diff(canonical: list[S], open_: Sequence[PriorOutcome]) -> Region[S]:
    """Canonical patterns (tuples of events) against the prior outcomes of the same region,
    compared by their sets of events."""
    wanted = {frozenset(e.key for e in pattern) for pattern in canonical}
    have = {frozenset(o.event_keys) for o in open_}
    return Region(
        fire=[p for p in canonical if frozenset(e.key for e in p) not in have],
        superseded=[o for o in open_ if frozenset(o.event_keys) not in wanted],
    )
