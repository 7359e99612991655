"""The live part of a subject's ledger: what a batch of new entries needs, so that its
rescore costs the same however long the subject's history is.

A batch's rescore (`Ledger._record_once`) replays the changes between the stored row's
instant `since` and `now` (`domain.history.replay`). This module picks, from entries the
store read by a range (`cutoff`), a set L whose replay gives exactly the whole ledger's
changes and result; when it cannot prove that, it answers None and the whole ledger is read.

Proof. Let `policy` be the subject's policy (the one the stored row was computed under).
An entry is *live* when it is new, or visible at `since` (visible_until >= since), or has
a pause boundary at or after `since`; any other entry is *dead*. In replay and compute_score
at every instant `at` in [since, now] a dead entry never counts (at >= since >
visible_until), adds no instant, boundary, expiry or lapse (all are >= since), so it acts
only through the caps: as a known positive of a capped category, its grant takes part in
the rolling sum of later positives of that category (`domain.scoring.granted_points`).

1. Range. The store reads every entry with occurred_at >= `cutoff` = since - (the longest
   visibility + the cap window) and every entry with a dispute, repair or reversal, and adds
   the new entries (not stored yet: the batch inserts them when it saves the rescore). An
   entry it did not read is dead (occurred_at + visibility < since, no pause)
   and more than a window before any live positive whose occurred_at is >= cutoff + window;
   `live_part` refuses (None) when a live positive of a capped category is earlier than that.
2. Pins. For a capped category c let T be the earliest occurred_at of its live positives.
   Each live positive's window (T - window, ...] is inside the range. L holds the live
   entries and, *pinned*, the dead positives of c after T - window, each with its points
   replaced by its stored grant g (`score_ledger.granted`). By induction in event-time
   order, granted_points over L gives every entry its whole-ledger grant: a pinned entry's
   sum in window over L is a part of its whole-ledger sum (grants are >= 0), so
   min(g, limit - sum) = g since g <= limit - (whole sum); a live entry's window holds
   the same entries with the same grants. Dead entries never count, so their replaced
   points show nowhere else (caps withheld, lists and breakdowns are of counting entries).
3. Stored grants are true. Every rescore writes the grants it computed at `now` that
   changed (a whole-ledger rescore: of every capped positive; a batch: of the live ones,
   the new among them, whose rows it inserts with their grant in the same transaction) and
   `recorded_through`, the latest recorded_at in the ledger it saw.
   A grant changes only when a positive earlier in its category's event-time order becomes
   known or stops being known (a new entry, a reversal, an overturned dispute) or the caps
   change (a policy). Reversals, due-process acts and policies rescore the whole ledger; a
   batch refuses a new positive before a dead positive of its category (whose pinned grant
   would change), so only live grants change, and those it computes and writes. The
   instants before `now` are unaffected: the new entries are not known then. The fast path
   also requires the stored row to be of the active policy, `recorded_through` <= `since`
   <= now (else a batch whose clock was behind left a row older than its ledger), every
   read entry but the new ones recorded by `since`, and every pin stored.

Everything else (a first score, a positive older than a dead one of its category,
reversals, due-process acts, sweeps, policy changes, rows written before grants were
stored) is rescored from the whole ledger, as before; `Ledger.verify` still recomputes
every subject from its whole ledger.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

from domain.entries import ScoredEntry, _boundaries, known_at
from domain.policy import SubjectPolicy
from domain.scoring import granted_points


def reach(policy: SubjectPolicy) -> timedelta:
    """How far before the stored instant the range read goes: the longest visibility and
    the cap window."""
    return max(policy.visibility(s) for s in policy.visibility_days) + policy.caps.window


def cutoff(
    policy: SubjectPolicy,
    *,
    stored_version: str,
    since: datetime | None,
    recorded_through: datetime | None,
    now: datetime,
) -> datetime | None:
    """The earliest occurred_at a batch at `now` reads (floored to the day, so that a batch's
    subjects share a few ranges), or None when the stored row rules the live part out."""
    if since is None or recorded_through is None or stored_version != policy.version:
        return None
    if not recorded_through <= since <= now:
        return None
    day = (since - reach(policy)).astimezone(UTC).date()
    return datetime.combine(day, time(), UTC)


def live_part(
    read: Sequence[tuple[ScoredEntry, int | None]],
    policy: SubjectPolicy,
    *,
    since: datetime,
    floor: datetime,
    added: Collection[str],
) -> tuple[tuple[ScoredEntry, ...], dict[str, int | None]] | None:
    """L (the module's proof) from the entries read with their stored grants, and the
    stored grants of its live entries (those a rescore may rewrite); None when one of the
    proof's conditions fails."""
    visibility = {s: policy.visibility(s) for s in policy.visibility_days}
    capped = {}
    live: list[ScoredEntry] = []
    stored: dict[str, int | None] = {}
    new_positives: list[ScoredEntry] = []
    dead_positives: list[tuple[ScoredEntry, int | None]] = []
    # Per capped category: the earliest live positive, the latest dead one.
    earliest: dict[str, datetime] = {}
    latest: dict[str, tuple[datetime, str]] = {}
    for e, granted in read:
        c = e.category
        if c not in capped:
            capped[c] = policy.caps.limit(c) is not None
        positive = e.points > 0 and capped[c]
        new = e.entry_id in added
        if not new and e.recorded_at > since:
            return None
        if (
            new
            or e.occurred_at + visibility[e.severity] >= since
            or (e.pauses and any(b >= since for b in _boundaries(e)))
        ):
            live.append(e)
            stored[e.entry_id] = granted
            if positive:
                earliest[c] = min(earliest.get(c, e.occurred_at), e.occurred_at)
                if new:
                    new_positives.append(e)
        elif positive:
            dead_positives.append((e, granted))
            key = (e.occurred_at, e.entry_id)
            latest[c] = max(latest.get(c, key), key)
    for e in new_positives:
        if e.category in latest and (e.occurred_at, e.entry_id) <= latest[e.category]:
            return None
    window = policy.caps.window
    if any(t - window < floor for t in earliest.values()):
        return None
    pinned = []
    for e, granted in dead_positives:
        start = earliest.get(e.category)
        if start is None or e.occurred_at <= start - window:
            continue
        if granted is None:
            return None
        pinned.append(replace(e, points=granted))
    return (*live, *pinned), stored


def grants_to_store(
    entries: Sequence[ScoredEntry],
    policy: SubjectPolicy,
    now: datetime,
    *,
    added: Collection[str] | None,
    stored: Mapping[str, int | None],
    recorded_through: datetime | None,
    counted: Mapping[str, int],
) -> tuple[dict[str, int], datetime | None]:
    """What a rescore at `now` stores for the proof's step 3: the grants at `now` (0 for one
    not known then) of the capped positives listed in `stored` (of a live part: its live
    entries) that differ from their stored grant, and the row's recorded_through (of a
    live part, `added` given: from the stored one and the new entries). `counted`: the
    grants of the entries counting at `now` (the score's), which spare computing them
    again when every entry to store counts."""
    capped = [
        e
        for e in entries
        if e.points > 0 and e.entry_id in stored and policy.caps.limit(e.category) is not None
    ]
    if added is not None:
        new = [e.recorded_at for e in entries if e.entry_id in added]
        through = max([*new, *([recorded_through] if recorded_through else [])], default=None)
    else:
        through = max((e.recorded_at for e in entries), default=None)
    if not capped:
        return {}, through
    allowed = counted
    if any(e.entry_id not in counted for e in capped):
        allowed = granted_points([e for e in entries if known_at(e, now)], policy)
    wanted = {e.entry_id: allowed.get(e.entry_id, 0) for e in capped}
    return {k: g for k, g in wanted.items() if stored.get(k) != g}, through
