"""Each subject's score row, categories and history: locking them for a rescore, and
writing the rescore's results (shared by the ledger's and due process's transactions)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contracts.score_store import (
    Granted,
    StoredCategory,
    StoredEntry,
    StoredHistory,
    StoredScore,
    load_granted,
    load_recent,
)
from domain.entries import ScoredEntry
from domain.policy import ScorePolicy
from domain.scoring import ScoreState, list_names
from services.score.ledger_store import ConcurrentWrite, Rescored, SubjectLedger
from services.score.live import cutoff, live_part

# Core tables: the batch path writes by executemany, which the ORM's bulk operations
# cost about twice as much per row.
_SCORES = cast(sa.Table, StoredScore.__table__)
# A score row as an object (subject_pages) or as a Core row of its columns (a batch's locks).
_ScoreRow = StoredScore | sa.Row[Any]
_LEDGER = cast(sa.Table, StoredEntry.__table__)
_HISTORY = cast(sa.Table, StoredHistory.__table__)
_CATEGORIES = cast(sa.Table, StoredCategory.__table__)
_SET_SCORE = sa.update(_SCORES).where(_SCORES.c.subject_key == sa.bindparam("b_subject_key"))
_SET_PERIOD = sa.update(_LEDGER).where(_LEDGER.c.entry_id == sa.bindparam("b_entry_id"))
_SET_GRANT = (
    sa.update(_LEDGER)
    .where(_LEDGER.c.entry_id == sa.bindparam("b_entry_id"))
    .values(granted=sa.bindparam("b_granted"))
)


def score_state(row: _ScoreRow | None) -> ScoreState | None:
    if row is None:
        return None
    return ScoreState(row.score, row.tier, bool(row.red_list), bool(row.black_list))


def subject_ledger(
    key: str,
    kind: str,
    row: _ScoreRow | None,
    entries: Sequence[ScoredEntry],
    *,
    grants: Mapping[str, int | None] | None = None,
    partial: bool = False,
) -> SubjectLedger:
    state = score_state(row)
    through = None if row is None else row.recorded_through
    return SubjectLedger(
        subject_key=key,
        subject_kind=row.subject_kind if row is not None else kind,
        stored=state,
        computed_at=row.updated_at if row is not None and state is not None else None,
        stored_policy_version=row.policy_version if row is not None else "",
        entries=tuple(entries),
        recorded_through=through,
        grants=grants or {},
        partial=partial,
    )


def _locked_rows(session: Session, keys: Sequence[str]) -> list[_ScoreRow]:
    # Core rows: the batch reads them once and writes them by executemany, never as objects.
    return list(
        session.execute(
            sa.select(_SCORES)
            .where(_SCORES.c.subject_key.in_(sorted(keys)))
            .order_by(_SCORES.c.subject_key)
            .with_for_update()
        )
    )


def _merged(read: Sequence[Granted], new: Sequence[ScoredEntry]) -> list[Granted]:
    """What was read and the batch's new entries, not stored yet (no grant). A row read under
    a new entry's id is another writer's (PostgreSQL): it is left out, and the batch's insert
    then fails with ConcurrentWrite."""
    if not new:
        return list(read)
    ids = {e.entry_id for e in new}
    return [*(g for g in read if g[0].entry_id not in ids), *((e, None) for e in new)]


def _whole(
    session: Session, rows: Sequence[_ScoreRow], new: Mapping[str, Sequence[ScoredEntry]]
) -> tuple[dict[str, SubjectLedger], int]:
    """Each row's subject with its whole ledger and its `new` entries; and the number of
    ledger rows read."""
    ledgers = load_granted(session, [r.subject_key for r in rows])
    read = sum(len(ledger) for ledger in ledgers.values())
    return {
        r.subject_key: _with_grants(
            r.subject_key, r.subject_kind, r, _merged(ledgers[r.subject_key], new.get(r.subject_key, ()))
        )
        for r in rows
    }, read


def _with_grants(key: str, kind: str, row: _ScoreRow | None, read: Sequence[Granted]) -> SubjectLedger:
    grants = {e.entry_id: g for e, g in read}
    return subject_ledger(key, kind, row, [e for e, _ in read], grants=grants)


def _first_scores(
    session: Session,
    kinds: Mapping[str, str],
    rows: Sequence[_ScoreRow],
    new: Mapping[str, Sequence[ScoredEntry]],
) -> tuple[list[SubjectLedger], int]:
    """The subjects of `kinds` (key: subject kind) with no score row among `rows`, each with
    its `new` entries and what was stored under its key before the batch (for a new subject,
    an index probe that finds nothing; a re-keying in progress may have moved entries without
    their row); and the number of ledger rows read."""
    found = {r.subject_key for r in rows}
    missing = sorted(k for k in kinds if k not in found)
    if not missing:
        return [], 0
    ledgers = load_granted(session, missing)
    read = sum(len(ledger) for ledger in ledgers.values())
    return [_with_grants(k, kinds[k], None, _merged(ledgers[k], new.get(k, ()))) for k in missing], read


def lock_subjects(
    session: Session,
    keys: Sequence[str],
    new: Mapping[str, Sequence[ScoredEntry]] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> tuple[list[SubjectLedger], int]:
    """The named subjects that have a score row, locked until commit (PostgreSQL; SQLite has
    one writer anyway), each with its whole ledger and its `new` entries (not stored yet, by
    subject key), and those of `kinds` that have none (a first score, stored with
    `save_scores(first=...)`), in key order; and the number of ledger rows read."""
    rows = _locked_rows(session, keys)
    whole, read = _whole(session, rows, new or {})
    first, first_read = _first_scores(session, kinds or {}, rows, new or {})
    return _in_key_order([*whole.values(), *first]), read + first_read


def _in_key_order(subjects: Sequence[SubjectLedger]) -> list[SubjectLedger]:
    return sorted(subjects, key=lambda s: s.subject_key)


def lock_live(
    session: Session,
    keys: Sequence[str],
    now: datetime,
    new: Mapping[str, Sequence[ScoredEntry]],
    policy: ScorePolicy,
    *,
    kinds: Mapping[str, str],
) -> tuple[list[SubjectLedger], int]:
    """`lock_subjects` for a batch that adds the `new` entries, not stored yet (by subject
    key; services/score/live.py): each subject with a score row with the live part of its
    ledger where it is proven enough, else with its whole ledger, and the first scores of
    `kinds`; and the number of ledger rows read."""
    rows = _locked_rows(session, keys)
    floors: dict[str, datetime] = {}
    for row in rows:
        floor = cutoff(
            policy.for_kind(row.subject_kind),
            stored_version=row.policy_version,
            since=row.updated_at,
            recorded_through=row.recorded_through,
            now=now,
        )
        if floor is not None:
            floors[row.subject_key] = floor
    found: dict[str, SubjectLedger] = {}
    read = 0
    ranges: dict[datetime, list[str]] = {}
    for key, floor in floors.items():
        ranges.setdefault(floor, []).append(key)
    recent = load_recent(session, ranges) if floors else {}
    added = {e.entry_id for entries in new.values() for e in entries}
    refused: dict[str, list[Granted]] = {}
    for row in rows:
        key = row.subject_key
        if key not in floors:
            continue
        read += len(recent[key])
        mine = _merged(recent[key], new.get(key, ()))
        subject = subject_ledger(key, row.subject_kind, row, [], partial=True)
        assert subject.computed_at is not None
        kind = policy.for_kind(row.subject_kind)
        part = live_part(mine, kind, since=subject.computed_at, floor=floors[key], added=added)
        if part is None:
            refused[key] = mine
        else:
            found[key] = replace(subject, entries=part[0], grants=part[1])
    if refused:
        # The whole ledger of a refused subject: what was read, and what occurred before its range.
        before = {f: [k for k in members if k in refused] for f, members in ranges.items()}
        older = load_recent(session, {f: ks for f, ks in before.items() if ks}, older=True)
        for row in rows:
            if row.subject_key in refused:
                mine = refused[row.subject_key]
                seen = {e.entry_id for e, _ in mine}
                more = [g for g in older[row.subject_key] if g[0].entry_id not in seen]
                read += len(more)
                found[row.subject_key] = _with_grants(row.subject_key, row.subject_kind, row, [*mine, *more])
    rest = [r for r in rows if r.subject_key not in found]
    if rest:
        whole, rest_read = _whole(session, rest, new)
        read += rest_read
        found.update(whole)
    first, first_read = _first_scores(session, kinds, rows, new)
    return _in_key_order([*found.values(), *first]), read + first_read


def save_scores(
    session: Session,
    results: Mapping[str, Rescored],
    recorded_at: datetime | None,
    key_id: str,
    first: Mapping[str, str] | None = None,
) -> None:
    """Write the rescored subjects' rows, categories and history (keys of generation `key_id`);
    history rows are recorded at `recorded_at`, or now. The rows of `first` (key: subject
    kind), subjects that had none when locked, are inserted whole; if another writer
    (PostgreSQL) inserted one meanwhile, ConcurrentWrite: this batch read no entry of the
    other's, so it is rolled back to be tried again, then finding the row to lock."""
    if results:
        _store_scores(
            session,
            results,
            recorded_at,
            key_id,
            first or {},
        )


