"""A subject's score history as corrected (pure domain): recomputed from the ledger as if
every reversed (void) entry had never been recorded and every entry had been known when
its event happened (`View.AS_CORRECTED`).

Score stores only the history as known. On the corrected timeline the score can change
only at an entry's event time (occurred_at; a replacement event recorded late counts from
its own event time), at its visible_until, at a pause boundary that is not void (a
dispute's lapse and decision, an approved repair) and at a policy activation; each of
those instants is scored with `compute_score` under the policy in force then, and a row
is written where the score, tier or lists changed. Rows are numbered oldest first
(`history_id`), so pages use the same tokens as the history as known.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.query.domain import HistoryRow
from services.score.domain import (
    DISPUTE,
    ENTRIES,
    EXPIRY,
    POLICY,
    REPAIR,
    ScoredEntry,
    ScoreResult,
    ScoreState,
    View,
    compute_score,
    list_names,
    visible_until,
)
from services.score.policy import PolicyBook


def corrected_history(
    entries: Sequence[ScoredEntry], book: PolicyBook, kind: str, until: datetime
) -> list[HistoryRow]:
    """Every change of the corrected timeline up to `until`, oldest first."""
    live = [e for e in entries if not e.void]
    if not live:
        return []
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
    rows: list[HistoryRow] = []
    state: ScoreState | None = None
    previous: ScoreResult | None = None
    for at in sorted(instants):
        policy = book.at(at).for_kind(kind)
        result = compute_score(live, policy, at, view=View.AS_CORRECTED)
        if previous is not None and result.state == state:
            previous = result
            continue
        before_ids = {c.entry_id for c in previous.counted} if previous is not None else set()
        now_ids = {c.entry_id for c in result.counted}
        added = sorted(e.entry_id for e in live if e.occurred_at == at)
        stopped = before_ids - now_ids
        expired = sorted(
            e for e in stopped if any(x.entry_id == e and visible_until(x, policy) == at for x in live)
        )
        ended = sorted(stopped - set(expired))
        resumed = sorted((now_ids - before_ids) - set(added))
        kinds = pause_kinds.get(at, {})
        cause = (
            ENTRIES
            if added
            else POLICY
            if at in activations
            else REPAIR
            if REPAIR in kinds
            else DISPUTE
            if DISPUTE in kinds
            else EXPIRY
        )
        rows.append(
            HistoryRow(
                history_id=len(rows) + 1,
                changed_at=at,
                recorded_at=until,
                cause=cause,
                policy_version=result.policy_version,
                score_before=None if state is None else state_score(previous),
                score=result.score,
                tier_before="" if previous is None else previous.tier,
                tier=result.tier,
                lists_before=list_names(state),
                lists=list_names(result.state),
                added_entry_ids=tuple(added),
                expired_entry_ids=tuple(expired),
                ended_entry_ids=tuple(ended),
                resumed_entry_ids=tuple(resumed),
                note="as corrected",
            )
        )
        state, previous = result.state, result
    return rows


def state_score(result: ScoreResult | None) -> int | None:
    return None if result is None else result.score
