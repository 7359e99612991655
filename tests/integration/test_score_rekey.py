"""Rotating the subject key in score (issue 12, point 7; docs/security.md, "Rotating the
subject key"), with score's real gRPC server on loopback, on SQLite and PostgreSQL.

A ledger, disputes, repairs, reversals and consents stored under generation k1 are moved to
k2 by kit.rekey while a k1 instance serves; afterwards no stored key is of another
generation, the audit chain verifies and holds the job's records, the k1 instance answers
UNAVAILABLE while a k2 instance serves, and outcomes, reversals and staff requests that
still carry k1 keys reach the moved subject instead of splitting it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.score_store import ScoreAuditHead, ScoreAuditLog, StoredEntry, StoredScore
from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import event_pb2, outcome_pb2
from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.protoconv import to_timestamp
from kit.pseudonym import KeyLink, Pseudonymiser
from kit.rekey import read_marker, rekey
from kit.settings import AuditSettings, PseudonymSettings
from services.score import bootstrap
from services.score.bootstrap import MIGRATIONS, build
from services.score.settings import ScoreSettings
from services.score.stores.keyed import KEYED
from tests.support.events import TEST_SUBJECT_KEY
from tests.support.outcomes import oid, outcome
from tests.support.score import POLICY_FILE, score_settings
from tests.support.servers import client_channel, running, with_common

SECRET = "second-generation-secret-0123456789"
K1 = Pseudonymiser(TEST_SUBJECT_KEY, "k1")
K2 = Pseudonymiser(TEST_SUBJECT_KEY, "k1", (KeyLink("k2", SECRET.encode()),))
ALICE, BOB = (
    K1.subject_key("person", "resident-id", v) for v in ("350200199001011230", "35020019920202234X")
)
ALICE2, BOB2 = K2.rekey(ALICE, "k1"), K2.rekey(BOB, "k1")
AUDIT = AuditSettings(key_id="a1", keys={"a1": b"audit-key-0123456789abcdef0123456"})
# A month ago: every entry counts, and a minor one may be repaired at once.
OCCURRED = (datetime.now(UTC) - timedelta(days=30)).replace(microsecond=0)


def settings_of(database_url: str, data_dir: Path, chain: Pseudonymiser) -> ScoreSettings:
    settings: ScoreSettings = with_common(score_settings(database_url, data_dir), audit=AUDIT)
    rotations = tuple((link.key_id, link.secret) for link in chain.rotations)
    return replace(settings, pseudonym=PseudonymSettings(chain.key, chain.key_id, rotations))


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def minor(outcome_id: str, subject_key: str, points: int, key_id: str = "") -> outcome_pb2.Outcome:
    made = outcome(outcome_id, subject_key, points, "traffic", occurred_at=OCCURRED, events=2)
    made.subject_key_id = key_id
    for event in made.events:
        event.subject_key_id = key_id
    return made


def retracted(outcome_id: str, subject_key: str, key_id: str) -> pb.Reversal:
    return pb.Reversal(
        outcome_id=outcome_id,
        cause=pb.REVERSAL_CAUSE_RETRACTION,
        retraction=dp.Retraction(
            ref=event_pb2.EventRef(source="library", event_id=f"{outcome_id}-0"),
            subject_key=subject_key,
            subject_key_id=key_id,
            reason="sent in error",
            retracted_at=to_timestamp(OCCURRED),
            retracted_by="library",
        ),
    )


def regrouped(outcome_id: str, subject_key: str, key_id: str) -> pb.Reversal:
    return pb.Reversal(
        outcome_id=outcome_id,
        cause=pb.REVERSAL_CAUSE_REGROUPED,
        late_event=event_pb2.EventRef(source="library", event_id="late-1"),
        subject_key=subject_key,
        subject_key_id=key_id,
    )


def generations(db: Engine) -> dict[str, set[tuple[str, str | None]]]:
    """The distinct (subject key, generation) pairs of every keyed table."""
    with db.connect() as connection:
        return {
            column.table.name: {
                (row[0], row[1])
                for row in connection.execute(
                    sa.select(column.table.c[column.key], column.table.c[column.key_id]).distinct()
                )
            }
            for column in KEYED.columns
        }


def keyed_rows(db: Engine) -> int:
    with db.connect() as connection:
        return sum(
            int(connection.scalar(sa.select(sa.func.count()).select_from(c.table)) or 0)
            for c in KEYED.columns
        )


def snapshots(db: Engine) -> dict[str, set[tuple[str, str]]]:
    """The (key, generation) pairs each stored evidence snapshot carries, its events' included."""
    with db.connect() as connection:
        rows = connection.execute(sa.select(StoredEntry.entry_id, StoredEntry.outcome)).all()
    found = {}
    for entry_id, payload in rows:
        o = outcome_pb2.Outcome.FromString(payload)
        found[entry_id] = {
            (o.subject_key, o.subject_key_id),
            *((e.subject_key, e.subject_key_id) for e in o.events),
        }
    return found


