"""A subject's score history: each change of score, tier or lists with its cause
(new entries, expiry, policy, dispute, repair, correction), replayed from the ledger.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from domain.entries import (
    CORRECTION,
    DISPUTE,
    REGROUPED,
    ReversalRecord,
    Scorable,
    View,
    _boundaries,
    _pauses,
    visible_until,
)
from domain.policy import SubjectPolicy
from domain.scoring import ScoreResult, ScoreState, compute_score

ENTRIES = "entries"
EXPIRY = "expiry"
POLICY = "policy"
# DISPUTE, REPAIR and CORRECTION (above) are causes too.


@dataclass(frozen=True)
class Change:
    """One history row: the score, tier or list membership changed at `changed_at`, or a
    due-process act happened then (those are written even when nothing changed).

    `ended_entry_ids` stopped counting by a decision, a correction or a dispute's lapse;
    `resumed_entry_ids` count again (a dispute upheld after its deadline); `note` says
    what happened ("dispute 7 filed", "event library/ev-9 retracted").
    """

    changed_at: datetime
    cause: str
    before: ScoreState | None
    after: ScoreResult
    added_entry_ids: tuple[str, ...] = ()
    expired_entry_ids: tuple[str, ...] = ()
    ended_entry_ids: tuple[str, ...] = ()
    resumed_entry_ids: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Event:
    """What happens at the end of a replay (its `until`): its history cause, the entries it
    adds, ends or resumes, and whether it is written even if nothing changed (`always`:
    every due-process act is part of the subject's history)."""

    cause: str
    added: tuple[str, ...] = ()
    ended: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()
    note: str = ""
    always: bool = False


def lapses_at(entries: Sequence[Scorable], at: datetime) -> list[tuple[str, str]]:
    """(dispute id, entry id) of every dispute whose deadline passes undecided at `at`."""
    found = []
    for e in entries:
        for p in _pauses(e) or ():
            if p.kind == DISPUTE and p.start == at and (p.end is None or p.end > at) and e.recorded_at < at:
                found.append((p.ref, e.entry_id))
    return sorted(found)


def _lapse_note(lapses: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"dispute {d} undecided at its deadline" for d, _ in lapses)


def replay(
    entries: Sequence[Scorable],
    policy: SubjectPolicy,
    *,
    before: ScoreState | None,
    since: datetime | None,
    until: datetime,
    added: Collection[str] = (),
    cause: str = ENTRIES,
    event: Event | None = None,
    view: View = View.AS_KNOWN,
) -> tuple[list[Change], ScoreResult]:
    """Every change between the state stored at `since` and `until`, at the instant it happened.

    With no new event, an entry stops or starts counting only at its visible_until or at
    a pause boundary (a dispute's deadline), so the instants to look at are those in
    (since, until); at `until` itself the `event` applies (new entries, a policy, a
    due-process act; `added`/`cause` are the older spelling of an ENTRIES or POLICY
    event). Expiry and a dispute's lapse therefore appear in history at the exact instant
    they took effect, however late the sweep that wrote them ran. A lapse is always
    written (cause DISPUTE), even when the score does not change.
    """
    if event is None:
        event = Event(cause, added=tuple(sorted(added))) if (added or cause == POLICY) else None
    instants: set[datetime] = set()
    if since is not None:
        for e in entries:
            for b in (visible_until(e, policy), *_boundaries(e)):
                if since < b < until and e.recorded_at < b:
                    instants.add(b)
    changes: list[Change] = []
    state = before
    result: ScoreResult | None = None
    for at in [*sorted(instants), until]:
        result = compute_score(entries, policy, at, view=view)
        expired = tuple(
            sorted(e.entry_id for e in entries if visible_until(e, policy) == at and e.recorded_at < at)
        )
        lapses = lapses_at(entries, at) if since is None or at > since else []
        final = at == until and event is not None
        if lapses:
            changes.append(
                Change(
                    at,
                    DISPUTE,
                    state,
                    result,
                    (),
                    expired,
                    ended_entry_ids=tuple(sorted({e for _, e in lapses})),
                    note=_lapse_note(lapses),
                )
            )
            state = result.state
            expired = ()
        if final:
            assert event is not None
            if result.state != state or event.always:
                changes.append(
                    Change(
                        at,
                        event.cause,
                        state,
                        result,
                        tuple(sorted(event.added)),
                        expired,
                        tuple(sorted(event.ended)),
                        tuple(sorted(event.resumed)),
                        event.note,
                    )
                )
        elif result.state != state and not lapses:
            changes.append(Change(at, EXPIRY, state, result, (), expired))
        state = result.state
    assert result is not None
    return changes, result


def corrections(done: Sequence[ReversalRecord]) -> dict[str, Event]:
    """One CORRECTION history event per subject for the reversals just applied (their
    subject_key is the reversed entry's)."""
    by_subject: dict[str, list[ReversalRecord]] = {}
    for r in done:
        by_subject.setdefault(r.subject_key, []).append(r)
    return {
        key: Event(
            CORRECTION,
            ended=tuple(sorted({r.outcome_id for r in items})),
            note="; ".join(sorted({_correction_note(r) for r in items})),
            always=True,
        )
        for key, items in by_subject.items()
    }


def _correction_note(r: ReversalRecord) -> str:
    if r.cause == REGROUPED:
        return f"event {r.event} arrived late and regrouped"
    return f"event {r.event} retracted"
