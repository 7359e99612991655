"""AuditChainService (kit.audit_chain) served by score's real server on loopback, as every
service serves it: auditors and admins read the chain's state and its anchor; other roles
are refused; a tampered record or a wrong anchor is reported as a problem."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from contracts.score_store import ScoreAuditHead, ScoreAuditLog
from devtools.localpki import LocalPki, create_local_pki
from egret.common.v1 import audit_chain_pb2 as pb
from egret.common.v1 import audit_chain_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.audit_chain import AuditChainServicer
from kit.principal import Role
from kit.server import Service
from services.score.bootstrap import MIGRATIONS, build
from tests.support.due_process import ALICE, T0, Clock, negative, secured
from tests.support.score import score_settings
from tests.support.servers import running
from tests.support.status import bad_request


def with_chain(settings: Any, clock: Clock) -> Service:
    service = build(settings, clock=clock)
    service.audit_chain = AuditChainServicer(settings.common, ScoreAuditLog, ScoreAuditHead)
    return service


@pytest.fixture
async def served(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[LocalPki, str, str]]:
    pki = create_local_pki(tmp_path / "pki")
    settings = secured(score_settings(database_url, tmp_path), pki)
    async with running(settings, functools.partial(with_chain, clock=Clock(T0)), MIGRATIONS) as address:
        yield pki, address, database_url


async def test_an_auditor_reads_the_chain_state_and_a_tampered_record_is_reported(
    served: tuple[LocalPki, str, str],
) -> None:
    pki, address, database_url = served
    async with pki.channel(address, pki.service_token("rules")) as rules:
        await score_grpc.ScoreServiceStub(rules).ApplyOutcomes(
            score_pb.ApplyOutcomesRequest(outcomes=[negative("o1", ALICE)])
        )
    async with pki.channel(address, pki.token("reviewer-7", Role.REVIEWER)) as reviewer:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.AuditChainServiceStub(reviewer).VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with pki.channel(address, pki.token("auditor-3", Role.AUDITOR)) as channel:
        chain = pb_grpc.AuditChainServiceStub(channel)
        state = await chain.VerifyAuditChain(pb.VerifyAuditChainRequest())
        assert (state.service, state.intact, list(state.problems)) == ("score", True, [])
        assert state.records >= 1
        assert state.last_seq == state.records
        assert len(state.last_hash) == 64
        anchor = f"{state.last_seq}:{state.last_hash}"
        held = await chain.VerifyAuditChain(pb.VerifyAuditChainRequest(anchors=[anchor]))
        assert (held.intact, held.anchors_checked) == (True, 1)

        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await chain.VerifyAuditChain(pb.VerifyAuditChainRequest(anchors=["not an anchor"]))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(malformed.value) == [("anchors[0]", "INVALID")]

        engine = sa.create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(
                sa.update(ScoreAuditLog).where(ScoreAuditLog.seq == 1).values(actor="someone-else")
            )
        engine.dispose()
        broken = await chain.VerifyAuditChain(pb.VerifyAuditChainRequest(anchors=[anchor]))
        assert not broken.intact
        assert any("seq 1" in p and "altered" in p for p in broken.problems)
