"""Rotating the subject key in ingest (issue 12, point 7; docs/security.md, "Rotating the
subject key"), on SQLite and PostgreSQL with the real ingest server and a recording rules.

Events and a retraction are stored under the root generation k1, then `rekey` (the
service's command, which `migrate` runs too) moves them to k2 while the old instance still
serves: every stored key, every stored RecordedEvent and every fingerprint, with the audit
chain recording the move and keeping its own records as written. The old instance then
answers UNAVAILABLE; an instance of k2 stores k2 keys, still knows a resent event as a
duplicate, and retracts an event stored before the rotation under the key rules now holds.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from egret.common.v1 import due_process_pb2, event_pb2
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.pseudonym import KeyLink, Pseudonymiser
from kit.rekey import read_marker
from kit.settings import AuditSettings, PseudonymSettings
from services.ingest.bootstrap import MIGRATIONS, build, main
from services.ingest.settings import IngestSettings
from services.ingest.stores.events import (
    IngestAuditHead,
    IngestAuditLog,
    IngestSubjectKeyGeneration,
    StoredEvent,
    StoredRetraction,
)
from tests.support.events import TEST_SUBJECT_KEY, resident_id
from tests.support.fakes import RecordingRules, serving_rules
from tests.support.ingest import ingest_settings, late
from tests.support.servers import client_channel, running, with_common
from tests.support.waiting import until

K2_SECRET = b"ingest-test-second-generation-secret-0123"
V1 = Pseudonymiser(TEST_SUBJECT_KEY, "k1")
V2 = Pseudonymiser(TEST_SUBJECT_KEY, "k1", (KeyLink("k2", K2_SECRET),))
AUDIT_KEY = b"ingest-audit-key-0123456789abcdef0123"
AUDIT_KEYS = audit.AuditKeys("a1", {"a1": AUDIT_KEY})
ALICE, BOB = resident_id(101), resident_id(102)


def key(chain: Pseudonymiser, subject: str) -> str:
    return chain.subject_key("person", "resident-id", subject)


def settings_for(database_url: str, data_dir: Path, rules_address: str, *, rotated: bool) -> IngestSettings:
    """An instance of the root generation k1, or of k2 after the rotation; a keyed audit chain."""
    (data_dir / "audit.key").write_bytes(AUDIT_KEY)
    settings = with_common(
        ingest_settings(database_url, data_dir, rules_address),
        audit=AuditSettings(key_id="a1", keys={"a1": AUDIT_KEY}),
    )
    rotations = (("k2", K2_SECRET),) if rotated else ()
    keyed: IngestSettings = replace(settings, pseudonym=PseudonymSettings(TEST_SUBJECT_KEY, "k1", rotations))
    return keyed


def command(monkeypatch: pytest.MonkeyPatch, settings: IngestSettings, *argv: str) -> int:
    """`python -m services.ingest <argv>` with the rotation configured."""
    monkeypatch.setenv("EGRET_DATABASE_URL", settings.common.database_url)
    monkeypatch.setenv("EGRET_DATA_DIR", str(settings.common.data_dir))
    monkeypatch.setenv("EGRET_SUBJECT_KEY", TEST_SUBJECT_KEY.decode())
    monkeypatch.setenv("EGRET_SUBJECT_KEY_ROTATIONS", f"k2:{K2_SECRET.decode()}")
    monkeypatch.setenv("EGRET_AUDIT_KEY_FILE", str(settings.common.data_dir / "audit.key"))
    return main(list(argv))


def stored(
    database_url: str,
) -> tuple[set[tuple[str, str, str | None]], set[tuple[str, str]], set[tuple[str, str | None]]]:
    """(key, generation, fingerprint generation) of the events, (key, generation) of their
    stored RecordedEvents, and (key, generation) of the retractions."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            events = connection.execute(
                sa.select(StoredEvent.subject_key, StoredEvent.subject_key_id, StoredEvent.fingerprint_key_id)
            ).all()
            records = [
                event_pb2.RecordedEvent.FromString(r)
                for r in connection.scalars(sa.select(StoredEvent.record))
            ]
            retractions = connection.execute(
                sa.select(StoredRetraction.subject_key, StoredRetraction.subject_key_id)
            ).all()
    finally:
        engine.dispose()
    return (
        {(k, i, f) for k, i, f in events},
        {(r.subject_key, r.subject_key_id) for r in records},
        {(k, i) for k, i in retractions},
    )


def audit_chain(database_url: str) -> tuple[audit.ChainReport, list[tuple[str, str | None, str]]]:
    engine = create_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            report = audit.verify(session, IngestAuditLog, IngestAuditHead, keys=AUDIT_KEYS)
            records = [
                (row.action, row.subject_key, row.target)
                for row in session.execute(
                    sa.select(
                        IngestAuditLog.action, IngestAuditLog.subject_key, IngestAuditLog.target
                    ).order_by(IngestAuditLog.seq)
                )
            ]
            marker = read_marker(session, IngestSubjectKeyGeneration)
    finally:
        engine.dispose()
    assert marker == ("k2", True)
    return report, records


def retractions_received(rules: RecordingRules) -> list[due_process_pb2.Retraction]:
    return [r for b in rules.batches for r in b.retractions]


