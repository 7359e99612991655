"""Rotating the subject key in rules (issue 12, point 7; docs/security.md, "Rotating the
subject key"), on SQLite and PostgreSQL with the real rules server and a recording score.

History is stored under the root generation k1, then `rekey` (the service's command, which
`migrate` runs too) moves it to k2: every keyed row and every stored copy that embeds the
key, with the chain recording it and keeping its own records as written. Keys still
arriving under k1 are moved forward, so a window spanning the rotation fires once for the
one subject; an instance of the old generation and a key of an unknown one are refused
with UNAVAILABLE; a killed job resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from egret.common.v1 import due_process_pb2, event_pb2, outcome_pb2, subject_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.protoconv import Scalar, to_attribute_value, to_timestamp
from kit.pseudonym import KeyLink, Pseudonymiser, resident_id_check_character
from kit.rekey import read_marker, rekey
from kit.settings import AuditSettings, PseudonymSettings
from services.rules.bootstrap import MIGRATIONS, build
from services.rules.bootstrap import main as rules_main
from services.rules.settings import RulesSettings
from services.rules.stores.schema import (
    KEYED,
    DeadLetterRow,
    EmittedOutcome,
    EvaluatedEvent,
    RetractionRow,
    RulesAuditHead,
    RulesAuditLog,
    RulesSubjectKeyGeneration,
)
from tests.support.fakes import serving
from tests.support.recording_score import RecordingScore
from tests.support.rules import V1 as FRAGILE_V1
from tests.support.rules import WINDOW, rules_settings
from tests.support.servers import running, with_common
from tests.support.waiting import until

ROOT = b"root-subject-key-0123456789abcdef"
K2_SECRET = b"second-generation-secret-0123456789"
# Ingest's chains: the root key, then the rotation. Rules holds the rotation without the root.
V1 = Pseudonymiser(ROOT, "k1")
V2 = Pseudonymiser(ROOT, "k1", (KeyLink("k2", K2_SECRET),))
ROTATED = PseudonymSettings(b"", "k1", (("k2", K2_SECRET),))
AUDIT_KEY = b"rules-audit-key-0123456789abcdef0123"
WHEN = datetime(2026, 6, 1, tzinfo=UTC)


def person(n: int) -> str:
    body = f"11010519800101{n:03d}"
    return body + resident_id_check_character(body)


ALICE, BOB = person(101), person(102)

# A window over fare evasions, and a per-event rule that cannot evaluate days_late = 40
# (parked at once: dead_letter_after_attempts = 1).
RULES = WINDOW + FRAGILE_V1.split("rules:\n", 1)[1]


@pytest.fixture
async def score() -> AsyncIterator[tuple[RecordingScore, str]]:
    recorder = RecordingScore()
    async with serving(score_grpc.add_ScoreServiceServicer_to_server, recorder) as address:
        yield recorder, address


def key(chain: Pseudonymiser, raw_id: str) -> str:
    return chain.subject_key("person", "resident-id", raw_id)


def event(
    event_id: str,
    event_type: str,
    attributes: dict[str, Scalar],
    raw_id: str,
    day: int,
    chain: Pseudonymiser = V1,
    key_id: str = "k1",
) -> event_pb2.RecordedEvent:
    when = to_timestamp(WHEN + timedelta(days=day))
    source = event_type.split(".", maxsplit=1)[0]
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source=source, event_id=event_id),
        event_type=event_type,
        subject_key=key(chain, raw_id),
        subject_key_id=key_id,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=when,
        recorded_at=when,
        attributes={k: to_attribute_value(v) for k, v in attributes.items()},
    )


def evasion(event_id: str, raw_id: str, day: int, **generation: Any) -> event_pb2.RecordedEvent:
    return event(event_id, "transport.metro.fare_evasion", {}, raw_id, day, **generation)


def late(event_id: str, days: int, raw_id: str, day: int, **generation: Any) -> event_pb2.RecordedEvent:
    return event(event_id, "library.book_returned_late", {"days_late": days}, raw_id, day, **generation)


def retraction(event_id: str, raw_id: str, chain: Pseudonymiser, key_id: str) -> due_process_pb2.Retraction:
    return due_process_pb2.Retraction(
        ref=event_pb2.EventRef(source="library", event_id=event_id),
        subject_key=key(chain, raw_id),
        subject_key_id=key_id,
        reason="recorded in error",
        retracted_by="library-clerk",
    )


def settings_for(database_url: str, data_dir: Path, score_address: str) -> RulesSettings:
    """The instance before the rotation: the root generation k1 only, a keyed audit chain."""
    (data_dir / "audit.key").write_bytes(AUDIT_KEY)
    settings = rules_settings(database_url, data_dir, score_address, source=RULES, attempts=1)
    keyed: RulesSettings = with_common(settings, audit=AuditSettings(key_id="a1", keys={"a1": AUDIT_KEY}))
    return keyed


async def store_history(stub: pb_grpc.RulesServiceAsyncStub) -> None:
    """Under k1: two of Alice's three fare evasions (the window stays open), an outcome, a
    parked event, a retracted event and its reversed outcome; one of Bob's evasions."""
    response = await stub.EvaluateEvents(
        pb.EvaluateEventsRequest(
            events=[
                evasion("e1", ALICE, 0),
                evasion("e2", ALICE, 10),
                late("l1", 35, ALICE, 1),
                late("l2", 40, ALICE, 2),
                late("l3", 50, ALICE, 3),
                evasion("b1", BOB, 0),
            ],
            retractions=[retraction("l3", ALICE, V1, "k1")],
        )
    )
    assert (response.evaluated, response.outcomes, response.parked) == (5, 2, 1)
    assert (response.retracted, response.reversed) == (1, 1)
    # A read of the dead letters with a purpose: its records keep the key they were written with.
    listed = await stub.ListDeadLetters(pb.ListDeadLettersRequest(purpose="operations"))
    assert [d.event.subject_key for d in listed.dead_letters] == [key(V1, ALICE)]


