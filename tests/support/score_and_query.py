"""Score and query running together over mutual TLS at a test clock, for the due-process tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from devtools.localpki import LocalPki
from egret.common.v1 import due_process_pb2 as dp
from egret.common.v1 import outcome_pb2
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from tests.support.due_process import ALICE, ALICE_ID, BOB_ID, T0, Clock
from tests.support.outcomes import outcome
from tests.support.purposes import purposed


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