def scores(db: Engine) -> dict[str, int]:
    with db.connect() as connection:
        return {r[0]: r[1] for r in connection.execute(sa.select(StoredScore.subject_key, StoredScore.score))}


def audit_actions(db: Engine) -> tuple[audit.ChainReport, list[tuple[str, str | None]]]:
    with make_session_factory(db)() as session:
        report = audit.verify(session, ScoreAuditLog, ScoreAuditHead, keys=audit.audit_keys(AUDIT))
        rows = session.execute(
            sa.select(ScoreAuditLog.action, ScoreAuditLog.subject_key).order_by(ScoreAuditLog.seq)
        )
        return report, [(r[0], r[1]) for r in rows]


async def expect_unavailable(call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()


async def populate(score: pb_grpc.ScoreServiceAsyncStub) -> None:
    """Under k1: a ledger, an open dispute, a pending repair, a reversal (and one waiting for
    its outcome), consents."""
    await score.ApplyOutcomes(
        pb.ApplyOutcomesRequest(
            outcomes=[
                minor(oid("o1"), ALICE, -5, "k1"),
                minor(oid("o2"), ALICE, -3, "k1"),
                minor(oid("o3"), BOB, -10, "k1"),
                # A sender from before generations: "" is the receiver's current one.
                minor(oid("o4"), ALICE, -7),
            ],
            reversals=[retracted(oid("o4"), ALICE, "k1"), retracted(oid("o9"), ALICE, "k1")],
        )
    )
    await score.FileDispute(pb.FileDisputeRequest(entry_id=oid("o2"), statement="not me"))
    await score.ApplyForRepair(pb.ApplyForRepairRequest(entry_id=oid("o1"), evidence="paid in full"))
    await score.SetConsent(pb.SetConsentRequest(subject_key=ALICE, granted=True))
    await score.SetConsent(pb.SetConsentRequest(subject_key=BOB, granted=False))


async def test_a_rotation_moves_every_stored_key_and_old_keys_arriving_later_join_the_moved_subject(
    database_url: str, tmp_path: Path, db: Engine
) -> None:
    old_settings = settings_of(database_url, tmp_path, K1)
    async with (
        running(old_settings, build, MIGRATIONS) as old_address,
        client_channel(old_address) as old_channel,
    ):
        old = pb_grpc.ScoreServiceStub(old_channel)
        await populate(old)
        assert scores(db) == {ALICE: 992, BOB: 990}
        before = generations(db)
        assert {key_id for pairs in before.values() for _, key_id in pairs} == {"k1"}
        rows = keyed_rows(db)

        # The job runs while the k1 instance serves (settling 2 s, longer than its guard's
        # 1 s between marker reads).
        result = await asyncio.to_thread(rekey, db, KEYED, K2, audit.audit_keys(AUDIT), batch_size=3)
        assert result.generation == "k2"
        assert (result.moved, keyed_rows(db)) == (rows, rows)
        after = generations(db)
        assert set(after) == set(before)
        for table, pairs in after.items():
            assert {key_id for _, key_id in pairs} == {"k2"}, table
            assert {key for key, _ in pairs} == {K2.rekey(key, "k1") for key, _ in before[table]}, table
        assert set().union(*snapshots(db).values()) == {(ALICE2, "k2"), (BOB2, "k2")}
        assert scores(db) == {ALICE2: 992, BOB2: 990}
        with db.connect() as connection:
            assert read_marker(connection, KEYED.generation) == ("k2", True)
        report, actions = audit_actions(db)
        assert report.intact, report.problems
        # The chain keeps the keys its records were written with, and places them in a
        # generation by the job's records that follow them.
        assert ("dispute.file", ALICE) in actions
        assert actions.count(("subject-keys-rotated", None)) == 1
        assert actions.count(("subject-keys-rekeyed", None)) >= len(KEYED.columns)

        # The instance still configured for k1 is refused from now on, reads included;
        # one of k2 serves the same database.
        await expect_unavailable(
            old.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=[minor(oid("o7"), ALICE, -1, "k1")]))
        )
        await expect_unavailable(old.SetConsent(pb.SetConsentRequest(subject_key=ALICE, granted=False)))
        await expect_unavailable(old.VerifyScores(pb.VerifyScoresRequest()))
        new_settings = settings_of(database_url, tmp_path / "k2", K2)
        async with running(new_settings, build, MIGRATIONS) as address, client_channel(address) as channel:
            new = pb_grpc.ScoreServiceStub(channel)
            # Still in an outbox at the rotation: k1 keys, moved forward on arrival. o9
            # was retracted before it arrived; o6 is regrouped by a k1-keyed reversal.
            response = await new.ApplyOutcomes(
                pb.ApplyOutcomesRequest(
                    outcomes=[
                        minor(oid("o5"), ALICE, -4, "k1"),
                        minor(oid("o6"), ALICE2, -2, "k2"),
                        minor(oid("o9"), ALICE, -6, "k1"),
                    ],
                    reversals=[regrouped(oid("o6"), ALICE, "k1")],
                )
            )
            assert (response.applied, response.reversed) == (3, 1)
            # One subject, not two: 1000 - 5 - 3 (o1, o2) - 4 (o5); o4, o6 and o9 reversed.
            assert scores(db) == {ALICE2: 988, BOB2: 990}
            assert (await new.VerifyScores(pb.VerifyScoresRequest())).mismatch_count == 0
            # A reviewer naming the subject by the key a read returned before the rotation.
            consent = (await new.SetConsent(pb.SetConsentRequest(subject_key=ALICE, granted=False))).consent
            assert consent.subject_key == ALICE2
            for table, pairs in generations(db).items():
                assert pairs <= {(ALICE2, "k2"), (BOB2, "k2")}, table
            assert set().union(*snapshots(db).values()) == {(ALICE2, "k2"), (BOB2, "k2")}

            # A generation this instance does not know yet: refused whole, for the relay to retry.
            await expect_unavailable(
                new.ApplyOutcomes(pb.ApplyOutcomesRequest(outcomes=[minor(oid("o8"), "c3" * 32, -1, "k3")]))
            )
            await expect_unavailable(
                new.ApplyOutcomes(pb.ApplyOutcomesRequest(reversals=[retracted(oid("o5"), "c3" * 32, "k3")]))
            )
            with db.connect() as connection:
                assert (
                    connection.scalar(sa.select(StoredEntry.status).where(StoredEntry.entry_id == oid("o5")))
                    == "active"
                )
                assert (
                    connection.scalar(
                        sa.select(StoredEntry.entry_id).where(StoredEntry.entry_id == oid("o8"))
                    )
                    is None
                )
    report, _ = audit_actions(db)
    assert report.intact, report.problems


