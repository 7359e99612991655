"""Rotating the subject key as query sees it (issue 12, point 7; docs/security.md, "Rotating
the subject key"), with score's real server writing the store, authenticated principals,
on SQLite and PostgreSQL.

Query's access log keeps the keys its records were written with: after the rotation a
subject named by raw id still finds the reads recorded before it. Score's store may still
hold a subject under the previous generation while query already hashes raw ids to the
new one: a read by raw id finds it there until score's marker says its move is complete.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from contracts.score_store import ScoreSubjectKeyGeneration
from devtools.localpki import create_local_pki
from egret.common.v1 import subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from kit import audit
from kit.principal import Role
from kit.pseudonym import KeyLink, Pseudonymiser
from kit.settings import PseudonymSettings
from services.query import domain
from services.query.bootstrap import MIGRATIONS as QUERY_MIGRATIONS
from services.query.bootstrap import build as build_query
from services.query.settings import QuerySettings
from services.query.stores.access_log import QueryAuditHead, QueryAuditLog
from services.score.bootstrap import MIGRATIONS as SCORE_MIGRATIONS
from services.score.bootstrap import build as build_score
from tests.support.due_process import ALICE_ID, BOB_ID, T0, Clock
from tests.support.due_process import secured as secured_score
from tests.support.events import TEST_SUBJECT_KEY
from tests.support.purposes import purposed
from tests.support.query import query_settings
from tests.support.score import POLICY_FILE, score_settings
from tests.support.score_and_query import Egret, code_of, entry
from tests.support.security import secured
from tests.support.servers import running

K2_SECRET = b"query-test-second-generation-secret-0123"
V1 = Pseudonymiser(TEST_SUBJECT_KEY, "k1")
V2 = Pseudonymiser(TEST_SUBJECT_KEY, "k1", (KeyLink("k2", K2_SECRET),))
ROTATED = PseudonymSettings(TEST_SUBJECT_KEY, "k1", (("k2", K2_SECRET),))


def raw(subject_id: str) -> subject_pb2.SubjectRef:
    kind, scheme, value = subject_id.split(":")
    assert kind == "person"
    return subject_pb2.SubjectRef(
        subject=subject_pb2.Subject(kind=subject_pb2.SUBJECT_KIND_PERSON, id_scheme=scheme, id_value=value)
    )


def key(chain: Pseudonymiser, subject_id: str) -> str:
    return chain.subject_key(*subject_id.split(":"))


def by_key(subject_key: str) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(subject_key=subject_key)


class Stack:
    """Score (root generation k1 throughout) and query instances started on demand."""

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.pki = create_local_pki(tmp_path / "pki")
        self.clock = Clock(T0)
        self.score = replace(
            secured_score(score_settings(database_url, tmp_path), self.pki), policy_file=POLICY_FILE
        )
        self.query: QuerySettings = secured(query_settings(database_url, tmp_path), self.pki, "query")
        self.score_database_url = database_url

    @asynccontextmanager
    async def serving(self, score_address: str, pseudonym: PseudonymSettings) -> AsyncIterator[Egret]:
        settings = replace(self.query, pseudonym=pseudonym)
        build = functools.partial(build_query, clock=self.clock)
        async with running(settings, build, QUERY_MIGRATIONS) as address:
            egret = Egret(self.clock, self.pki, score_address, address, settings.common.database_url)
            try:
                yield egret
            finally:
                for channel in egret.channels:
                    await channel.close()

    @asynccontextmanager
    async def score_serving(self) -> AsyncIterator[str]:
        async with running(
            self.score, functools.partial(build_score, clock=self.clock), SCORE_MIGRATIONS
        ) as a:
            yield a


def auditor(e: Egret) -> pb_grpc.QueryServiceAsyncStub:
    return purposed(e.query("auditor-1", Role.AUDITOR), "audit")


async def methods(stub: pb_grpc.QueryServiceAsyncStub, ref: subject_pb2.SubjectRef) -> list[tuple[str, str]]:
    records = (await stub.ListAccessLog(pb.ListAccessLogRequest(subject=ref))).records
    return [(r.method, r.role) for r in records]


async def test_access_records_from_before_a_rotation_are_listed_for_the_subject_after_it(
    database_url: str, tmp_path: Path
) -> None:
    stack = Stack(database_url, tmp_path)
    async with stack.score_serving() as score_address:
        async with stack.serving(score_address, stack.query.pseudonym) as before:
            await before.apply(entry("a1", 10, "civic", days_ago=5, subject_key=key(V1, ALICE_ID)))
            await before.alice.GetScore(pb.GetScoreRequest(subject=raw(ALICE_ID)))
            await before.reviewer.GetScore(pb.GetScoreRequest(subject=by_key(key(V1, ALICE_ID))))
        async with stack.serving(score_address, ROTATED) as after:
            # The subject's own token and raw id now hash to k2; the records under k1 are found.
            assert await methods(after.alice, raw(ALICE_ID)) == [
                ("ListAccessLog", "subject"),
                ("GetScore", "reviewer"),
                ("GetScore", "subject"),
            ]
            # So does a staff read by raw id; a read by key finds the records under that key.
            assert await methods(auditor(after), raw(ALICE_ID)) == [
                ("ListAccessLog", "auditor"),
                ("ListAccessLog", "subject"),
                ("GetScore", "reviewer"),
                ("GetScore", "subject"),
            ]
            assert await methods(auditor(after), by_key(key(V1, ALICE_ID))) == [
                ("ListAccessLog", "auditor"),
                ("GetScore", "reviewer"),
                ("GetScore", "subject"),
            ]
            assert await methods(auditor(after), by_key(key(V2, ALICE_ID))) == [
                ("ListAccessLog", "auditor"),
                ("ListAccessLog", "auditor"),
                ("ListAccessLog", "subject"),
            ]
            # Another subject still finds none of them.
            assert await methods(after.bob, raw(BOB_ID)) == [("ListAccessLog", "subject")]

        engine = sa.create_engine(after.query_database_url)
        try:
            with Session(engine) as session:
                # Records keep the key they were written with and name its generation when
                # query hashed it (a raw id, a token), not for a key the caller gave. Alice's
                # reads under k2 name her k2 key, though score still holds her under k1.
                rows = session.execute(
                    sa.select(QueryAuditLog.action, QueryAuditLog.subject_key, QueryAuditLog.subject_key_id)
                    .where(QueryAuditLog.subject_key.in_([key(V1, ALICE_ID), key(V2, ALICE_ID)]))
                    .order_by(QueryAuditLog.seq)
                ).all()
                assert [tuple(r) for r in rows] == [
                    ("read:GetScore", key(V1, ALICE_ID), "k1"),
                    ("read:GetScore", key(V1, ALICE_ID), None),
                    ("read:ListAccessLog", key(V2, ALICE_ID), "k2"),
                    ("read:ListAccessLog", key(V2, ALICE_ID), "k2"),
                    ("read:ListAccessLog", key(V1, ALICE_ID), None),
                    ("read:ListAccessLog", key(V2, ALICE_ID), None),
                ]
                assert audit.verify(session, QueryAuditLog, QueryAuditHead).intact
                # The generation is covered by the records' MACs.
                last = session.scalar(sa.select(sa.func.max(QueryAuditLog.seq)))
                session.execute(
                    sa.update(QueryAuditLog).where(QueryAuditLog.seq == last).values(subject_key_id="k1")
                )
                session.commit()
                broken = audit.verify(session, QueryAuditLog, QueryAuditHead)
                assert any(f"seq {last}" in p and "altered" in p for p in broken.problems), broken.problems
        finally:
            engine.dispose()


def set_score_marker(database_url: str, key_id: str, complete: bool) -> None:
    """Score's generation marker (kit.rekey), as its re-keying job sets it."""
    marker = ScoreSubjectKeyGeneration
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.delete(marker))
            connection.execute(
                sa.insert(marker).values(id=1, key_id=key_id, complete=complete, changed_at=T0)
            )
    finally:
        engine.dispose()