def _lists_text(names: Sequence[str]) -> str:
    return ",".join(names)


def _store_scores(
    session: Session,
    results: Mapping[str, Rescored],
    now: datetime | None,
    key_id: str,
    first: Mapping[str, str],
) -> None:
    updates = []
    inserts = []
    history = []
    periods = []
    grants: list[dict[str, Any]] = []
    written_at = now or datetime.now(UTC)
    for key, rescored in results.items():
        r = rescored.result
        assert r.as_of is not None
        values = {
            "score": r.score,
            "tier": r.tier,
            "policy_version": r.policy_version,
            "entry_count": r.entry_count,
            "updated_at": r.as_of,
            "next_change_at": r.next_change_at,
            "red_list": r.state.red,
            "black_list": r.state.black,
            "list_reasons": json.dumps([[m.name, list(m.reasons), list(m.entry_ids)] for m in r.lists]),
            "recorded_through": rescored.recorded_through,
        }
        if key in first:
            inserts.append(
                {"subject_key": key, "subject_key_id": key_id, "subject_kind": first[key], **values}
            )
        else:
            updates.append({"b_subject_key": key, **values})
        grants += [{"b_entry_id": i, "b_granted": g} for i, g in rescored.grants.items()]
        for c in rescored.changes:
            history.append(
                {
                    "subject_key": key,
                    "subject_key_id": key_id,
                    "changed_at": c.changed_at,
                    "recorded_at": written_at,
                    "cause": c.cause,
                    "policy_version": c.after.policy_version,
                    "score_before": None if c.before is None else c.before.score,
                    "score": c.after.score,
                    "tier_before": None if c.before is None else c.before.tier,
                    "tier": c.after.tier,
                    "lists_before": None if c.before is None else _lists_text(list_names(c.before)),
                    "lists": _lists_text(list_names(c.after.state)),
                    "added_entry_ids": json.dumps(list(c.added_entry_ids)),
                    "expired_entry_ids": json.dumps(list(c.expired_entry_ids)),
                    "ended_entry_ids": json.dumps(list(c.ended_entry_ids)),
                    "resumed_entry_ids": json.dumps(list(c.resumed_entry_ids)),
                    "note": c.note,
                }
            )
        periods += [{"b_entry_id": i, "visible_until": v} for i, v in rescored.visible_until.items()]
    if updates:
        session.execute(_SET_SCORE, updates)
    if inserts:
        try:
            # Key order, as the locks: concurrent writers wait on each other in one order.
            session.execute(sa.insert(_SCORES), sorted(inserts, key=lambda row: str(row["subject_key"])))
        except IntegrityError as error:
            raise ConcurrentWrite("another writer stored a first score of one of these subjects") from error
    if history:
        session.execute(sa.insert(_HISTORY), history)
    if periods:
        session.execute(_SET_PERIOD, periods)
    if grants:
        session.execute(_SET_GRANT, grants)
    session.execute(sa.delete(_CATEGORIES).where(_CATEGORIES.c.subject_key.in_(list(results))))
    categories = [
        {
            "subject_key": key,
            "subject_key_id": key_id,
            "category": c.category,
            "points": c.points,
            "entry_count": c.entry_count,
            "capped": c.capped,
        }
        for key, r in results.items()
        for c in r.result.categories
    ]
    if categories:
        session.execute(sa.insert(_CATEGORIES), categories)