def retract(event_id: str) -> pb.RetractEventRequest:
    return pb.RetractEventRequest(
        ref=event_pb2.EventRef(source="library", event_id=event_id), reason="sent twice"
    )


async def test_rotation_moves_ingests_stored_keys_and_what_follows_is_of_the_new_generation(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = RecordingRules()
    async with serving_rules(rules) as rules_address:
        old = settings_for(database_url, tmp_path, rules_address, rotated=False)
        async with running(old, build, MIGRATIONS) as old_address, client_channel(old_address) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            submitted = await stub.SubmitEvents(
                pb.SubmitEventsRequest(
                    source="library",
                    events=[late("e1", subject=ALICE), late("e2", subject=ALICE), late("e3", subject=BOB)],
                )
            )
            assert {r.status for r in submitted.results} == {pb.EVENT_STATUS_ACCEPTED}
            await stub.RetractEvent(retract("e2"))
            await until(lambda: len(rules.events()) == 3 and len(retractions_received(rules)) == 1)
            assert {(e.subject_key, e.subject_key_id) for e in rules.events()} == {
                (key(V1, ALICE), "k1"),
                (key(V1, BOB), "k1"),
            }
            assert [(r.subject_key, r.subject_key_id) for r in retractions_received(rules)] == [
                (key(V1, ALICE), "k1")
            ]
            # Fingerprints from before generations were recorded are of the root generation.
            engine = create_engine(database_url)
            with engine.begin() as connection:
                connection.execute(sa.update(StoredEvent).values(fingerprint_key_id=None))
            engine.dispose()

            # The rotation, while the old instance serves (the command waits 2 s for its
            # transactions to end; the event loop keeps serving meanwhile).
            capsys.readouterr()
            assert await asyncio.to_thread(command, monkeypatch, old, "rekey") == 0
            assert "generation k2, 7 rows moved" in capsys.readouterr().out
            # The old instance now refuses: it would write keys of the old generation.
            for call in (
                stub.SubmitEvent(pb.SubmitEventRequest(source="library", event=late("e9", subject=ALICE))),
                stub.RetractEvent(retract("e1")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "generation" in (refused.value.details() or "")

        # Every stored key, stored copy and fingerprint is of k2, the retraction's too.
        events, records, retractions = stored(database_url)
        assert events == {(key(V2, ALICE), "k2", "k2"), (key(V2, BOB), "k2", "k2")}
        assert records == {(key(V2, ALICE), "k2"), (key(V2, BOB), "k2")}
        assert retractions == {(key(V2, ALICE), "k2")}
        # The chain holds the move and verifies; its own records keep the key they were written with.
        report, chain = audit_chain(database_url)
        assert report.intact, report.problems
        assert chain[0] == ("event.retract", key(V1, ALICE), "event:library/e2")
        assert [(action, target) for action, _, target in chain[1:]] == [
            ("subject-keys-rekeyed", "ingest_events.subject_key"),
            ("subject-keys-rekeyed", "ingest_events.fingerprint"),
            ("subject-keys-rekeyed", "ingest_retractions.subject_key"),
            ("subject-keys-rotated", ""),
        ]

        rotated = settings_for(database_url, tmp_path, rules_address, rotated=True)
        async with running(rotated, build, MIGRATIONS) as address, client_channel(address) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            again = await stub.SubmitEvents(
                pb.SubmitEventsRequest(
                    source="library",
                    events=[
                        # Resent as it was: a duplicate, its fingerprint moved with its key.
                        late("e1", subject=ALICE),
                        # Resent otherwise: a conflict, as before the rotation.
                        late("e3", days=41, subject=BOB),
                        late("e4", subject=ALICE),
                    ],
                )
            )
            assert [r.status for r in again.results] == [
                pb.EVENT_STATUS_DUPLICATE,
                pb.EVENT_STATUS_CONFLICT,
                pb.EVENT_STATUS_ACCEPTED,
            ]
            # An event stored before the rotation is retracted under the key rules now holds.
            retracted = (await stub.RetractEvent(retract("e1"))).retraction
            assert (retracted.subject_key, retracted.subject_key_id) == (key(V2, ALICE), "k2")
            earlier = await stub.RetractEvent(retract("e2"))
            assert earlier.already_retracted
            assert (earlier.retraction.subject_key, earlier.retraction.subject_key_id) == (
                key(V2, ALICE),
                "k2",
            )
            await until(lambda: len(rules.events()) == 4 and len(retractions_received(rules)) == 2)
            assert (rules.events()[-1].subject_key, rules.events()[-1].subject_key_id) == (
                key(V2, ALICE),
                "k2",
            )
            last = retractions_received(rules)[-1]
            assert (last.ref.event_id, last.subject_key, last.subject_key_id) == ("e1", key(V2, ALICE), "k2")

        events, _, retractions = stored(database_url)
        assert {(k, i) for k, i, _ in events} == {(key(V2, ALICE), "k2"), (key(V2, BOB), "k2")}
        assert retractions == {(key(V2, ALICE), "k2")}
        # Nothing is left to move, and the chain still verifies.
        assert command(monkeypatch, rotated, "rekey") == 0
        assert "generation k2, 0 rows moved" in capsys.readouterr().out
        assert command(monkeypatch, rotated, "verify-audit") == 0