async def test_a_read_by_raw_id_finds_the_subject_while_score_still_holds_it_under_the_previous_key(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(domain, "GENERATION_CACHE_SECONDS", 0.0)
    stack = Stack(database_url, tmp_path)
    alice_k1, alice_k2, bob_k2 = key(V1, ALICE_ID), key(V2, ALICE_ID), key(V2, BOB_ID)
    async with stack.score_serving() as score_address, stack.serving(score_address, ROTATED) as e:
        # Alice under k1 (score has not moved her yet), Bob already under k2.
        await e.apply(
            entry("a1", 10, "civic", days_ago=5, subject_key=alice_k1),
            entry("b1", -5, "civic", days_ago=5, subject_key=bob_k2),
        )
        for marker in (None, ("k2", False)):
            if marker is not None:
                set_score_marker(stack.score_database_url, *marker)
            score = (await e.reviewer.GetScore(pb.GetScoreRequest(subject=raw(ALICE_ID)))).score
            assert (score.subject_key, score.entry_count) == (alice_k1, 1)
            entries = (await e.reviewer.ListEntries(pb.ListEntriesRequest(subject=raw(ALICE_ID)))).entries
            assert [x.entry_id for x in entries] == ["a1"]
            assert (
                await e.reviewer.GetScore(pb.GetScoreRequest(subject=raw(BOB_ID)))
            ).score.subject_key == bob_k2
            # Alice's token names her k2 key: her own reads by raw id are hers.
            own = (await e.alice.GetScore(pb.GetScoreRequest(subject=raw(ALICE_ID)))).score
            assert own.subject_key == alice_k1
            assert (await e.alice.GetEntry(pb.GetEntryRequest(entry_id="a1"))).entry.subject_key == alice_k1
            assert (
                await code_of(e.bob.GetEntry(pb.GetEntryRequest(entry_id="a1"))) is grpc.StatusCode.NOT_FOUND
            )
            assert await code_of(e.bob.GetScore(pb.GetScoreRequest(subject=raw(ALICE_ID)))) is (
                grpc.StatusCode.PERMISSION_DENIED
            )
        # Once score's marker says its keys are all k2, query reads with k2 alone.
        set_score_marker(stack.score_database_url, "k2", True)
        assert await code_of(e.reviewer.GetScore(pb.GetScoreRequest(subject=raw(ALICE_ID)))) is (
            grpc.StatusCode.NOT_FOUND
        )
        assert (
            await e.reviewer.GetScore(pb.GetScoreRequest(subject=raw(BOB_ID)))
        ).score.subject_key == bob_k2
        # Every read was recorded under the subject's k2 key.
        assert {
            r.method
            for r in (
                await auditor(e).ListAccessLog(pb.ListAccessLogRequest(subject=by_key(alice_k2)))
            ).records
        } == {
            "GetScore",
            "ListEntries",
            "ListAccessLog",
        }
