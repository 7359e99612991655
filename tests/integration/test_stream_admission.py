"""A request stream is admitted again for every message: it ends with UNAUTHENTICATED when
its token expires (even while the client sends nothing) and each message counts against
the caller's rate limit. Real ingest server on loopback, TLS and tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from devtools.localpki import LocalPki, create_local_pki
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from egret_client.submitter import StreamFailed, stream_events
from kit.principal import Role
from services.ingest import bootstrap as ingest_bootstrap
from tests.support.ingest import ingest_settings
from tests.support.security import secured
from tests.support.servers import running


def expiring_token(pki: LocalPki, seconds: float) -> str:
    """A department token accepted for about `seconds` more: its exp lies in the past, by
    less than the verifier's 30 s leeway."""
    return pki.token("library", Role.DEPARTMENT, issued_at=time.time() - 30, lifetime_s=seconds)


def batch(batch_id: str) -> pb.StreamEventsRequest:
    # An empty batch is answered (rejected), which is all these tests need: an answer.
    return pb.StreamEventsRequest(source="library", batch_id=batch_id)


def ingest(tmp_path: Path, pki: LocalPki, **security: Any) -> Any:
    plain = ingest_settings(f"sqlite:///{tmp_path / 'ingest.db'}", tmp_path, "127.0.0.1:9")
    return secured(plain, pki, "ingest", **security)


async def test_an_idle_stream_ends_unauthenticated_when_its_token_expires(tmp_path: Path) -> None:
    pki = create_local_pki(tmp_path / "pki")
    token = expiring_token(pki, 3)
    async with (
        running(ingest(tmp_path, pki), ingest_bootstrap.build, ingest_bootstrap.MIGRATIONS) as address,
        pki.channel(address, token) as channel,
    ):
        call = pb_grpc.IngestServiceStub(channel).StreamEvents(timeout=30)
        await call.write(batch("one"))
        first = await call.read()
        assert isinstance(first, pb.StreamEventsResponse)
        assert first.batch_id == "one"
        waited = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()  # the client sends nothing more
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ended.value.details() == "token expired"
    assert time.monotonic() - waited < 10  # at the token's expiry, not the call's deadline


async def test_every_message_of_a_stream_counts_against_the_rate_limit(tmp_path: Path) -> None:
    pki = create_local_pki(tmp_path / "pki")
    settings = ingest(tmp_path, pki, rate_per_second=0.2, rate_burst=3.0)
    async with (
        running(settings, ingest_bootstrap.build, ingest_bootstrap.MIGRATIONS) as address,
        pki.channel(address, pki.token("library", Role.DEPARTMENT)) as channel,
    ):
        call = pb_grpc.IngestServiceStub(channel).StreamEvents(timeout=30)
        answered = []
        for name in ("one", "two"):
            await call.write(batch(name))
            answered.append(await call.read())
        await call.write(batch("three"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    # Opening the stream costs one token, each message one more: the burst of 3 is spent
    # after two messages.
    assert [a.batch_id for a in answered if isinstance(a, pb.StreamEventsResponse)] == ["one", "two"]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = dict(refused.value.trailing_metadata() or ())["grpc-status-details-bin"]
    retry = error_details_pb2.RetryInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 5.0


async def test_the_streaming_client_surfaces_an_expired_token_instead_of_retrying(tmp_path: Path) -> None:
    pki = create_local_pki(tmp_path / "pki")
    token = expiring_token(pki, 2)

    async def batches() -> AsyncIterator[pb.StreamEventsRequest]:
        yield batch("before")
        await asyncio.sleep(4)  # the token expires meanwhile
        yield batch("after")

    async with (
        running(ingest(tmp_path, pki), ingest_bootstrap.build, ingest_bootstrap.MIGRATIONS) as address,
        pki.channel(address, token) as channel,
    ):
        with pytest.raises(StreamFailed, match="UNAUTHENTICATED: token expired") as failed:
            await stream_events(channel, batches(), backoff_initial_s=0.05)
    assert failed.value.totals.batches == 1  # "before" was answered
    assert failed.value.totals.stream_errors == 1  # given up at once, the token will not get better
