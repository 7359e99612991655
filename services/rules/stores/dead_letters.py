"""Dead letters: events whose evaluation failed, retried while parked_at is NULL, parked
after, until an operator redrives them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from domain.ruleset.model import RuleSet
from kit.db import as_utc
from services.rules.domain import DeadLetter, Failure, split_key
from services.rules.records import engine_event_from_record
from services.rules.stores.schema import DeadLetterRow, table_of
from services.rules.stores.sql import key_filter


def record_failures(
    session: Session,
    failures: Sequence[Failure],
    records: Mapping[str, bytes],
    *,
    rule_set: RuleSet,
    now: datetime,
    key_id: str,
) -> None:
    """New failures inserted, repeated ones counted, in the evaluation's transaction."""
    table = table_of(DeadLetterRow)
    connection = session.connection()
    keys = [f.event.key for f in failures]
    existing = {
        f"{r.source}/{r.event_id}": r.id
        for r in connection.execute(
            sa.select(table.c.id, table.c.source, table.c.event_id).where(key_filter(table.c, keys))
        )
    }
    new = [f for f in failures if f.event.key not in existing]
    if new:
        # Core executemany, no RETURNING: the ids are the database's and nothing reads them here.
        connection.execute(
            sa.insert(table),
            [
                {
                    "source": split_key(f.event.key)[0],
                    "event_id": split_key(f.event.key)[1],
                    "subject_key": f.event.subject_key,
                    "subject_key_id": key_id,
                    "occurred_at": f.event.occurred_at,
                    "attempts": f.attempts,
                    "reason": f.reason,
                    "rule_set": rule_set.name,
                    "rule_set_version": rule_set.version,
                    "first_failed_at": now,
                    "last_failed_at": now,
                    "parked_at": now if f.parked else None,
                    "record": records[f.event.key],
                }
                for f in new
            ],
        )
    again = [f for f in failures if f.event.key in existing]
    if again:
        # Executemany of one UPDATE keyed by id: COALESCE keeps the first parking time. The
        # parameter inside COALESCE takes no type from the column: it is given one (Instant).
        connection.execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("b_id"))
            .values(
                attempts=sa.bindparam("b_attempts"),
                reason=sa.bindparam("b_reason"),
                rule_set=rule_set.name,
                rule_set_version=rule_set.version,
                last_failed_at=now,
                parked_at=sa.func.coalesce(
                    table.c.parked_at, sa.bindparam("b_parked_at", type_=table.c.parked_at.type)
                ),
            ),
            [
                {
                    "b_id": existing[f.event.key],
                    "b_attempts": f.attempts,
                    "b_reason": f.reason,
                    "b_parked_at": now if f.parked else None,
                }
                for f in again
            ],
        )


class SqlDeadLetters:
    """The parked dead letters, read in short transactions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def dead_letters(self, ids: Sequence[int]) -> Sequence[DeadLetter]:
        if not ids:
            return []
        with self._sessions() as session:
            rows = session.scalars(
                sa.select(DeadLetterRow)
                .where(DeadLetterRow.id.in_(list(ids)), DeadLetterRow.parked_at.is_not(None))
                .order_by(DeadLetterRow.id)
            ).all()
            return [_dead_letter(r) for r in rows]

    def parked_count(self) -> int:
        with self._sessions() as session:
            query = sa.select(sa.func.count()).where(DeadLetterRow.parked_at.is_not(None))
            return int(session.scalar(query) or 0)

    def parked_ids(self, after: int | None, limit: int) -> Sequence[int]:
        with self._sessions() as session:
            query = sa.select(DeadLetterRow.id).where(DeadLetterRow.parked_at.is_not(None))
            if after is not None:
                query = query.where(DeadLetterRow.id > after)
            return list(session.scalars(query.order_by(DeadLetterRow.id).limit(limit)))

    def list_dead_letters(self, after: int | None, limit: int) -> Sequence[DeadLetter]:
        with self._sessions() as session:
            query = sa.select(DeadLetterRow).where(DeadLetterRow.parked_at.is_not(None))
            if after is not None:
                query = query.where(DeadLetterRow.id > after)
            rows = session.scalars(query.order_by(DeadLetterRow.id).limit(limit)).all()
            return [_dead_letter(r) for r in rows]


def _dead_letter(row: DeadLetterRow) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=row.id,
        event=engine_event_from_record(row.record),
        record=row.record,
        reason=row.reason,
        attempts=row.attempts,
        rule_set=row.rule_set,
        rule_set_version=row.rule_set_version,
        first_failed_at=as_utc(row.first_failed_at),
        last_failed_at=as_utc(row.last_failed_at),
        parked_at=as_utc(row.parked_at) if row.parked_at is not None else None,
    )
