"""Rotation without restart: the score service's certificate and key, its client CA, its
token-verification keys (PEM file, JWKS file, JWKS URL), and a calling service's token and
client certificate are each replaced while calls keep running. No call fails, and the new
material is in use afterwards (docs/security.md, "Rotation without restart").

Files are replaced as the kubelet replaces a mounted Secret: a new directory, then one
rename of the `..data` symlink; the server certificate is also written in place, certificate
first, to show that a half-renewed pair is never served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509

from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit.channels import RenewingChannel
from kit.interceptors import open_channel
from kit.security import certificate_expiry, channel_credentials
from kit.tokens import jwks_document
from tests.support.rotation import (
    CITY,
    ISSUER,
    POLL_S,
    SERVER_FILES,
    Rotation,
    admin_token,
    chain,
    der,
    leaf,
    new_key,
    pem_of,
    rotating_score,
    service_token,
    until,
)


@pytest.fixture
async def rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rotation]:
    async with rotating_score(tmp_path, monkeypatch) as running_score:
        yield running_score


class Traffic:
    """Calls score in a loop until stopped: through the calling service's channel (kit's
    open_channel with channel_credentials, as rules calls score), through long-lived client
    channels with tokens of each key source, and on a fresh connection each round (a new TLS
    handshake, so a half-renewed certificate would show). Every failure is kept."""

    def __init__(self, rotation: Rotation, tokens: dict[str, Callable[[], str]]) -> None:
        self.rotation = rotation
        self.tokens = tokens
        self.failures: list[str] = []
        self.rounds = 0
        self._stop = asyncio.Event()
        self.caller = open_channel(rotation.address, channel_credentials(rotation.caller_settings))
        self._channels = {name: rotation.channel(token) for name, token in tokens.items()}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        await self.rounds_done(3)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        await self.caller.close()
        for channel in self._channels.values():
            await channel.close()

    async def _call(self, name: str, channel: grpc.aio.Channel) -> None:
        try:
            await pb_grpc.ScoreServiceStub(channel).GetActivePolicy(pb.GetActivePolicyRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"{name}: {exc.code().name} {exc.details()}")

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._call("caller", self.caller)
            for name, channel in self._channels.items():
                await self._call(name, channel)
            fresh = self.rotation.channel(next(iter(self.tokens.values()))())
            await self._call("fresh connection", fresh)
            await fresh.close()
            self.rounds += 1
            await asyncio.sleep(POLL_S)

    async def rounds_done(self, more: int) -> None:
        """Wait for `more` further rounds, so calls are known to have run meanwhile."""
        target = self.rounds + more
        await until(lambda: self.rounds >= target)


async def status_with(
    rotation: Rotation, token: str, client: trustme.LeafCert | None = None
) -> grpc.StatusCode:
    channel = rotation.channel(token, client)
    try:
        await pb_grpc.ScoreServiceStub(channel).GetActivePolicy(pb.GetActivePolicyRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()
    return grpc.StatusCode.OK


def admin_tokens(rotation: Rotation) -> dict[str, Callable[[], str]]:
    jwks_token = admin_token(rotation.jwks_keys["j1"], "j1")
    return {"jwks-file token": lambda: jwks_token}


async def test_a_renewed_server_certificate_is_served_to_new_connections(rotation: Rotation) -> None:
    old, new = rotation.presented(), leaf(rotation.ca, "egret-score-renewed")
    assert old != der(new)
    async with Traffic(rotation, admin_tokens(rotation)) as traffic:
        # Written in place, certificate first: until its key follows, the pair does not
        # match, and every handshake meanwhile still gets the old certificate.
        cert_file = rotation.server.root / "..data" / "tls.crt"
        cert_file.write_bytes(chain(new))
        await until(lambda: rotation.refused.seen(SERVER_FILES))  # the mismatched pair was looked at
        await traffic.rounds_done(3)
        assert await asyncio.to_thread(rotation.presented) == old

        (rotation.server.root / "..data" / "tls.key").write_bytes(new.private_key_pem.bytes())
        await until(lambda: presented_is(rotation, new))
        await traffic.rounds_done(3)

        # And by a Secret update (symlink swap).
        newer = leaf(rotation.ca, "egret-score-renewed-again")
        rotation.server.publish({"tls.crt": chain(newer), "tls.key": newer.private_key_pem.bytes()})
        await until(lambda: presented_is(rotation, newer))
        await traffic.rounds_done(3)
    assert traffic.failures == []
    expiry = certificate_expiry(rotation.score_settings)
    assert expiry["server"] == x509.load_pem_x509_certificate(chain(newer)).not_valid_after_utc.timestamp()


async def presented_is(rotation: Rotation, cert: trustme.LeafCert) -> bool:
    return await asyncio.to_thread(rotation.presented) == der(cert)


async def test_a_renewed_client_ca_admits_its_clients_and_drops_the_old(rotation: Rotation) -> None:
    next_ca = trustme.CA(organization_name="Rotation test CA, next")
    next_client = leaf(next_ca, "operator-next")
    token = admin_token(rotation.jwks_keys["j1"], "j1")
    assert await status_with(rotation, token, next_client) == grpc.StatusCode.UNAVAILABLE

    async with Traffic(rotation, admin_tokens(rotation)) as traffic:
        # Overlap: both CAs, while clients move to certificates of the next one.
        rotation.client_ca.publish({"ca.crt": rotation.ca.cert_pem.bytes() + next_ca.cert_pem.bytes()})
        await until(lambda: status_ok(rotation, token, next_client))
        await traffic.rounds_done(3)
    assert traffic.failures == []

    rotation.client_ca.publish({"ca.crt": next_ca.cert_pem.bytes()})
    await until(lambda: status_is(rotation, token, rotation.operator, grpc.StatusCode.UNAVAILABLE))
    assert await status_with(rotation, token, next_client) == grpc.StatusCode.OK


async def status_ok(rotation: Rotation, token: str, client: trustme.LeafCert) -> bool:
    return await status_is(rotation, token, client, grpc.StatusCode.OK)


async def status_is(rotation: Rotation, token: str, client: trustme.LeafCert, code: grpc.StatusCode) -> bool:
    return await status_with(rotation, token, client) == code


async def test_a_replaced_public_key_file_verifies_with_the_new_key_only(rotation: Rotation) -> None:
    """A PEM file holds one key, so tokens of the old key are refused as soon as the new file
    is read (a JWKS carries both during a rotation: the next test). Calls with tokens of the
    other key sources go on throughout."""
    old_token = admin_token(rotation.pem_key)
    assert await status_with(rotation, old_token) == grpc.StatusCode.OK
    next_key = new_key()
    new_token = admin_token(next_key)
    async with Traffic(rotation, admin_tokens(rotation)) as traffic:
        rotation.pem.publish({"public.pem": b"-----BEGIN PUBLIC KEY-----\nhalf a ke"})
        await until(lambda: rotation.refused.seen(f"token keys of {ISSUER}"))
        await traffic.rounds_done(3)
        assert await status_with(rotation, old_token) == grpc.StatusCode.OK

        rotation.pem.publish({"public.pem": pem_of(next_key)})
        await until(lambda: status_code_is(rotation, new_token, grpc.StatusCode.OK))
        await traffic.rounds_done(3)
    assert traffic.failures == []
    assert await status_with(rotation, old_token) == grpc.StatusCode.UNAUTHENTICATED


async def status_code_is(rotation: Rotation, token: str, code: grpc.StatusCode) -> bool:
    return await status_with(rotation, token) == code


async def test_a_jwks_file_rotation_keeps_every_call_accepted(rotation: Rotation) -> None:
    old, new = rotation.jwks_keys["j1"], new_key()
    old_token, new_token = admin_token(old, "j1"), admin_token(new, "j2")
    signing = {"key": old_token}  # what the identity provider signs with now
    async with Traffic(rotation, {"jwks-file token": lambda: signing["key"]}) as traffic:
        rotation.jwks.publish(
            {"jwks.json": jwks_document({"j1": old.public_key(), "j2": new.public_key()}).encode()}
        )
        await until(lambda: status_code_is(rotation, new_token, grpc.StatusCode.OK))
        # The provider signs with the next key now, the calling service's token too.
        signing["key"] = new_token
        rotation.caller_token.publish({"token": service_token(new, "j2", "egret-rules-j2").encode()})
        await until(lambda: bool(rotation.seen.by("egret-rules-j2")))
        await traffic.rounds_done(3)
        rotation.jwks.publish({"jwks.json": jwks_document({"j2": new.public_key()}).encode()})
        await until(lambda: status_code_is(rotation, old_token, grpc.StatusCode.UNAUTHENTICATED))
        await traffic.rounds_done(3)
    assert traffic.failures == []
    assert await status_with(rotation, new_token) == grpc.StatusCode.OK


async def test_a_jwks_url_rotation_keeps_every_call_accepted(rotation: Rotation) -> None:
    old, new = rotation.city_keys["u1"], new_key()
    old_token, new_token = admin_token(old, "u1", CITY), admin_token(new, "u2", CITY)
    signing = {"key": old_token}
    async with Traffic(rotation, {"city token": lambda: signing["key"]}) as traffic:
        # The provider publishes the next key, then signs with it at once: the first token
        # naming it makes the service fetch again.
        rotation.endpoint.document = jwks_document({"u1": old.public_key(), "u2": new.public_key()})
        signing["key"] = new_token
        await traffic.rounds_done(3)
        # The old key is withdrawn, and the provider is down for a while: the keys fetched
        # last stay in use.
        rotation.endpoint.document = jwks_document({"u2": new.public_key()})
        rotation.endpoint.failing = True
        fetches = rotation.endpoint.fetches
        await until(lambda: rotation.endpoint.fetches > fetches + 1)
        await traffic.rounds_done(3)
        rotation.endpoint.failing = False
        await until(lambda: status_code_is(rotation, old_token, grpc.StatusCode.UNAUTHENTICATED))
        await traffic.rounds_done(3)
    assert traffic.failures == []


async def test_a_renewed_service_token_is_sent_on_the_next_calls(rotation: Rotation) -> None:
    renewed = service_token(rotation.jwks_keys["j1"], "j1", "egret-rules-renewed")
    async with Traffic(rotation, admin_tokens(rotation)) as traffic:
        rotation.caller_token.publish({"token": renewed.encode()})
        await until(lambda: bool(rotation.seen.by("egret-rules-renewed")))
        calls = len(rotation.seen.calls)
        await traffic.rounds_done(3)
    assert traffic.failures == []
    after = [who for who, _ in rotation.seen.calls[calls:] if who.startswith("egret-rules")]
    assert after
    assert set(after) == {"egret-rules-renewed"}


async def test_a_renewed_client_certificate_is_used_by_new_calls(rotation: Rotation) -> None:
    renewed = leaf(rotation.ca, "egret-rules-renewed")
    async with Traffic(rotation, admin_tokens(rotation)) as traffic:
        first = traffic.caller
        assert isinstance(first, RenewingChannel)
        old_channel = first.current()
        # A half-written certificate first: the caller keeps its working credentials.
        (rotation.caller.root / "..data" / "tls.crt").write_bytes(chain(renewed)[:200])
        await until(lambda: rotation.refused.seen("TLS client credentials"))
        await traffic.rounds_done(3)
        assert first.current() is old_channel

        rotation.caller.publish(
            {
                "ca.crt": rotation.ca.cert_pem.bytes(),
                "tls.crt": chain(renewed),
                "tls.key": renewed.private_key_pem.bytes(),
            }
        )
        await until(lambda: "egret-rules-renewed" in rotation.seen.by("egret-rules"))
        calls = len(rotation.seen.calls)
        await traffic.rounds_done(3)
        # The old channel is closed once its calls have finished.
        await until(lambda: old_channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN)
    assert traffic.failures == []
    after = {cn for who, cn in rotation.seen.calls[calls:] if who == "egret-rules"}
    assert after == {"egret-rules-renewed"}