def generations(database_url: str) -> dict[str, set[str | None]]:
    """The key generations stored in each keyed table, and embedded in its stored copies
    (None: a row from before generations were recorded)."""
    engine = create_engine(database_url)
    found: dict[str, set[str | None]] = {}
    try:
        with engine.connect() as connection:
            for column in KEYED.columns:
                table = column.table
                found[table.name] = set(connection.scalars(sa.select(table.c.subject_key_id).distinct()))
            events = [
                event_pb2.RecordedEvent.FromString(record)
                for model in (EvaluatedEvent, DeadLetterRow)
                for record in connection.scalars(sa.select(model.record))
            ]
            outcomes = [
                outcome_pb2.Outcome.FromString(payload)
                for payload in connection.scalars(sa.select(EmittedOutcome.outcome))
            ]
            retractions = [
                due_process_pb2.Retraction.FromString(record)
                for record in connection.scalars(sa.select(RetractionRow.record))
            ]
    finally:
        engine.dispose()
    embedded: dict[str, list[Any]] = {
        "stored events": events,
        "stored outcomes": [*outcomes, *(e for o in outcomes for e in o.events)],
        "stored retractions": retractions,
    }
    for name, messages in embedded.items():
        found[name] = {m.subject_key_id for m in messages}
    return found


def not_only(held: dict[str, set[str | None]], key_id: str) -> dict[str, set[str | None]]:
    """The tables (and stored copies) holding keys of another generation than `key_id`."""
    return {table: ids for table, ids in held.items() if ids != {key_id}}


def stored_keys(database_url: str) -> set[str]:
    """Every subject key stored in the keyed tables and their stored copies."""
    engine = create_engine(database_url)
    keys: set[str] = set()
    try:
        with engine.connect() as connection:
            for column in KEYED.columns:
                keys.update(connection.scalars(sa.select(column.table.c.subject_key)))
            for record in connection.scalars(sa.select(EvaluatedEvent.record)):
                keys.add(event_pb2.RecordedEvent.FromString(record).subject_key)
            for payload in connection.scalars(sa.select(EmittedOutcome.outcome)):
                outcome = outcome_pb2.Outcome.FromString(payload)
                keys.update([outcome.subject_key, *(e.subject_key for e in outcome.events)])
            for record in connection.scalars(sa.select(RetractionRow.record)):
                keys.add(due_process_pb2.Retraction.FromString(record).subject_key)
    finally:
        engine.dispose()
    return keys


