"""Rules' store: which events were evaluated, the outcomes emitted, and the outbox to score.

All three are written in one transaction per batch, so an event is either evaluated
with its outcomes queued for score, or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from egret.common.v1 import event_pb2, outcome_pb2
from kit.db import make_metadata
from kit.outbox import OutboxMixin, outbox_rows
from kit.protoconv import SEVERITY_VALUES, SUBJECT_KIND_VALUES, to_timestamp
from services.rules.domain import split_key
from services.rules.ruleset import EngineEvent, Firing, RuleSet


class Base(DeclarativeBase):
    metadata = make_metadata()


class EvaluatedEvent(Base):
    """An event rules has evaluated (the inbox), with its record for later replays."""

    __tablename__ = "rules_evaluated_events"

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(64), index=True)
    event_type: Mapped[str] = mapped_column(sa.String(128))
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    evaluated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    record: Mapped[bytes] = mapped_column(sa.LargeBinary)


class EmittedOutcome(Base):
    """An outcome rules emitted: the rules-side record of every firing."""

    __tablename__ = "rules_outcomes"

    outcome_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(64), index=True)
    rule_id: Mapped[str] = mapped_column(sa.String(128))
    rule_set: Mapped[str] = mapped_column(sa.String(128))
    rule_set_version: Mapped[int] = mapped_column(sa.Integer)
    points: Mapped[int] = mapped_column(sa.Integer)
    occurred_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    emitted_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    outcome: Mapped[bytes] = mapped_column(sa.LargeBinary)


class Outbox(Base, OutboxMixin):
    """Outcomes waiting to be relayed to the score service."""

    __tablename__ = "rules_outbox"


def outcome_message(firing: Firing, records: Mapping[str, bytes]) -> outcome_pb2.Outcome:
    """The Outcome sent to score, with the firing events as its evidence snapshot."""
    return outcome_pb2.Outcome(
        outcome_id=firing.outcome_id,
        rule=outcome_pb2.RuleRef(
            rule_id=firing.rule_id,
            rule_set=firing.rule_set,
            rule_set_version=firing.rule_set_version,
            title=firing.title,
            description=firing.description,
            legal_basis=firing.legal_basis,
        ),
        subject_key=firing.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[firing.subject_kind],
        points=firing.points,
        category=firing.category,
        severity=SEVERITY_VALUES[firing.severity],
        occurred_at=to_timestamp(firing.occurred_at),
        reason=firing.reason,
        black_list=firing.black_list,
        events=[event_pb2.RecordedEvent.FromString(records[key]) for key in firing.event_keys],
    )


class SqlEvaluationStore:
    """Inbox, outcomes and outbox on SQLAlchemy, bulk statements only."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def already_evaluated(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        by_source: dict[str, list[str]] = {}
        for source, event_id in keys:
            by_source.setdefault(source, []).append(event_id)
        found: set[tuple[str, str]] = set()
        with self._sessions() as session:
            for source, ids in by_source.items():
                rows = session.execute(
                    sa.select(EvaluatedEvent.event_id).where(
                        EvaluatedEvent.source == source, EvaluatedEvent.event_id.in_(ids)
                    )
                )
                found.update((source, r.event_id) for r in rows)
        return found

    def commit_evaluation(
        self,
        events: Sequence[EngineEvent],
        firings: Sequence[Firing],
        records: Mapping[str, bytes],
        *,
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        outcomes = {f.outcome_id: outcome_message(f, records) for f in firings}
        try:
            with self._sessions() as session, session.begin():
                session.execute(
                    sa.insert(EvaluatedEvent),
                    [
                        {
                            "source": split_key(e.key)[0],
                            "event_id": split_key(e.key)[1],
                            "subject_key": e.subject_key,
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
                fresh = self._not_yet_emitted(session, list(outcomes))
                if fresh:
                    by_id = {f.outcome_id: f for f in firings}
                    payloads = [outcomes[i].SerializeToString() for i in fresh]
                    session.execute(
                        sa.insert(EmittedOutcome),
                        [
                            {
                                "outcome_id": i,
                                "subject_key": by_id[i].subject_key,
                                "rule_id": by_id[i].rule_id,
                                "rule_set": rule_set.name,
                                "rule_set_version": rule_set.version,
                                "points": by_id[i].points,
                                "occurred_at": by_id[i].occurred_at,
                                "emitted_at": now,
                                "outcome": payload,
                            }
                            for i, payload in zip(fresh, payloads, strict=True)
                        ],
                    )
                    session.execute(sa.insert(Outbox), outbox_rows(payloads, now))
        except IntegrityError:
            return False
        return True

    @staticmethod
    def _not_yet_emitted(session: Session, outcome_ids: list[str]) -> list[str]:
        if not outcome_ids:
            return []
        existing = set(
            session.scalars(
                sa.select(EmittedOutcome.outcome_id).where(EmittedOutcome.outcome_id.in_(outcome_ids))
            )
        )
        return [i for i in outcome_ids if i not in existing]
