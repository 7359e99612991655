"""Score's store: the ledger, each subject's score and its per-category breakdown.

This module owns the schema of the score database (migrations under
services/score/migrations); the query service reads the same tables through these
models and never writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from kit.db import as_utc, make_metadata
from services.score.domain import (
    MAX_CATEGORY_LENGTH,
    MAX_ID_LENGTH,
    MAX_SUBJECT_KEY_LENGTH,
    EntryStatus,
    LedgerEntry,
    Recorded,
    Rescore,
    Rescored,
    RuleRef,
    ScoredEntry,
    ScoreState,
    SubjectLedger,
    list_names,
)
from services.score.policy import ActivatedPolicy, policy_from_text


class Base(DeclarativeBase):
    metadata = make_metadata()


class StoredEntry(Base):
    """One ledger entry; `outcome` is the serialized egret.common.v1.Outcome, the evidence snapshot."""

    __tablename__ = "score_ledger"
    # Serves both "all entries of a subject" and ListEntries' newest-first keyset pages.
    __table_args__ = (sa.Index("ix_score_ledger_subject_key", "subject_key", "occurred_at", "entry_id"),)

    entry_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    rule_id: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    rule_set: Mapped[str] = mapped_column(sa.String(MAX_ID_LENGTH))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    rule_title: Mapped[str] = mapped_column(sa.Text)
    rule_description: Mapped[str] = mapped_column(sa.Text)
    legal_basis: Mapped[str] = mapped_column(sa.Text)
    points: Mapped[int] = mapped_column(sa.Integer)
    category: Mapped[str] = mapped_column(sa.String(MAX_CATEGORY_LENGTH))
    severity: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    visible_until: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(sa.Text)
    black_list: Mapped[bool] = mapped_column(sa.Boolean)
    outcome: Mapped[bytes] = mapped_column(sa.LargeBinary)


class StoredScore(Base):
    """A subject's score as last recomputed from its ledger, as of `updated_at`.

    `next_change_at` is when it next changes with no new entry (an entry's visible_until):
    until then readers may serve this row as the current score; the expiry sweep
    recomputes rows whose instant has passed.
    """

    __tablename__ = "score_subjects"

    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH), primary_key=True)
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    score: Mapped[int] = mapped_column(sa.Integer)
    tier: Mapped[str] = mapped_column(sa.String(32))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    next_change_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True), index=True)
    red_list: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    black_list: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    # JSON [[list, [reasons], [entry ids]], ...]: why the subject is on each list.
    list_reasons: Mapped[str] = mapped_column(sa.Text, server_default="[]")


class StoredHistory(Base):
    """One change of a subject's score, tier or list membership, at the instant it took
    effect, with the entries that caused it. Append-only."""

    __tablename__ = "score_history"
    __table_args__ = (sa.Index("ix_score_history_subject_key", "subject_key", "history_id"),)

    history_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH))
    changed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    cause: Mapped[str] = mapped_column(sa.String(16))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    score_before: Mapped[int | None] = mapped_column(sa.Integer)
    score: Mapped[int] = mapped_column(sa.Integer)
    tier_before: Mapped[str | None] = mapped_column(sa.String(32))
    tier: Mapped[str] = mapped_column(sa.String(32))
    # Comma-separated list names ("red", "black"), before and after.
    lists_before: Mapped[str | None] = mapped_column(sa.String(32))
    lists: Mapped[str] = mapped_column(sa.String(32))
    # JSON arrays of entry ids.
    added_entry_ids: Mapped[str] = mapped_column(sa.Text)
    expired_entry_ids: Mapped[str] = mapped_column(sa.Text)


class StoredPolicy(Base):
    """Every score policy ever activated, with who activated it and when; the latest is in
    force. Kept whole so any past instant is scored under the policy of its time."""

    __tablename__ = "score_policies"

    version: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    activated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    activated_by: Mapped[str] = mapped_column(sa.String(256))
    document: Mapped[str] = mapped_column(sa.Text)


class StoredCategory(Base):
    """The points one category contributes to a subject's stored score."""

    __tablename__ = "score_categories"

    subject_key: Mapped[str] = mapped_column(
        sa.String(MAX_SUBJECT_KEY_LENGTH),
        sa.ForeignKey("score_subjects.subject_key", ondelete="CASCADE"),
        primary_key=True,
    )
    category: Mapped[str] = mapped_column(sa.String(MAX_CATEGORY_LENGTH), primary_key=True)
    points: Mapped[int] = mapped_column(sa.Integer)
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    # Positive points of counting entries withheld by the category's cap.
    capped: Mapped[int] = mapped_column(sa.Integer, server_default="0")


def entry_row(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "subject_key": entry.subject_key,
        "subject_kind": entry.subject_kind,
        "rule_id": entry.rule.rule_id,
        "rule_set": entry.rule.rule_set,
        "rule_set_version": entry.rule.rule_set_version,
        "rule_title": entry.rule.title,
        "rule_description": entry.rule.description,
        "legal_basis": entry.rule.legal_basis,
        "points": entry.points,
        "category": entry.category,
        "severity": entry.severity,
        "status": entry.status.value,
        # SQLite drops the offset, so only UTC survives a round trip.
        "occurred_at": entry.occurred_at.astimezone(UTC),
        "recorded_at": entry.recorded_at.astimezone(UTC),
        "visible_until": entry.visible_until.astimezone(UTC),
        "reason": entry.reason,
        "black_list": entry.black_list,
        "outcome": entry.snapshot,
    }


def ledger_entry(row: StoredEntry) -> LedgerEntry:
    return LedgerEntry(
        entry_id=row.entry_id,
        subject_key=row.subject_key,
        subject_kind=row.subject_kind,
        rule=RuleRef(
            rule_id=row.rule_id,
            rule_set=row.rule_set,
            rule_set_version=row.rule_set_version,
            title=row.rule_title,
            description=row.rule_description,
            legal_basis=row.legal_basis,
        ),
        points=row.points,
        category=row.category,
        severity=row.severity,
        status=EntryStatus(row.status),
        occurred_at=as_utc(row.occurred_at),
        recorded_at=as_utc(row.recorded_at),
        visible_until=as_utc(row.visible_until),
        reason=row.reason,
        black_list=row.black_list,
        snapshot=row.outcome,
    )


_ENTRY_COLUMNS = (
    StoredEntry.subject_key,
    StoredEntry.entry_id,
    StoredEntry.points,
    StoredEntry.category,
    StoredEntry.severity,
    StoredEntry.status,
    StoredEntry.occurred_at,
    StoredEntry.recorded_at,
    StoredEntry.black_list,
)


def scored_entry(row: Any) -> ScoredEntry:
    return ScoredEntry(
        entry_id=row.entry_id,
        points=row.points,
        category=row.category,
        severity=row.severity,
        status=EntryStatus(row.status),
        occurred_at=as_utc(row.occurred_at),
        recorded_at=as_utc(row.recorded_at),
        black_list=row.black_list,
    )


def load_entries(session: Session, keys: Sequence[str]) -> dict[str, list[ScoredEntry]]:
    """The scoring view of every entry of the named subjects."""
    ledgers: dict[str, list[ScoredEntry]] = {key: [] for key in keys}
    for row in session.execute(sa.select(*_ENTRY_COLUMNS).where(StoredEntry.subject_key.in_(list(keys)))):
        ledgers[row.subject_key].append(scored_entry(row))
    return ledgers


def _state(row: StoredScore | Any) -> ScoreState | None:
    # A placeholder row (tier "") was created by _lock_subjects in this transaction.
    if row is None or not row.tier:
        return None
    return ScoreState(row.score, row.tier, bool(row.red_list), bool(row.black_list))


def load_policies(session: Session) -> list[ActivatedPolicy]:
    rows = session.scalars(sa.select(StoredPolicy).order_by(StoredPolicy.activated_at, StoredPolicy.version))
    return [
        ActivatedPolicy(
            policy=policy_from_text(r.document, source=f"stored policy {r.version}"),
            activated_at=as_utc(r.activated_at),
            activated_by=r.activated_by,
            document=r.document,
        )
        for r in rows
    ]


class SqlLedgerStore:
    """LedgerStore on SQLAlchemy: one transaction per batch, a fixed number of bulk statements."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        try:
            return self._record(entries, rescore)
        except IntegrityError:
            # A concurrent writer stored one of these ids between our read and our insert
            # (PostgreSQL with several replicas); the retry sees it as a duplicate.
            return self._record(entries, rescore)

    def _record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        with self._sessions() as session, session.begin():
            ids = [e.entry_id for e in entries]
            existing = set(
                session.scalars(sa.select(StoredEntry.entry_id).where(StoredEntry.entry_id.in_(ids)))
            )
            # Sorted, so that concurrent writers take row locks in the same order.
            fresh = sorted((e for e in entries if e.entry_id not in existing), key=lambda e: e.entry_id)
            if not fresh:
                return Recorded(applied=0, subjects_updated=0)
            session.execute(sa.insert(StoredEntry), [entry_row(e) for e in fresh])
            kinds = {e.subject_key: e.subject_kind for e in fresh}
            now = max(e.recorded_at for e in fresh).astimezone(UTC)
            _lock_subjects(session, kinds, now)
            _rescore_and_store(session, sorted(kinds), rescore, now)
        return Recorded(applied=len(fresh), subjects_updated=len(kinds))

    def recompute(self, subject_keys: Sequence[str], rescore: Rescore) -> int:
        with self._sessions() as session, session.begin():
            keys = list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.subject_key.in_(sorted(subject_keys)))
                    .order_by(StoredScore.subject_key)
                    .with_for_update()
                )
            )
            if keys:
                _rescore_and_store(session, keys, rescore, None)
            return len(keys)

    def due_subjects(self, now: datetime, limit: int) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.next_change_at <= now.astimezone(UTC))
                    .order_by(StoredScore.next_change_at)
                    .limit(limit)
                )
            )

    def subjects_not_on(self, policy_version: str, after: str, limit: int) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    sa.select(StoredScore.subject_key)
                    .where(StoredScore.policy_version != policy_version, StoredScore.subject_key > after)
                    .order_by(StoredScore.subject_key)
                    .limit(limit)
                )
            )

    def activations(self) -> list[ActivatedPolicy]:
        with self._sessions() as session:
            return load_policies(session)

    def save_activation(self, activation: ActivatedPolicy) -> None:
        with self._sessions() as session, session.begin():
            session.add(
                StoredPolicy(
                    version=activation.policy.version,
                    activated_at=activation.activated_at.astimezone(UTC),
                    activated_by=activation.activated_by,
                    document=activation.document,
                )
            )

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        after = ""
        while True:
            with self._sessions() as session:
                keys = list(
                    session.scalars(
                        sa.select(StoredEntry.subject_key)
                        .where(StoredEntry.subject_key > after)
                        .group_by(StoredEntry.subject_key)
                        .order_by(StoredEntry.subject_key)
                        .limit(page_size)
                    )
                )
                if not keys:
                    return
                # Score rows first, then entries: an entry recorded in between is newer than
                # the row and is left out by scoring as of the row's instant (Ledger.verify).
                stored = {
                    r.subject_key: r
                    for r in session.scalars(sa.select(StoredScore).where(StoredScore.subject_key.in_(keys)))
                }
                ledgers = load_entries(session, keys)
                kinds = {
                    r.subject_key: r.subject_kind
                    for r in session.execute(
                        sa.select(StoredEntry.subject_key, StoredEntry.subject_kind)
                        .where(StoredEntry.subject_key.in_(keys))
                        .distinct()
                    )
                }
            yield [_subject_ledger(key, kinds[key], stored.get(key), ledgers[key]) for key in keys]
            after = keys[-1]


def _subject_ledger(
    key: str, kind: str, row: StoredScore | None, entries: list[ScoredEntry]
) -> SubjectLedger:
    state = _state(row)
    return SubjectLedger(
        subject_key=key,
        subject_kind=row.subject_kind if row is not None else kind,
        stored=state,
        computed_at=as_utc(row.updated_at) if row is not None and state is not None else None,
        stored_policy_version=row.policy_version if row is not None else "",
        entries=tuple(entries),
    )


def _rescore_and_store(session: Session, keys: Sequence[str], rescore: Rescore, now: datetime | None) -> None:
    """Rescore the (locked) subjects and write their rows, categories and history."""
    rows = {
        r.subject_key: r
        for r in session.scalars(sa.select(StoredScore).where(StoredScore.subject_key.in_(keys)))
    }
    ledgers = load_entries(session, keys)
    results: dict[str, Rescored] = {}
    for key in keys:
        row = rows[key]
        results[key] = rescore(_subject_ledger(key, row.subject_kind, row, ledgers[key]))
    _store_scores(session, results, now)


def _lock_subjects(session: Session, kinds: Mapping[str, str], now: datetime) -> None:
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
        pg = postgresql.insert(StoredScore)
        statement = pg.on_conflict_do_update(
            index_elements=["subject_key"], set_={"subject_kind": StoredScore.__table__.c.subject_kind}
        )
    else:
        lite = sqlite.insert(StoredScore)
        statement = lite.on_conflict_do_update(
            index_elements=["subject_key"], set_={"subject_kind": StoredScore.__table__.c.subject_kind}
        )
    session.execute(statement, rows)


def _lists_text(names: Sequence[str]) -> str:
    return ",".join(names)


def _store_scores(session: Session, results: Mapping[str, Rescored], now: datetime | None) -> None:
    updates = []
    history = []
    periods = []
    written_at = now or datetime.now(UTC)
    for key, rescored in results.items():
        r = rescored.result
        assert r.as_of is not None
        updates.append(
            {
                "subject_key": key,
                "score": r.score,
                "tier": r.tier,
                "policy_version": r.policy_version,
                "entry_count": r.entry_count,
                "updated_at": r.as_of.astimezone(UTC),
                "next_change_at": None if r.next_change_at is None else r.next_change_at.astimezone(UTC),
                "red_list": r.state.red,
                "black_list": r.state.black,
                "list_reasons": json.dumps([[m.name, list(m.reasons), list(m.entry_ids)] for m in r.lists]),
            }
        )
        for c in rescored.changes:
            history.append(
                {
                    "subject_key": key,
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
                }
            )
        periods += [
            {"entry_id": i, "visible_until": v.astimezone(UTC)} for i, v in rescored.visible_until.items()
        ]
    session.execute(sa.update(StoredScore), updates)
    if history:
        session.execute(sa.insert(StoredHistory), history)
    if periods:
        session.execute(sa.update(StoredEntry), periods)
    session.execute(sa.delete(StoredCategory).where(StoredCategory.subject_key.in_(list(results))))
    categories = [
        {
            "subject_key": key,
            "category": c.category,
            "points": c.points,
            "entry_count": c.entry_count,
            "capped": c.capped,
        }
        for key, r in results.items()
        for c in r.result.categories
    ]
    if categories:
        session.execute(sa.insert(StoredCategory), categories)