def audit_chain(database_url: str) -> tuple[audit.ChainReport, list[tuple[str, str | None]]]:
    engine = create_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            report = audit.verify(
                session, RulesAuditLog, RulesAuditHead, keys=audit.AuditKeys("a1", {"a1": AUDIT_KEY})
            )
            records = [
                (row.action, row.subject_key)
                for row in session.execute(
                    sa.select(RulesAuditLog.action, RulesAuditLog.subject_key).order_by(RulesAuditLog.seq)
                )
            ]
    finally:
        engine.dispose()
    return report, records


def marker(database_url: str) -> tuple[str, bool] | None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return read_marker(connection, RulesSubjectKeyGeneration)
    finally:
        engine.dispose()


def rekey_command(monkeypatch: pytest.MonkeyPatch, settings: RulesSettings, *command: str) -> int:
    """`python -m services.rules <command>` with the rotation configured."""
    monkeypatch.setenv("EGRET_DATABASE_URL", settings.common.database_url)
    monkeypatch.setenv("EGRET_DATA_DIR", str(settings.common.data_dir))
    monkeypatch.setenv("EGRET_RULESET_FILE", str(settings.ruleset_file))
    monkeypatch.setenv("EGRET_AUDIT_KEY_FILE", str(settings.common.data_dir / "audit.key"))
    monkeypatch.setenv("EGRET_SUBJECT_KEY_ROTATIONS", f"k2:{K2_SECRET.decode()}")
    return rules_main(list(command))


async def test_rotation_moves_every_stored_key_and_keys_in_flight_join_their_subject(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, score_address = score
    old = settings_for(database_url, tmp_path, score_address)
    async with (
        running(old, build, MIGRATIONS) as old_address,
        grpc.aio.insecure_channel(old_address) as old_channel,
    ):
        old_stub = pb_grpc.RulesServiceStub(old_channel)
        await store_history(old_stub)
        await until(lambda: len(recorder.outcomes) == 2 and len(recorder.reversals) == 1)
        assert {o.subject_key_id for o in recorder.outcomes} == {"k1"}
        assert generations(database_url)["rules_evaluated_events"] == {"k1"}
        # Rows from before generations were recorded are of the root generation.
        engine = create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(
                sa.update(EvaluatedEvent).where(EvaluatedEvent.event_id == "e1").values(subject_key_id=None)
            )
        engine.dispose()
        _, before = audit_chain(database_url)

        # The rotation, while the old instance still serves (the command waits 2 s for its
        # transactions to end; the event loop keeps serving meanwhile).
        assert await asyncio.to_thread(rekey_command, monkeypatch, old, "rekey") == 0
        assert marker(database_url) == ("k2", True)
        # The old instance now refuses: it would write keys of the old generation.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await old_stub.EvaluateEvents(pb.EvaluateEventsRequest(events=[evasion("e3", ALICE, 20)]))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "generation 'k2'" in (refused.value.details() or "")

    assert not_only(generations(database_url), "k2") == {}
    assert stored_keys(database_url) == {key(V2, ALICE), key(V2, BOB)}
    report, after = audit_chain(database_url)
    assert report.intact, report.problems
    # The chain keeps its records as written (the read of the dead letters keeps Alice's k1
    # key) and gains the job's: one per table's batch and one for the completed rotation.
    assert after[: len(before)] == before
    assert ("read:ListDeadLetters", key(V1, ALICE)) in before
    assert [action for action, _ in after[len(before) :]] == [
        *["subject-keys-rekeyed"] * len(KEYED.columns),
        "subject-keys-rotated",
    ]
    assert await asyncio.to_thread(rekey_command, monkeypatch, old, "verify-audit") == 0

    new = replace(old, pseudonym=ROTATED)
    async with running(new, build, MIGRATIONS) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RulesServiceStub(channel)
        # Ingest's outbox still holds k1 keys, and a rotated ingest sends k2 keys: both reach
        # Alice's one history, so her window fires once, on her k2 key.
        response = await stub.EvaluateEvents(
            pb.EvaluateEventsRequest(
                events=[evasion("e3", ALICE, 20), evasion("b2", BOB, 5, chain=V2, key_id="k2")],
                retractions=[retraction("l1", ALICE, V1, "k1")],
            )
        )
        assert (response.evaluated, response.outcomes, response.retracted, response.reversed) == (2, 1, 1, 1)
        await until(lambda: len(recorder.outcomes) == 3 and len(recorder.reversals) == 2)
        window = recorder.outcomes[-1]
        assert window.rule.rule_id == "transport.fare_evasion_repeated"
        assert (window.subject_key, window.subject_key_id) == (key(V2, ALICE), "k2")
        assert [(e.ref.event_id, e.subject_key, e.subject_key_id) for e in window.events] == [
            (event_id, key(V2, ALICE), "k2") for event_id in ("e1", "e2", "e3")
        ]
        reversal = recorder.reversals[-1]
        assert (reversal.subject_key, reversal.subject_key_id) == (key(V2, ALICE), "k2")
        assert (reversal.retraction.subject_key, reversal.retraction.subject_key_id) == (key(V2, ALICE), "k2")
        # The dead letter's stored copy moved too.
        listed = await stub.ListDeadLetters(pb.ListDeadLettersRequest(purpose="operations"))
        assert [(d.event.subject_key, d.event.subject_key_id) for d in listed.dead_letters] == [
            (key(V2, ALICE), "k2")
        ]

        # A generation this instance does not know yet: refused whole, for the relay to retry.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.EvaluateEvents(
                pb.EvaluateEventsRequest(
                    events=[
                        evasion("e4", ALICE, 30, chain=V2, key_id="k2"),
                        evasion("e5", ALICE, 31, key_id="k3"),
                    ]
                )
            )
        assert unknown.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "'k3' is not configured" in (unknown.value.details() or "")

    assert not_only(generations(database_url), "k2") == {}
    assert stored_keys(database_url) == {key(V2, ALICE), key(V2, BOB)}
    window_outcomes = [o for o in recorder.outcomes if o.rule.rule_id == "transport.fare_evasion_repeated"]
    assert len(window_outcomes) == 1
    engine = create_engine(database_url)
    with engine.connect() as connection:
        stored_events = set(connection.scalars(sa.select(EvaluatedEvent.event_id)))
    engine.dispose()
    assert not stored_events & {"e4", "e5"}


