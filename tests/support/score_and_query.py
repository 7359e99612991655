"""Score and query running together over mutual TLS at a test clock, for the due-process tests: the
servers, their fixtures (`egret`, and `consenting` under a policy that requires consent) and the
readers those tests share."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from devtools.localpki import LocalPki, create_local_pki
from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from services.query.bootstrap import MIGRATIONS as QUERY_MIGRATIONS
from services.query.bootstrap import build as build_query
from services.score.bootstrap import MIGRATIONS as SCORE_MIGRATIONS
from services.score.bootstrap import build as build_score
from tests.support.due_process import ALICE, ALICE_ID, BOB_ID, T0, Clock
from tests.support.due_process import secured as secured_score
from tests.support.outcomes import outcome
from tests.support.purposes import purposed
from tests.support.query import query_settings
from tests.support.score import POLICY_FILE, score_settings
from tests.support.security import secured
from tests.support.servers import running
from tests.support.status import bad_request


@dataclass
class Egret:
    clock: Clock
    pki: LocalPki
    score_address: str
    query_address: str
    query_database_url: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def query(self, subject: str, role: Role) -> pb_grpc.QueryServiceAsyncStub:
        channel = self.pki.channel(self.query_address, self.pki.token(subject, role))
        self.channels.append(channel)
        return pb_grpc.QueryServiceStub(channel)

    def score(self, subject: str, role: Role) -> score_grpc.ScoreServiceAsyncStub:
        channel = self.pki.channel(self.score_address, self.pki.token(subject, role))
        self.channels.append(channel)
        return score_grpc.ScoreServiceStub(channel)

    @property
    def reviewer(self) -> pb_grpc.QueryServiceAsyncStub:
        """A reviewer stating "dispute-review" unless the request states a purpose."""
        return purposed(self.query("reviewer-7", Role.REVIEWER), "dispute-review")

    @property
    def alice(self) -> pb_grpc.QueryServiceAsyncStub:
        return self.query(ALICE_ID, Role.SUBJECT)

    @property
    def bob(self) -> pb_grpc.QueryServiceAsyncStub:
        return self.query(BOB_ID, Role.SUBJECT)

    async def apply(
        self, *outcomes: outcome_pb2.Outcome, reversals: tuple[score_pb.Reversal, ...] = ()
    ) -> None:
        channel = self.pki.channel(self.score_address, self.pki.service_token("rules"))
        self.channels.append(channel)
        await score_grpc.ScoreServiceStub(channel).ApplyOutcomes(
            score_pb.ApplyOutcomesRequest(outcomes=outcomes, reversals=reversals)
        )

    async def dispute(self, entry_id: str, subject: str = ALICE_ID) -> dp.Dispute:
        response = await self.score(subject, Role.SUBJECT).FileDispute(
            score_pb.FileDisputeRequest(entry_id=entry_id, statement="not me")
        )
        return response.dispute

    def audit_session(self) -> Any:
        return sa.create_engine(self.query_database_url)


def entry(
    outcome_id: str,
    points: int,
    category: str,
    *,
    days_ago: float,
    subject_key: str = ALICE,
    severity: int | None = None,
) -> outcome_pb2.Outcome:
    return outcome(
        outcome_id,
        subject_key,
        points,
        category,
        severity=severity,
        occurred_at=T0 - timedelta(days=days_ago),
    )


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def start(database_url: str, tmp_path: Path, policy_file: Path = POLICY_FILE) -> AsyncIterator[Egret]:
    pki = create_local_pki(tmp_path / "pki")
    clock = Clock(T0)
    score = replace(secured_score(score_settings(database_url, tmp_path), pki), policy_file=policy_file)
    query = replace(secured(query_settings(database_url, tmp_path), pki, "query"), policy_file=policy_file)
    async with (
        running(score, functools.partial(build_score, clock=clock), SCORE_MIGRATIONS) as score_address,
        running(query, functools.partial(build_query, clock=clock), QUERY_MIGRATIONS) as query_address,
    ):
        egret = Egret(clock, pki, score_address, query_address, query.common.database_url)
        try:
            yield egret
        finally:
            for channel in egret.channels:
                await channel.close()


@pytest.fixture
async def egret(database_url: str, tmp_path: Path) -> AsyncIterator[Egret]:
    async for e in start(database_url, tmp_path):
        yield e


def key(subject_key: str = ALICE) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(subject_key=subject_key)


async def access_log(e: Egret, subject_key: str = ALICE) -> list[pb.AccessRecord]:
    records: list[pb.AccessRecord] = []
    token = ""
    auditor = purposed(e.query("auditor-1", Role.AUDITOR), "audit")
    while True:
        page = await auditor.ListAccessLog(
            pb.ListAccessLogRequest(subject=key(subject_key), page_size=3, page_token=token)
        )
        records += page.records
        token = page.next_page_token
        if not token:
            return records


async def refused(call: Awaitable[Any]) -> list[tuple[str, str]]:
    """The field violations of a call that must fail with INVALID_ARGUMENT."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return bad_request(caught.value)


@pytest.fixture
async def consenting(database_url: str, tmp_path: Path) -> AsyncIterator[Egret]:
    """Egret under a policy that requires consent."""
    policy = tmp_path / "consent-policy.yaml"
    policy.write_text(POLICY_FILE.read_text().replace("consent_required: false", "consent_required: true"))
    async for e in start(database_url, tmp_path, policy):
        yield e
