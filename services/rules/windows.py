"""Event-time pattern selection for windows, sequences and caps: pure functions, no durable-rules.

durable-rules decides which events match a rule's conditions (and, for sequences,
which pairs join on the correlation attribute). What it cannot do is decide, in event
time and with late data, which of those events form a window that has not fired
yet: its own count/distinct/cap operators work on arrival order inside a session, and
a session cannot outlive a batch (1024-session limit). These functions make that
decision from the subject's matched events, new and historical, and the events
earlier firings already used, as a deterministic function of those inputs, so that
re-evaluating the same inputs (after a crash or a restart) gives the same firings.

The canonical choice is "earliest first": a window is formed by the earliest unused
events that fit in its duration, and a sequence's second step takes the earliest
unused first step before it. docs/rules.md states the semantics these implement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Protocol, TypeVar


class Timed(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def occurred_at(self) -> datetime: ...


T = TypeVar("T", bound=Timed)


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