class Killed(BaseException):
    """The job's process dying mid-batch."""


async def test_a_killed_rekey_job_resumes_and_completes_with_every_score_intact(
    database_url: str,
    tmp_path: Path,
    db: Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_of(database_url, tmp_path, K1)
    async with running(settings, build, MIGRATIONS) as address, client_channel(address) as channel:
        await populate(pb_grpc.ScoreServiceStub(channel))
    # Rows written before generations were recorded are of the root generation.
    with db.begin() as connection:
        connection.execute(
            sa.update(StoredEntry).where(StoredEntry.entry_id == oid("o3")).values(subject_key_id=None)
        )
    before = scores(db)

    batches = 0
    original = audit.append

    def killed_in_third_batch(*args: Any, **kwargs: Any) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            raise Killed
        original(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(audit, "append", killed_in_third_batch)
        with pytest.raises(Killed):
            rekey(db, KEYED, K2, audit.audit_keys(AUDIT), batch_size=2, settle_s=0)
    # The first two batches moved, the third's transaction did not commit.
    left = {key_id for pairs in generations(db).values() for _, key_id in pairs}
    assert "k2" in left, left
    assert left - {"k2"}, left
    with db.connect() as connection:
        assert read_marker(connection, KEYED.generation) == ("k2", False)

    # Run again, as an operator would: `python -m services.score rekey`.
    monkeypatch.setenv("EGRET_DATABASE_URL", database_url)
    monkeypatch.setenv("EGRET_POLICY_FILE", str(POLICY_FILE))
    monkeypatch.setenv("EGRET_SUBJECT_KEY_ROTATIONS", f"k2:{SECRET}")
    monkeypatch.setenv("EGRET_AUDIT_KEY_ID", "a1")
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(AUDIT.keys["a1"])
    monkeypatch.setenv("EGRET_AUDIT_KEY_FILE", str(key_file))
    assert bootstrap.main(["rekey"]) == 0
    for table, pairs in generations(db).items():
        assert pairs <= {(ALICE2, "k2"), (BOB2, "k2")}, table
    assert scores(db) == {K2.rekey(key, "k1"): score for key, score in before.items()}
    with db.connect() as connection:
        assert read_marker(connection, KEYED.generation) == ("k2", True)
    report, actions = audit_actions(db)
    assert report.intact, report.problems
    assert actions.count(("subject-keys-rotated", None)) == 1
    # Nothing left to move.
    assert rekey(db, KEYED, K2, audit.audit_keys(AUDIT), settle_s=0).moved == 0
    # An instance of the settings before the rotation stops with the reason and exit status
    # 2, whatever it is asked to do, and leaves the marker as it is.
    monkeypatch.delenv("EGRET_SUBJECT_KEY_ROTATIONS")
    capsys.readouterr()
    for command in ("verify", "migrate", "rekey"):
        assert bootstrap.main([command]) == 2, command
    refused = capsys.readouterr().err
    assert refused.count("egret-score: stored subject keys are of generation 'k2'") == 3, refused
    assert "Traceback" not in refused
    with db.connect() as connection:
        assert read_marker(connection, KEYED.generation) == ("k2", True)

    async with (
        running(settings_of(database_url, tmp_path, K2), build, MIGRATIONS) as address,
        client_channel(address) as channel,
    ):
        assert (
            await pb_grpc.ScoreServiceStub(channel).VerifyScores(pb.VerifyScoresRequest())
        ).mismatch_count == 0


def test_score_reads_the_key_chain_with_or_without_the_root_key() -> None:
    base = {
        "EGRET_INSECURE": "true",
        "EGRET_SUBJECT_KEY_ROTATIONS": f"k2:{SECRET}",
        "EGRET_POLICY_FILE": str(POLICY_FILE),
    }
    chain = ScoreSettings.from_env(base).pseudonym
    assert (chain.key, chain.key_id, chain.rotations) == (b"", "k1", (("k2", SECRET.encode()),))
    rooted = ScoreSettings.from_env(base | {"EGRET_SUBJECT_KEY": TEST_SUBJECT_KEY.decode()}).pseudonym
    assert (rooted.key, rooted.rotations) == (TEST_SUBJECT_KEY, chain.rotations)
    assert (
        ScoreSettings.from_env(
            {"EGRET_INSECURE": "true", "EGRET_POLICY_FILE": str(POLICY_FILE)}
        ).pseudonym.key
        == b""
    )
