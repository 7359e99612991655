"""Rotation without restart, the portal's part: its client certificate (score requires mutual
TLS) and its own service token are replaced while the portal's backend keeps calling score.
No call fails; afterwards every call presents the new certificate, the public reads carry
the new token, and a person's calls still carry that person's own token (docs/security.md,
"Rotation without restart").

The backend is the portal's own (services.portal.bootstrap.connect from PortalSettings read
from the environment); score, its PKI and the spy on who calls come from tests.support.rotation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from egret.score.v1 import score_service_pb2 as pb
from kit.channels import RenewingChannel
from kit.principal import SCOPE_PUBLIC_READ, Role
from kit.tokens import issue_token
from services.portal import backend as portal_backend
from services.portal.backend import Backend, ServiceError
from services.portal.bootstrap import connect
from services.portal.settings import PortalSettings
from tests.support.rotation import (
    AUDIENCE,
    ISSUER,
    POLL_S,
    Rotation,
    Secret,
    admin_token,
    chain,
    leaf,
    rotating_score,
    until,
)

PORTAL = "egret-portal"
PERSON = "ops"  # the admin token's sub: the signed-in person of the portal's staff calls


def portal_token(score: Rotation, subject: str) -> bytes:
    return issue_token(
        score.jwks_keys["j1"],
        issuer=ISSUER,
        audience=AUDIENCE,
        subject=subject,
        role=Role.SERVICE,
        scopes=(SCOPE_PUBLIC_READ,),
        key_id="j1",
    ).encode()


def tls_files(score: Rotation, cert: trustme.LeafCert) -> dict[str, bytes]:
    return {
        "ca.crt": score.ca.cert_pem.bytes(),
        "tls.crt": chain(cert),
        "tls.key": cert.private_key_pem.bytes(),
    }


@dataclass
class Portal:
    score: Rotation
    tls: Secret
    token: Secret
    backend: Backend


@pytest.fixture
async def rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rotation]:
    async with rotating_score(tmp_path, monkeypatch) as running_score:
        yield running_score


@pytest.fixture
async def portal(
    rotation: Rotation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Portal]:
    score = rotation
    # Every public read goes to score (no 60 s cache), so each round shows the token it sent.
    monkeypatch.setattr(portal_backend, "PUBLIC_CACHE_S", 0.0)
    tls = Secret(tmp_path / "portal-tls", tls_files(score, leaf(score.ca, PORTAL)))
    token = Secret(tmp_path / "portal-token", {"token": portal_token(score, PORTAL)})
    (tmp_path / "session.key").write_text("a-session-secret-of-at-least-32-bytes-long")
    (tmp_path / "client.secret").write_text("portal-client-secret")
    settings = PortalSettings.from_env(
        {
            "EGRET_PORTAL_PUBLIC_URL": "http://127.0.0.1:8080",
            "EGRET_PORTAL_INSECURE_HTTP": "true",
            "EGRET_PORTAL_SESSION_SECRET_FILE": str(tmp_path / "session.key"),
            "EGRET_PORTAL_OIDC_ISSUER": "http://127.0.0.1:1",
            "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE": str(tmp_path / "client.secret"),
            "EGRET_QUERY_ADDRESS": score.address,  # never called here
            "EGRET_SCORE_ADDRESS": score.address,
            "EGRET_TLS_CA_FILE": str(tls.path("ca.crt")),
            "EGRET_TLS_CERT_FILE": str(tls.path("tls.crt")),
            "EGRET_TLS_KEY_FILE": str(tls.path("tls.key")),
            "EGRET_SERVICE_TOKEN_FILE": str(token.path("token")),
        }
    )
    backend = connect(settings)
    try:
        yield Portal(score, tls, token, backend)
    finally:
        await backend.close()


class Traffic:
    """The portal's calls to score in a loop until stopped: a public read (the policy page,
    with the portal's own token) and a staff member's call with their own token, both on the
    portal's one channel to score. Every failure is kept."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.person_token = admin_token(portal.score.jwks_keys["j1"], "j1")
        self.failures: list[str] = []
        self.rounds = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        await self.rounds_done(3)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        backend = self.portal.backend
        while not self._stop.is_set():
            try:
                await backend.policy()
            except ServiceError as exc:
                self.failures.append(f"public read: {exc}")
            try:
                await backend.call("score", "GetActivePolicy", pb.GetActivePolicyRequest(), self.person_token)
            except ServiceError as exc:
                self.failures.append(f"person's call: {exc}")
            self.rounds += 1
            await asyncio.sleep(POLL_S)

    async def rounds_done(self, more: int) -> None:
        target = self.rounds + more
        await until(lambda: self.rounds >= target)


def certificates_of(score: Rotation, since: int, principal: str) -> set[str]:
    """The client certificates (common names) `principal`'s calls presented after call `since`."""
    return {cn for who, cn in score.seen.calls[since:] if who == principal}


async def test_a_renewed_client_certificate_is_presented_by_the_portals_next_calls(portal: Portal) -> None:
    score = portal.score
    renewed = leaf(score.ca, "egret-portal-renewed")
    async with Traffic(portal) as traffic:
        assert certificates_of(score, 0, PORTAL) == {PORTAL}
        assert certificates_of(score, 0, PERSON) == {PORTAL}
        channel = portal.backend._channels[1]  # query's, score's (services.portal.backend)
        assert isinstance(channel, RenewingChannel)
        old_channel = channel.current()
        # A half-written certificate first: the portal keeps its working credentials.
        (portal.tls.root / "..data" / "tls.crt").write_bytes(chain(renewed)[:200])
        await until(lambda: score.refused.seen("TLS client credentials"))
        await traffic.rounds_done(3)
        assert channel.current() is old_channel

        portal.tls.publish(tls_files(score, renewed))
        await until(lambda: "egret-portal-renewed" in certificates_of(score, 0, PORTAL))
        calls = len(score.seen.calls)
        await traffic.rounds_done(3)
        # The old channel is closed once its calls have finished.
        await until(lambda: old_channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN)
    assert traffic.failures == []
    # Both kinds of call, each with its own token, on the renewed certificate only.
    assert certificates_of(score, calls, PORTAL) == {"egret-portal-renewed"}
    assert certificates_of(score, calls, PERSON) == {"egret-portal-renewed"}


async def test_a_renewed_service_token_is_sent_on_the_portals_next_public_reads(portal: Portal) -> None:
    score = portal.score
    async with Traffic(portal) as traffic:
        portal.token.publish({"token": portal_token(score, "egret-portal-renewed")})
        await until(lambda: bool(score.seen.by("egret-portal-renewed")))
        calls = len(score.seen.calls)
        await traffic.rounds_done(3)
    assert traffic.failures == []
    callers = {who for who, _ in score.seen.calls[calls:]}
    # The public reads carry the renewed token; the person's calls their own, as before.
    assert callers == {"egret-portal-renewed", PERSON}
