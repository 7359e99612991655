"""An outcome's bytes are stored once, on SQLite and PostgreSQL (issue 18): in its
rules_outcomes row, which its outbox row refers to, and the relay sends exactly those
bytes. Rows written before migration 0011 keep their payload and are sent as written, and
the downgrade writes every referring row's payload back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session, sessionmaker

from egret.common.v1 import due_process_pb2, event_pb2, outcome_pb2, subject_pb2
from egret.score.v1 import score_service_pb2 as score_pb
from kit.audit import UNKEYED
from kit.db import create_engine, make_session_factory
from kit.migrations import alembic_config, upgrade
from kit.outbox_send import merged
from kit.packing import Packed, unpack
from kit.page_tokens import PageTokens
from kit.protoconv import to_attribute_value, to_timestamp
from services.rules.bootstrap import MIGRATIONS
from services.rules.domain import Evaluator, RetractionNotice
from services.rules.engine import RuleEngine, check_rule_set
from services.rules.lifecycle import RuleSetLifecycle
from services.rules.records import engine_event
from services.rules.stores.evaluation import SqlEvaluationStore
from services.rules.stores.outbox import outcome_request, stored_payloads
from services.rules.stores.rule_sets import SqlLifecycleStore
from services.rules.stores.schema import Base, EmittedOutcome, Outbox, OutboxLease
from tests.support.outbox import outbox_relay, relay_until_sent

SAMPLE = Path(__file__).parents[3] / "config/rulesets/sample.yaml"
VERSION_TABLE = "rules_alembic_version"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
SUBJECT = "ab" * 32
# An outcome id as rules makes them (lowercase hex: stored as its bytes since 0016).
LEGACY_ID = "0e" * 16


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def fare_evasion(n: int) -> event_pb2.RecordedEvent:
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source="metro", event_id=f"e{n}"),
        event_type="transport.metro.fare_evasion",
        subject_key=SUBJECT,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=to_timestamp(NOW - timedelta(days=10 - n)),
        recorded_at=to_timestamp(NOW),
        attributes={"station": to_attribute_value("Lianban"), "amount": to_attribute_value(4.0)},
        subject_key_id="k1",
    )


def evaluator(sessions: sessionmaker[Session]) -> Evaluator:
    rule_sets = SqlLifecycleStore(sessions, audit_keys=UNKEYED)
    lifecycle = RuleSetLifecycle(
        rule_sets, validate=check_rule_set, clock=lambda: NOW, tokens=PageTokens.development()
    )
    lifecycle.ensure_active(SAMPLE.read_text(encoding="utf-8"))
    return Evaluator(
        rule_sets=rule_sets,
        store=SqlEvaluationStore(sessions, key_id="k1"),
        clock=lambda: NOW,
        dead_letter_after=1,
        compile_rule_set=RuleEngine,
    )


def evaluate_and_retract(sessions: sessionmaker[Session]) -> None:
    """Three fare evasions (three outcomes and the window's), then the first is retracted
    (two reversals)."""
    live = evaluator(sessions)
    recorded = [fare_evasion(n) for n in range(3)]
    events = [engine_event(e) for e in recorded]
    live.evaluate(events, {ev.key: e.SerializeToString() for ev, e in zip(events, recorded, strict=True)})
    retraction = due_process_pb2.Retraction(
        ref=recorded[0].ref, subject_key=SUBJECT, reason="entered in error", subject_key_id="k1"
    )
    live.retract([RetractionNotice("metro/e0", SUBJECT, retraction.SerializeToString())])
    live.close()


async def relayed(sessions: sessionmaker[Session]) -> list[bytes]:
    """Every row of the outbox, as the service's relay sends it."""
    with sessions() as session:
        rows = int(session.scalar(sa.select(sa.func.count()).select_from(Outbox)) or 0)
    delivered: list[bytes] = []

    async def send(batch: list[bytes]) -> None:
        delivered.extend(batch)

    relay = outbox_relay(
        sessions, Outbox, OutboxLease, instance="test", send=send, batch_size=2, payloads_of=stored_payloads
    )
    await relay_until_sent([relay], rows)
    return delivered


def every_stored_blob(connection: sa.Connection) -> list[bytes]:
    """Every binary value in every rules table, unpacked where it was stored packed."""
    blobs: list[bytes] = []
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, sa.LargeBinary | Packed):
                stored = connection.scalars(sa.select(sa.type_coerce(column, sa.LargeBinary)))
                blobs.extend(unpack(bytes(v)) for v in stored if v is not None)
    return blobs