async def test_a_killed_rekeying_job_resumes_and_completes(
    database_url: str, tmp_path: Path, score: tuple[RecordingScore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = settings_for(database_url, tmp_path, score[1])
    async with running(old, build, MIGRATIONS) as address, grpc.aio.insecure_channel(address) as channel:
        await store_history(pb_grpc.RulesServiceStub(channel))
    before = generations(database_url)
    engine = create_engine(database_url)
    keys = audit.AuditKeys("a1", {"a1": AUDIT_KEY})
    chain = Pseudonymiser.from_settings(ROTATED)
    try:
        with engine.connect() as connection:
            rows = sum(
                int(connection.scalar(sa.select(sa.func.count()).select_from(c.table)) or 0)
                for c in KEYED.columns
            )
        batches = 0
        append = audit.append

        def killed_after_the_first_batch(*args: Any, **kwargs: Any) -> None:
            # The kill: the second batch's transaction fails, its row stays as it was.
            nonlocal batches
            batches += 1
            if batches == 2:
                raise KeyboardInterrupt
            append(*args, **kwargs)

        with monkeypatch.context() as patched:
            patched.setattr(audit, "append", killed_after_the_first_batch)
            with pytest.raises(KeyboardInterrupt):
                rekey(engine, KEYED, chain, keys, batch_size=1, settle_s=0)
        assert marker(database_url) == ("k2", False)
        partial = generations(database_url)
        assert partial["rules_evaluated_events"] == {"k1", "k2"}
        for column in KEYED.columns[1:]:
            assert partial[column.table.name] == before[column.table.name] == {"k1"}

        resumed = rekey(engine, KEYED, chain, keys, batch_size=2, settle_s=0)
        assert resumed.moved == rows - 1
        assert rekey(engine, KEYED, chain, keys, settle_s=0).moved == 0
    finally:
        engine.dispose()
    assert marker(database_url) == ("k2", True)
    assert not_only(generations(database_url), "k2") == {}
    assert stored_keys(database_url) == {key(V2, ALICE), key(V2, BOB)}
    report, records = audit_chain(database_url)
    assert report.intact, report.problems
    assert [action for action, _ in records].count("subject-keys-rotated") == 1
    assert await asyncio.to_thread(rekey_command, monkeypatch, old, "verify-audit") == 0
