"""A subject's score history as corrected (pure domain): recomputed from the ledger as if
every reversed (void) entry had never been recorded and every entry had been known when
its event happened (`View.AS_CORRECTED`).

Score stores only the history as known. On the corrected timeline the score can change
only at an entry's event time (occurred_at; a replacement event recorded late counts from
its own event time), at its visible_until, at a pause boundary that is not void (a
dispute's lapse and decision, an approved repair) and at a policy activation; each of
those instants is scored under the policy in force then, and a row is written where the
score, tier or lists changed. Rows are numbered oldest first (`history_id`), so pages use
the same tokens as the history as known.

`corrected_history_by_definition` scores every instant from scratch with `compute_score`:
it is the definition, and costs O(n²) in the ledger's n entries. `corrected_history`
computes the same rows in O(n log n) (plus O(n) per policy activation): between
activations an entry starts or stops counting only at one of its own instants, and its
capped points do not change (on the corrected timeline the entries known at an instant
are a prefix in event-time order, and a cap grant looks only backwards), so it keeps the
counting entries and their sum and updates them at each instant from the entries that
have a boundary there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from domain.entries import DISPUTE, REPAIR, ScoredEntry, View, counts_at, visible_until
from domain.history import ENTRIES, EXPIRY, POLICY
from domain.policy import PolicyBook, SubjectPolicy
from domain.scoring import ScoreResult, ScoreState, compute_score, granted_points, list_names, on_lists
from services.query.read_models import HistoryRow


@dataclass(frozen=True)
class _Timeline:
    """The instants at which the corrected score may change, and what happens at each."""

    live: list[ScoredEntry]
    instants: list[datetime]
    activations: set[datetime]
    # instant -> pause kind -> entry ids with a pause boundary of that kind there
    pause_kinds: dict[datetime, dict[str, set[str]]]


def _timeline(entries: Sequence[ScoredEntry], book: PolicyBook, kind: str, until: datetime) -> _Timeline:
    live = [e for e in entries if not e.void]
    if not live:
        return _Timeline([], [], set(), {})
    first = min(e.occurred_at for e in live)
    activations = {a.activated_at for a in book.activations if first < a.activated_at <= until}
    instants: set[datetime] = set(activations)
    pause_kinds: dict[datetime, dict[str, set[str]]] = {}
    for e in live:
        if e.occurred_at <= until:
            instants.add(e.occurred_at)
        for a in book.activations:
            ends = visible_until(e, a.policy.for_kind(kind))
            if e.occurred_at < ends <= until:
                instants.add(ends)
        for p in e.pauses:
            for b in (p.start, p.end):
                if b is not None and e.occurred_at < b <= until:
                    instants.add(b)
                    pause_kinds.setdefault(b, {}).setdefault(p.kind, set()).add(e.entry_id)
    return _Timeline(live, sorted(instants), activations, pause_kinds)


def _row(
    number: int,
    timeline: _Timeline,
    at: datetime,
    until: datetime,
    *,
    previous: ScoreState | None,
    now: ScoreState,
    policy_version: str,
    added: Iterable[str],
    stopped: set[str],
    started: set[str],
    expired: set[str],
) -> HistoryRow:
    """The history row of a change at `at`: `stopped` and `started` are the ids of the
    entries that stopped and started counting there, `expired` those of them whose
    visible_until it is."""
    added = sorted(added)
    kinds = timeline.pause_kinds.get(at, {})
    cause = (
        ENTRIES
        if added
        else POLICY
        if at in timeline.activations
        else REPAIR
        if REPAIR in kinds
        else DISPUTE
        if DISPUTE in kinds
        else EXPIRY
    )
    return HistoryRow(
        history_id=number,
        changed_at=at,
        recorded_at=until,
        cause=cause,
        policy_version=policy_version,
        score_before=None if previous is None else previous.score,
        score=now.score,
        tier_before="" if previous is None else previous.tier,
        tier=now.tier,
        lists_before=list_names(previous),
        lists=list_names(now),
        added_entry_ids=tuple(added),
        expired_entry_ids=tuple(sorted(expired)),
        ended_entry_ids=tuple(sorted(stopped - expired)),
        resumed_entry_ids=tuple(sorted(started - set(added))),
        note="as corrected",
    )


def corrected_history_by_definition(
    entries: Sequence[ScoredEntry], book: PolicyBook, kind: str, until: datetime
) -> list[HistoryRow]:
    """Every change of the corrected timeline up to `until`, oldest first: each instant
    scored from scratch (the definition; quadratic, kept to test and benchmark
    `corrected_history` against)."""
    timeline = _timeline(entries, book, kind, until)
    live = timeline.live
    rows: list[HistoryRow] = []
    state: ScoreState | None = None
    previous: ScoreResult | None = None
    for at in timeline.instants:
        policy = book.at(at).for_kind(kind)
        result = compute_score(live, policy, at, view=View.AS_CORRECTED)
        if previous is not None and result.state == state:
            previous = result
            continue
        before_ids = {c.entry_id for c in previous.counted} if previous is not None else set()
        now_ids = {c.entry_id for c in result.counted}
        stopped = before_ids - now_ids
        expired = {
            e for e in stopped if any(x.entry_id == e and visible_until(x, policy) == at for x in live)
        }
        added = [e.entry_id for e in live if e.occurred_at == at]
        rows.append(
            _row(
                len(rows) + 1,
                timeline,
                at,
                until,
                previous=state,
                now=result.state,
                policy_version=result.policy_version,
                added=added,
                stopped=stopped,
                started=now_ids - before_ids,
                expired=expired,
            )
        )
        state, previous = result.state, result
    return rows


@dataclass
class _Tally:
    """The entries counting at one instant under one policy, by position in the ledger, and
    what the score needs of them."""

    policy: SubjectPolicy
    grants: dict[str, int]
    # visible_until under `policy` -> positions of the entries that stop counting then
    ends: dict[datetime, list[int]]
    counting: set[int] = field(default_factory=set)
    points: int = 0
    negatives: int = 0
    flagged: int = 0

    @classmethod
    def of(cls, live: Sequence[ScoredEntry], policy: SubjectPolicy, at: datetime) -> _Tally:
        ends: dict[datetime, list[int]] = {}
        for i, e in enumerate(live):
            ends.setdefault(visible_until(e, policy), []).append(i)
        tally = cls(policy, granted_points(live, policy), ends)
        tally.update(live, range(len(live)), at)
        return tally

    def update(
        self, live: Sequence[ScoredEntry], positions: Iterable[int], at: datetime
    ) -> tuple[set[int], set[int]]:
        """Re-decide whether the entries at `positions` count at `at`; (started, stopped)."""
        started: set[int] = set()
        stopped: set[int] = set()
        for i in positions:
            counts = counts_at(live[i], self.policy, at, View.AS_CORRECTED)
            if counts == (i in self.counting):
                continue
            e = live[i]
            sign = 1 if counts else -1
            (started if counts else stopped).add(i)
            (self.counting.add if counts else self.counting.discard)(i)
            self.points += sign * self.grants[e.entry_id]
            self.negatives += sign * (e.points < 0)
            self.flagged += sign * e.black_list
        return started, stopped

    def state(self) -> ScoreState:
        policy = self.policy
        score = policy.clamp(policy.base + self.points)
        tier = policy.tier_of(score)
        red, black = on_lists(tier, self.negatives > 0, self.flagged > 0, policy)
        return ScoreState(score, tier, red, black)


def corrected_history(
    entries: Sequence[ScoredEntry], book: PolicyBook, kind: str, until: datetime
) -> list[HistoryRow]:
    """Every change of the corrected timeline up to `until`, oldest first (the same rows as
    `corrected_history_by_definition`, incrementally)."""
    timeline = _timeline(entries, book, kind, until)
    live = timeline.live
    # The entries that may start or stop counting at an instant whatever the policy: their
    # event time and their pause boundaries.
    touched: dict[datetime, list[int]] = {}
    for i, e in enumerate(live):
        touched.setdefault(e.occurred_at, []).append(i)
        for p in e.pauses:
            for b in (p.start, p.end):
                if b is not None:
                    touched.setdefault(b, []).append(i)
    rows: list[HistoryRow] = []
    state: ScoreState | None = None
    tally: _Tally | None = None
    for at in timeline.instants:
        policy = book.at(at).for_kind(kind)
        if tally is None or (policy is not tally.policy and policy != tally.policy):
            before = set() if tally is None else tally.counting
            tally = _Tally.of(live, policy, at)
            started, stopped = tally.counting - before, before - tally.counting
        else:
            started, stopped = tally.update(live, [*touched.get(at, ()), *tally.ends.get(at, ())], at)
        now = tally.state()
        if state is not None and now == state:
            continue
        added = {i for i in touched.get(at, ()) if live[i].occurred_at == at}
        rows.append(
            _row(
                len(rows) + 1,
                timeline,
                at,
                until,
                previous=state,
                now=now,
                policy_version=tally.policy.version,
                added=[live[i].entry_id for i in added],
                stopped={live[i].entry_id for i in stopped},
                started={live[i].entry_id for i in started},
                expired={live[i].entry_id for i in stopped if visible_until(live[i], policy) == at},
            )
        )
        state = now
    return rows
