"""Score's store: the ledger, each subject's score and its per-category breakdown.

This module owns the schema of the score database (migrations under
services/score/migrations); the query service reads the same tables through these
models and never writes them.
"""

from __future__ import annotations

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
    RuleRef,
    ScoredEntry,
    ScoreResult,
    SubjectLedger,
)


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
    """A subject's score as last recomputed from its ledger."""

    __tablename__ = "score_subjects"

    subject_key: Mapped[str] = mapped_column(sa.String(MAX_SUBJECT_KEY_LENGTH), primary_key=True)
    subject_kind: Mapped[str] = mapped_column(sa.String(16))
    score: Mapped[int] = mapped_column(sa.Integer)
    tier: Mapped[str] = mapped_column(sa.String(32))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    entry_count: Mapped[int] = mapped_column(sa.Integer)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


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
            ledgers: dict[str, list[ScoredEntry]] = {key: [] for key in kinds}
            rows = session.execute(
                sa.select(
                    StoredEntry.subject_key, StoredEntry.points, StoredEntry.category, StoredEntry.status
                ).where(StoredEntry.subject_key.in_(list(kinds)))
            )
            for r in rows:
                ledgers[r.subject_key].append(ScoredEntry(r.points, r.category, EntryStatus(r.status)))
            results = {key: rescore(kinds[key], ledgers[key]) for key in sorted(kinds)}
            _store_scores(session, results, now)
        return Recorded(applied=len(fresh), subjects_updated=len(kinds))

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
                # One statement, so the stored score and the ledger come from one snapshot
                # even while batches are being applied.
                rows = (
                    session.execute(
                        sa.select(
                            StoredEntry.subject_key,
                            StoredEntry.subject_kind,
                            StoredEntry.points,
                            StoredEntry.category,
                            StoredEntry.status,
                            StoredScore.score,
                            StoredScore.tier,
                        )
                        .outerjoin(StoredScore, StoredScore.subject_key == StoredEntry.subject_key)
                        .where(StoredEntry.subject_key.in_(keys))
                    )
                ).all()
            yield _subject_ledgers(keys, rows)
            after = keys[-1]


LedgerRow = tuple[str, str, int, str, str, int | None, str | None]


def _subject_ledgers(keys: Sequence[str], rows: Sequence[LedgerRow]) -> list[SubjectLedger]:
    """Group (key, kind, points, category, status, stored score, stored tier) rows by subject."""
    entries: dict[str, list[ScoredEntry]] = {key: [] for key in keys}
    heads: dict[str, LedgerRow] = {}
    for row in rows:
        key, _, points, category, status, _, _ = row
        entries[key].append(ScoredEntry(points, category, EntryStatus(status)))
        heads.setdefault(key, row)
    return [
        SubjectLedger(
            subject_key=key,
            subject_kind=heads[key][1],
            stored_score=heads[key][5],
            stored_tier=heads[key][6],
            entries=tuple(entries[key]),
        )
        for key in keys
        if key in heads
    ]


def _lock_subjects(session: Session, kinds: Mapping[str, str], now: datetime) -> None:
    """Create missing score rows and lock every affected one until commit.

    On PostgreSQL a concurrent batch for the same subject then waits here and
    recomputes after our commit, from a ledger that includes our entries, so the
    last score written always covers every entry. The placeholder values are
    overwritten in this same transaction.
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
            index_elements=["subject_key"], set_={"updated_at": pg.excluded.updated_at}
        )
    else:
        lite = sqlite.insert(StoredScore)
        statement = lite.on_conflict_do_update(
            index_elements=["subject_key"], set_={"updated_at": lite.excluded.updated_at}
        )
    session.execute(statement, rows)


def _store_scores(session: Session, results: Mapping[str, ScoreResult], now: datetime) -> None:
    session.execute(
        sa.update(StoredScore),
        [
            {
                "subject_key": key,
                "score": r.score,
                "tier": r.tier,
                "policy_version": r.policy_version,
                "entry_count": r.entry_count,
                "updated_at": now,
            }
            for key, r in results.items()
        ],
    )
    session.execute(sa.delete(StoredCategory).where(StoredCategory.subject_key.in_(list(results))))
    categories = [
        {"subject_key": key, "category": c.category, "points": c.points, "entry_count": c.entry_count}
        for key, r in results.items()
        for c in r.categories
    ]
    if categories:
        session.execute(sa.insert(StoredCategory), categories)