async def test_an_outcome_is_stored_once_and_the_relay_sends_exactly_its_stored_bytes(
    engine: sa.Engine,
) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    sessions = make_session_factory(engine)
    evaluate_and_retract(sessions)

    with engine.connect() as connection:
        outcomes = {
            i: bytes(o)
            for i, o in connection.execute(sa.select(EmittedOutcome.outcome_id, EmittedOutcome.outcome))
        }
        outbox = connection.execute(sa.select(Outbox.outcome_id, Outbox.payload).order_by(Outbox.id)).all()
        blobs = every_stored_blob(connection)
    assert len(outcomes) == 4
    for outcome_id, stored in outcomes.items():
        assert sum(blob.count(bytes(stored)) for blob in blobs) == 1, outcome_id
    referring = [row.outcome_id for row in outbox if row.outcome_id is not None]
    assert sorted(referring) == sorted(outcomes)
    assert all(row.payload == b"" for row in outbox if row.outcome_id is not None)
    assert sum(1 for row in outbox if row.outcome_id is None and row.payload) == 2  # the reversals

    delivered = await relayed(sessions)
    # Row by row, an outcome goes out as its stored bytes, verbatim; a reversal as written.
    assert delivered == [
        outcome_request(bytes(outcomes[row.outcome_id])) if row.outcome_id else bytes(row.payload)
        for row in outbox
    ]
    request = merged(score_pb.ApplyOutcomesRequest, delivered)
    assert list(request.outcomes) == [outcome_pb2.Outcome.FromString(outcomes[i]) for i in referring]
    assert {r.outcome_id for r in request.reversals} == {
        i for i in outcomes if outcome_pb2.Outcome.FromString(outcomes[i]).events[0].ref.event_id == "e0"
    }


def store_as_before_0011(engine: sa.Engine) -> bytes:
    """An outcome and its outbox row as the code before 0011 wrote them (the payload a copy)."""
    outcome = outcome_pb2.Outcome(outcome_id=LEGACY_ID, subject_key=SUBJECT, points=-10, reason="before")
    payload = score_pb.ApplyOutcomesRequest(outcomes=[outcome]).SerializeToString()
    with engine.begin() as connection:
        connection.execute(
            sa.table(
                "rules_outcomes",
                *(sa.column(c) for c in ("outcome_id", "subject_key", "rule_id", "rule_set")),
                *(sa.column(c) for c in ("rule_set_version", "points", "occurred_at", "emitted_at")),
                sa.column("outcome", sa.LargeBinary()),
            ).insert(),
            {
                "outcome_id": LEGACY_ID,
                "subject_key": SUBJECT,
                "rule_id": "r",
                "rule_set": "s",
                "rule_set_version": 1,
                "points": -10,
                "occurred_at": NOW,
                "emitted_at": NOW,
                "outcome": outcome.SerializeToString(),
            },
        )
        connection.execute(
            sa.table(
                "rules_outbox",
                sa.column("payload", sa.LargeBinary()),
                *(sa.column(c) for c in ("traceparent", "attempts", "available_at")),
            ).insert(),
            {"payload": payload, "traceparent": "", "attempts": 0, "available_at": NOW},
        )
    return payload


async def test_rows_from_before_0011_are_sent_as_written_and_the_downgrade_restores_payloads(
    engine: sa.Engine,
) -> None:
    upgrade(engine, MIGRATIONS, VERSION_TABLE, "0010")
    legacy = store_as_before_0011(engine)
    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    sessions = make_session_factory(engine)
    evaluate_and_retract(sessions)
    with engine.connect() as connection:
        stored = {
            i: bytes(o)
            for i, o in connection.execute(sa.select(EmittedOutcome.outcome_id, EmittedOutcome.outcome))
        }
        rows = connection.execute(sa.select(Outbox.outcome_id, Outbox.payload).order_by(Outbox.id)).all()
    # What the relay would send, row by row, before the downgrade.
    expected = [legacy] + [
        outcome_request(bytes(stored[row.outcome_id])) if row.outcome_id else bytes(row.payload)
        for row in rows[1:]
    ]

    config = alembic_config(MIGRATIONS, VERSION_TABLE)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0010")
    with engine.connect() as connection:
        downgraded = [
            bytes(p) for p in connection.scalars(sa.text("SELECT payload FROM rules_outbox ORDER BY id"))
        ]
    assert downgraded == expected
    assert all(downgraded)

    upgrade(engine, MIGRATIONS, VERSION_TABLE)
    assert await relayed(make_session_factory(engine)) == expected
