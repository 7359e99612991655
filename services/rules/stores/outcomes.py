"""Outcomes rules emitted and the events they consumed, written inside an evaluation's or a
retraction's transaction: new outcomes with their outbox rows, and the reversal of the
outcomes a later settlement superseded.

Writes are SQLAlchemy Core executemany statements on the tables (no ORM bulk machinery,
no RETURNING), on the session's connection, so in its transaction. Each new outcome is
serialized once and stored once, in rules_outcomes; its outbox row refers to it
(services.rules.stores.outbox).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.ruleset.model import Firing, RuleSet, reissued_id
from kit.outbox import outbox_rows
from services.rules.records import engine_event_from_record
from services.rules.stores.outbox import outcome_message
from services.rules.stores.schema import EmittedOutcome, Outbox, OutcomeEvent, table_of
from services.rules.stores.sql import chunks


class Superseded(Exception):
    """An outcome to reverse was reversed meanwhile: another evaluation settled the subject."""


def supersede(
    session: Session, reversals: Sequence[tuple[str, bytes]], *, by: Mapping[str, str], now: datetime
) -> None:
    """Reverse active outcomes (id, reversal payload): mark them, release their events,
    queue the reversals. Raises Superseded if one is no longer active."""
    if not reversals:
        return
    ids = [outcome_id for outcome_id, _ in reversals]
    table = table_of(EmittedOutcome)
    marked = session.connection().execute(
        sa.update(table)
        .where(table.c.outcome_id == sa.bindparam("b_id"), table.c.reversed_at.is_(None))
        .values(reversed_at=now, reversed_by=sa.bindparam("b_by")),
        [{"b_id": i, "b_by": by[i]} for i in ids],
    )
    if marked.rowcount != len(ids):
        raise Superseded
    # Releases the events they consumed (their evidence stays in the outcome's record).
    consumed = table_of(OutcomeEvent)
    connection = session.connection()
    for chunk in chunks(ids):
        connection.execute(sa.delete(consumed).where(consumed.c.outcome_id.in_(chunk)))
    connection.execute(sa.insert(table_of(Outbox)), outbox_rows([payload for _, payload in reversals], now))


def emit(
    session: Session,
    firings: Sequence[Firing],
    records: Mapping[str, bytes],
    occurred: Mapping[str, datetime],
    *,
    rule_set: RuleSet,
    now: datetime,
    key_id: str,
) -> None:
    """Record the firings not emitted before, their consumed events and outbox rows, every
    key of generation `key_id`."""
    firings = _reissued(session, firings)
    by_id = {f.outcome_id: f for f in firings}
    fresh = _not_yet_emitted(session, list(by_id))
    if not fresh:
        return
    # Each outcome serialized once: these bytes are stored, and sent from where they are.
    stored = {i: outcome_message(by_id[i], records, key_id).SerializeToString() for i in fresh}
    connection = session.connection()
    connection.execute(
        sa.insert(table_of(EmittedOutcome)),
        [
            {
                "outcome_id": i,
                "subject_key": by_id[i].subject_key,
                "subject_key_id": key_id,
                "rule_id": by_id[i].rule_id,
                "rule_set": rule_set.name,
                "rule_set_version": rule_set.version,
                "points": by_id[i].points,
                "occurred_at": by_id[i].occurred_at,
                "emitted_at": now,
                "outcome": stored[i],
            }
            for i in fresh
        ],
    )
    connection.execute(
        sa.insert(table_of(OutcomeEvent)),
        [
            {
                "outcome_id": i,
                "event_key": key,
                "subject_key": by_id[i].subject_key,
                "subject_key_id": key_id,
                "occurred_at": occurred.get(key) or _occurred(records, key),
            }
            for i in fresh
            for key in dict.fromkeys(by_id[i].event_keys)
        ],
    )
    # The payload stays empty: the relay reads the outcome's stored bytes (stored_payloads).
    rows = outbox_rows([b""] * len(fresh), now)
    for row, outcome_id in zip(rows, fresh, strict=True):
        row["outcome_id"] = outcome_id
    connection.execute(sa.insert(table_of(Outbox)), rows)


def _reissued(session: Session, firings: Sequence[Firing]) -> list[Firing]:
    """The firings, each whose id belongs to a reversed outcome under the next id of
    its line (reissued_id): the same events can form an outcome again after it was
    reversed (a late event regrouped them, then was retracted), and a reversed id
    must stay reversed at score. An id already active stays as it is (a redelivery)."""
    outcomes = table_of(EmittedOutcome)
    result = list(firings)
    originals = {i: f.outcome_id for i, f in enumerate(result)}
    current = dict(originals)
    generation = 0
    while current:
        reversed_ids: set[str] = set()
        for chunk in chunks(list(set(current.values()))):
            reversed_ids.update(
                session.connection().scalars(
                    sa.select(outcomes.c.outcome_id).where(
                        outcomes.c.outcome_id.in_(chunk), outcomes.c.reversed_at.is_not(None)
                    )
                )
            )
        generation += 1
        current = {
            i: reissued_id(originals[i], generation) for i, oid in current.items() if oid in reversed_ids
        }
        for i, oid in current.items():
            result[i] = dataclasses.replace(result[i], outcome_id=oid)
    return result


def _not_yet_emitted(session: Session, outcome_ids: list[str]) -> list[str]:
    if not outcome_ids:
        return []
    outcomes = table_of(EmittedOutcome)
    existing: set[str] = set()
    for chunk in chunks(outcome_ids):
        existing.update(
            session.connection().scalars(
                sa.select(outcomes.c.outcome_id).where(outcomes.c.outcome_id.in_(chunk))
            )
        )
    return [i for i in outcome_ids if i not in existing]


def _occurred(records: Mapping[str, bytes], key: str) -> datetime:
    return engine_event_from_record(records[key]).occurred_at
