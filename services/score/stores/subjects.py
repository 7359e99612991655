"""Each subject's score row, categories and history: locking them for a rescore, and
writing the rescore's results (shared by the ledger's and due process's transactions)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
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
from kit.db import as_utc
from services.score.ledger_store import Rescored, SubjectLedger
from services.score.live import cutoff, live_part

# Core tables: the batch path writes by executemany, which the ORM's bulk operations
# cost about twice as much per row.
_SCORES = cast(sa.Table, StoredScore.__table__)
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


def score_state(row: StoredScore | Any) -> ScoreState | None:
    # A placeholder row (tier "") was created by create_subject_rows in this transaction.
    if row is None or not row.tier:
        return None
    return ScoreState(row.score, row.tier, bool(row.red_list), bool(row.black_list))


def subject_ledger(
    key: str,
    kind: str,
    row: StoredScore | None,
    entries: Sequence[ScoredEntry],
    *,
    grants: Mapping[str, int | None] | None = None,
    partial: bool = False,
) -> SubjectLedger:
    state = score_state(row)
    through = None if row is None or row.recorded_through is None else as_utc(row.recorded_through)
    return SubjectLedger(
        subject_key=key,
        subject_kind=row.subject_kind if row is not None else kind,
        stored=state,
        computed_at=as_utc(row.updated_at) if row is not None and state is not None else None,
        stored_policy_version=row.policy_version if row is not None else "",
        entries=tuple(entries),
        recorded_through=through,
        grants=grants or {},
        partial=partial,
    )


def _locked_rows(session: Session, keys: Sequence[str]) -> list[StoredScore]:
    return list(
        session.scalars(
            sa.select(StoredScore)
            .where(StoredScore.subject_key.in_(sorted(keys)))
            .order_by(StoredScore.subject_key)
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
    session: Session, rows: Sequence[StoredScore], new: Mapping[str, Sequence[ScoredEntry]]
) -> tuple[dict[str, SubjectLedger], int]:
    """Each row's subject with its whole ledger (the new entries from memory: for a first
    score the read finds nothing, unless entries were stored under its key without a row,
    as by a re-keying in progress); and the number of ledger rows read."""
    ledgers = load_granted(session, [r.subject_key for r in rows])
    read = sum(len(ledger) for ledger in ledgers.values())
    return {
        r.subject_key: _with_grants(r, _merged(ledgers[r.subject_key], new.get(r.subject_key, ())))
        for r in rows
    }, read


def _with_grants(row: StoredScore, read: Sequence[Granted]) -> SubjectLedger:
    grants = {e.entry_id: g for e, g in read}
    return subject_ledger(row.subject_key, row.subject_kind, row, [e for e, _ in read], grants=grants)


def lock_subjects(
    session: Session, keys: Sequence[str], new: Mapping[str, Sequence[ScoredEntry]] | None = None
) -> tuple[list[SubjectLedger], int]:
    """The named subjects that have a score row, in key order, locked until commit (PostgreSQL;
    SQLite has one writer anyway), each with its whole ledger and its `new` entries (not
    stored yet, by subject key); and the number of ledger rows read."""
    rows = _locked_rows(session, keys)
    whole, read = _whole(session, rows, new or {})
    return list(whole.values()), read


def lock_live(
    session: Session,
    keys: Sequence[str],
    now: datetime,
    new: Mapping[str, Sequence[ScoredEntry]],
    policy: ScorePolicy,
) -> tuple[list[SubjectLedger], int]:
    """`lock_subjects` for a batch that adds the `new` entries, not stored yet (by subject
    key; services/score/live.py): each subject with the live part of its ledger where it is
    proven enough, else with its whole ledger; and the number of ledger rows read."""
    rows = _locked_rows(session, keys)
    floors: dict[str, datetime] = {}
    for row in rows:
        state = score_state(row)
        floor = cutoff(
            policy.for_kind(row.subject_kind),
            stored_version=row.policy_version,
            since=as_utc(row.updated_at) if state is not None else None,
            recorded_through=None if row.recorded_through is None else as_utc(row.recorded_through),
            now=now,
        )
        if floor is not None:
            floors[row.subject_key] = floor
    found: dict[str, SubjectLedger] = {}
    read = 0
    ranges: dict[datetime, list[str]] = {}
    for key, floor in floors.items():
        ranges.setdefault(floor, []).append(key)
    recent = load_recent(session, ranges, ()) if floors else {}
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
        older = load_recent(session, {f: ks for f, ks in before.items() if ks}, (), older=True)
        for row in rows:
            if row.subject_key in refused:
                mine = refused[row.subject_key]
                seen = {e.entry_id for e, _ in mine}
                more = [g for g in older[row.subject_key] if g[0].entry_id not in seen]
                read += len(more)
                found[row.subject_key] = _with_grants(row, [*mine, *more])
    rest = [r for r in rows if r.subject_key not in found]
    if rest:
        whole, rest_read = _whole(session, rest, new)
        read += rest_read
        found.update(whole)
    return [found[r.subject_key] for r in rows], read


def save_scores(
    session: Session, results: Mapping[str, Rescored], recorded_at: datetime | None, key_id: str
) -> None:
    """Write the rescored subjects' rows, categories and history (keys of generation `key_id`);
    history rows are recorded at `recorded_at`, or now."""
    if results:
        _store_scores(session, results, None if recorded_at is None else recorded_at.astimezone(UTC), key_id)


def create_subject_rows(session: Session, kinds: Mapping[str, str], now: datetime, key_id: str) -> None:
    """Create missing score rows and lock every affected one until commit.

    On PostgreSQL a concurrent batch for the same subject then waits here and
    recomputes after our commit, from a ledger that includes our entries, so the
    last score written always covers every entry. The placeholder values (tier "")
    are overwritten in this same transaction. An existing row is locked by a no-op
    update, so its stored state and instant survive to be compared with the new one.
    """
    rows = [
        {
            "subject_key": key,
            "subject_key_id": key_id,
            "subject_kind": kinds[key],
            "score": 0,
            "tier": "",
            "policy_version": "",
            "entry_count": 0,
            "updated_at": now,
        }
        for key in sorted(kinds)
    ]
    statement: sa.Insert
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(_SCORES)
        statement = pg.on_conflict_do_update(
            index_elements=["subject_key"], set_={"subject_kind": _SCORES.c.subject_kind}
        )
    else:
        lite = sqlite.insert(_SCORES)
        statement = lite.on_conflict_do_update(
            index_elements=["subject_key"], set_={"subject_kind": _SCORES.c.subject_kind}
        )
    session.execute(statement, rows)


def _lists_text(names: Sequence[str]) -> str:
    return ",".join(names)


def _store_scores(
    session: Session, results: Mapping[str, Rescored], now: datetime | None, key_id: str
) -> None:
    updates = []
    history = []
    periods = []
    grants: list[dict[str, Any]] = []
    written_at = now or datetime.now(UTC)
    for key, rescored in results.items():
        r = rescored.result
        assert r.as_of is not None
        updates.append(
            {
                "b_subject_key": key,
                "score": r.score,
                "tier": r.tier,
                "policy_version": r.policy_version,
                "entry_count": r.entry_count,
                "updated_at": r.as_of.astimezone(UTC),
                "next_change_at": None if r.next_change_at is None else r.next_change_at.astimezone(UTC),
                "red_list": r.state.red,
                "black_list": r.state.black,
                "list_reasons": json.dumps([[m.name, list(m.reasons), list(m.entry_ids)] for m in r.lists]),
                "recorded_through": None
                if rescored.recorded_through is None
                else rescored.recorded_through.astimezone(UTC),
            }
        )
        grants += [{"b_entry_id": i, "b_granted": g} for i, g in rescored.grants.items()]
        for c in rescored.changes:
            history.append(
                {
                    "subject_key": key,
                    "subject_key_id": key_id,
                    "changed_at": c.changed_at.astimezone(UTC),
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
        periods += [
            {"b_entry_id": i, "visible_until": v.astimezone(UTC)} for i, v in rescored.visible_until.items()
        ]
    session.execute(_SET_SCORE, updates)
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
