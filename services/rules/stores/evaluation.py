"""Evaluation's store: the inbox of evaluated events and of retractions, each batch or
retraction written in one transaction.

An event is either evaluated with its outcomes queued for score (or recorded as failed),
or not at all. Every per-batch statement is a bulk one; no query runs per event.

An evaluation or a retraction that settles a subject again in event time reverses the
outcomes it superseded in the same transaction: each is marked (only if still active,
otherwise the transaction yields to the evaluation that got there first), its consumed
events released and a reversal queued for score (services.rules.stores.outcomes). A
retraction also records itself (the inbox of retractions) and marks the event retracted
(it leaves every later history read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from domain.ruleset.model import EngineEvent, RuleSet
from egret.common.v1 import due_process_pb2
from kit.db import as_utc
from services.rules.batch import EvaluationContext, history_order
from services.rules.domain import (
    BatchState,
    DeadLetter,
    Failure,
    RetractionContext,
    RetractionNotice,
    ReversedOutcome,
    split_key,
)
from services.rules.evaluated import Evaluated
from services.rules.records import engine_event_from_record
from services.rules.stores.dead_letters import SqlDeadLetters, record_failures
from services.rules.stores.outbox import regrouped_payload, reversal_payload
from services.rules.stores.outcomes import Superseded, emit, supersede
from services.rules.stores.schema import (
    DeadLetterRow,
    EmittedOutcome,
    EvaluatedEvent,
    OutcomeEvent,
    RetractionRow,
    table_of,
)
from services.rules.stores.sql import chunks, key_filter
from services.rules.windows import PriorOutcome


class SqlEvaluationStore:
    """Inbox, outcomes, outbox and dead letters on SQLAlchemy, bulk statements only.
    `key_id`: the current generation of subject keys, stored next to every key written."""

    def __init__(self, sessions: sessionmaker[Session], *, key_id: str) -> None:
        self._sessions = sessions
        self._key_id = key_id
        self._dead_letters = SqlDeadLetters(sessions)

    def batch_state(self, keys: Sequence[str]) -> BatchState:
        if not keys:
            return BatchState()
        evaluated: set[str] = set()
        parked: set[str] = set()
        retracted: set[str] = set()
        attempts: dict[str, int] = {}
        with self._sessions() as session:
            for chunk in chunks(list(dict.fromkeys(keys))):
                rows = session.execute(
                    sa.select(EvaluatedEvent.source, EvaluatedEvent.event_id).where(
                        key_filter(EvaluatedEvent, chunk)
                    )
                )
                evaluated.update(f"{r.source}/{r.event_id}" for r in rows)
                gone = session.execute(
                    sa.select(RetractionRow.source, RetractionRow.event_id).where(
                        key_filter(RetractionRow, chunk)
                    )
                )
                retracted.update(f"{r.source}/{r.event_id}" for r in gone)
                letters = session.execute(
                    sa.select(
                        DeadLetterRow.source,
                        DeadLetterRow.event_id,
                        DeadLetterRow.attempts,
                        DeadLetterRow.parked_at,
                    ).where(key_filter(DeadLetterRow, chunk))
                )
                for r in letters:
                    key = f"{r.source}/{r.event_id}"
                    if r.parked_at is not None:
                        parked.add(key)
                    else:
                        attempts[key] = r.attempts
        return BatchState(frozenset(evaluated), frozenset(parked), attempts, frozenset(retracted))

    def context(self, since: Mapping[str, datetime], event_types: frozenset[str]) -> EvaluationContext:
        history: dict[str, list[EngineEvent]] = {}
        records: dict[str, bytes] = {}
        prior: dict[str, list[PriorOutcome]] = {}
        if not since:
            return EvaluationContext({}, {}, {})
        # One bound for the whole statement (the index on subject and time bounds it),
        # then each subject's own instant in Python.
        low = min(since.values())
        subjects = list(since)

        def reaches(subject: str, occurred_at: datetime) -> bool:
            return as_utc(occurred_at) >= since[subject]

        with self._sessions() as session:
            for chunk in chunks(subjects):
                rows = session.execute(
                    sa.select(EvaluatedEvent.subject_key, EvaluatedEvent.occurred_at, EvaluatedEvent.record)
                    .where(
                        EvaluatedEvent.subject_key.in_(chunk),
                        EvaluatedEvent.occurred_at >= low,
                        EvaluatedEvent.event_type.in_(sorted(event_types)),
                        EvaluatedEvent.retracted_at.is_(None),
                    )
                    .order_by(EvaluatedEvent.occurred_at, EvaluatedEvent.source, EvaluatedEvent.event_id)
                )
                for row in rows:
                    if reaches(row.subject_key, row.occurred_at):
                        event = engine_event_from_record(row.record)
                        history.setdefault(row.subject_key, []).append(event)
                        records[event.key] = row.record
                # Every active outcome with an event from the subject's instant on, whole
                # (an outcome that starts earlier decides what its region may reuse).
                reaching = (
                    sa.select(OutcomeEvent.outcome_id)
                    .where(OutcomeEvent.subject_key.in_(chunk), OutcomeEvent.occurred_at >= low)
                    .scalar_subquery()
                )
                uses = session.execute(
                    sa.select(
                        OutcomeEvent.outcome_id,
                        EmittedOutcome.rule_id,
                        OutcomeEvent.subject_key,
                        OutcomeEvent.event_key,
                        OutcomeEvent.occurred_at,
                        EmittedOutcome.points,
                    )
                    .join(EmittedOutcome, EmittedOutcome.outcome_id == OutcomeEvent.outcome_id)
                    .where(OutcomeEvent.outcome_id.in_(reaching))
                    .order_by(OutcomeEvent.outcome_id, OutcomeEvent.occurred_at, OutcomeEvent.event_key)
                )
                grouped: dict[str, list[Any]] = {}
                for use in uses:
                    grouped.setdefault(use.outcome_id, []).append(use)
                for outcome_id, events in grouped.items():
                    first, last = events[0], events[-1]
                    if not reaches(first.subject_key, last.occurred_at):
                        continue
                    prior.setdefault(first.subject_key, []).append(
                        PriorOutcome(
                            outcome_id=outcome_id,
                            rule_id=first.rule_id,
                            subject_key=first.subject_key,
                            event_keys=tuple(e.event_key for e in events),
                            first_at=as_utc(first.occurred_at),
                            last_at=as_utc(last.occurred_at),
                            points=first.points,
                        )
                    )
        for events in history.values():
            # SQL orders equal instants by the database's collation; the engine's order is one.
            events.sort(key=history_order)
        return EvaluationContext(history=history, prior=prior, records=records)

    def reversed_among(self, outcome_ids: Sequence[str]) -> frozenset[str]:
        reversed_ids: set[str] = set()
        with self._sessions() as session:
            for chunk in chunks(list(outcome_ids)):
                reversed_ids.update(
                    session.scalars(
                        sa.select(EmittedOutcome.outcome_id).where(
                            EmittedOutcome.outcome_id.in_(chunk), EmittedOutcome.reversed_at.is_not(None)
                        )
                    )
                )
        return frozenset(reversed_ids)

    def commit_evaluation(
        self,
        events: Sequence[EngineEvent],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        failures: Sequence[Failure] = (),
        cleared: Sequence[str] = (),
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        occurred = {e.key: e.occurred_at for e in events}
        try:
            with self._sessions() as session, session.begin():
                if events:
                    session.connection().execute(
                        sa.insert(table_of(EvaluatedEvent)),
                        [
                            {
                                "source": split_key(e.key)[0],
                                "event_id": split_key(e.key)[1],
                                "subject_key": e.subject_key,
                                "subject_key_id": self._key_id,
                                "event_type": e.event_type,
                                "occurred_at": e.occurred_at,
                                "evaluated_at": now,
                                "rule_set": rule_set.name,
                                "rule_set_version": rule_set.version,
                                "record": records[e.key],
                            }
                            for e in events
                        ],
                    )
                supersede(
                    session,
                    [
                        (
                            s.outcome.outcome_id,
                            regrouped_payload(
                                s.outcome.outcome_id, s.outcome.subject_key, s.by, self._key_id
                            ),
                        )
                        for s in evaluated.superseded
                    ],
                    by={s.outcome.outcome_id: s.by for s in evaluated.superseded},
                    now=now,
                )
                emit(
                    session,
                    evaluated.firings,
                    records,
                    occurred,
                    rule_set=rule_set,
                    now=now,
                    key_id=self._key_id,
                )
                if cleared:
                    letters = table_of(DeadLetterRow)
                    for chunk in chunks(list(cleared)):
                        session.connection().execute(sa.delete(letters).where(key_filter(letters.c, chunk)))
                if failures:
                    record_failures(
                        session, failures, records, rule_set=rule_set, now=now, key_id=self._key_id
                    )
        except (IntegrityError, Superseded):
            return False
        return True

    def retraction_context(self, notice: RetractionNotice) -> RetractionContext | None:
        source, event_id = split_key(notice.key)
        with self._sessions() as session:
            applied = session.scalar(
                sa.select(RetractionRow.source).where(
                    RetractionRow.source == source, RetractionRow.event_id == event_id
                )
            )
            if applied is not None:
                return None
            record = session.scalar(
                sa.select(EvaluatedEvent.record).where(
                    EvaluatedEvent.source == source, EvaluatedEvent.event_id == event_id
                )
            )
            if record is None:
                # Never evaluated (parked, or still failing): it caused nothing to reverse.
                return RetractionContext((), None)
            event = engine_event_from_record(record)
            # The subject's index bounds this; a subject has few outcomes per event.
            used_by = list(
                session.scalars(
                    sa.select(OutcomeEvent.outcome_id).where(
                        OutcomeEvent.subject_key == event.subject_key, OutcomeEvent.event_key == notice.key
                    )
                )
            )
            rules_of = {
                row.outcome_id: row.rule_id
                for row in session.execute(
                    sa.select(EmittedOutcome.outcome_id, EmittedOutcome.rule_id).where(
                        EmittedOutcome.outcome_id.in_(used_by), EmittedOutcome.reversed_at.is_(None)
                    )
                )
            }
            keys_of: dict[str, list[str]] = {}
            for outcome_id, key in session.execute(
                sa.select(OutcomeEvent.outcome_id, OutcomeEvent.event_key)
                .where(OutcomeEvent.outcome_id.in_(list(rules_of)))
                .order_by(OutcomeEvent.outcome_id, OutcomeEvent.occurred_at, OutcomeEvent.event_key)
            ):
                keys_of.setdefault(outcome_id, []).append(key)
        reversed_outcomes = tuple(
            ReversedOutcome(outcome_id, rules_of[outcome_id], tuple(keys_of.get(outcome_id, ())))
            for outcome_id in sorted(rules_of)
        )
        return RetractionContext(reversed_outcomes, event)

    def commit_retraction(
        self,
        notice: RetractionNotice,
        reversed_ids: Sequence[str],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        source, event_id = split_key(notice.key)
        retraction = due_process_pb2.Retraction.FromString(notice.record)
        try:
            with self._sessions() as session, session.begin():
                # First: a concurrent application of the same retraction fails here, on the key.
                session.connection().execute(
                    sa.insert(table_of(RetractionRow)).values(
                        source=source,
                        event_id=event_id,
                        subject_key=notice.subject_key,
                        subject_key_id=self._key_id,
                        applied_at=now,
                        reversed=len(reversed_ids) + len(evaluated.superseded),
                        reformed=len(evaluated.firings),
                        record=notice.record,
                    )
                )
                inbox, letters = table_of(EvaluatedEvent), table_of(DeadLetterRow)
                session.connection().execute(
                    sa.update(inbox)
                    .where(inbox.c.source == source, inbox.c.event_id == event_id)
                    .values(retracted_at=now)
                )
                # A parked or failing copy of the event must never be redriven.
                session.connection().execute(
                    sa.delete(letters).where(letters.c.source == source, letters.c.event_id == event_id)
                )
                ids = [*reversed_ids, *(s.outcome.outcome_id for s in evaluated.superseded)]
                supersede(
                    session,
                    [(i, reversal_payload(i, retraction, self._key_id)) for i in ids],
                    by=dict.fromkeys(ids, notice.key),
                    now=now,
                )
                emit(session, evaluated.firings, records, {}, rule_set=rule_set, now=now, key_id=self._key_id)
        except (IntegrityError, Superseded):
            return False
        return True

    def dead_letters(self, ids: Sequence[int]) -> Sequence[DeadLetter]:
        return self._dead_letters.dead_letters(ids)

    def parked_count(self) -> int:
        return self._dead_letters.parked_count()

    def parked_ids(self, after: int | None, limit: int) -> Sequence[int]:
        return self._dead_letters.parked_ids(after, limit)

    def list_dead_letters(self, after: int | None, limit: int) -> Sequence[DeadLetter]:
        return self._dead_letters.list_dead_letters(after, limit)
