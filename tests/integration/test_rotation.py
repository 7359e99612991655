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
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from egret.score.v1 import score_service_pb2 as pb
from egret.score.v1 import score_service_pb2_grpc as pb_grpc
from kit import filewatch
from kit.auth import SCOPE_APPLY_OUTCOMES, Role, current_principal, issue_token, jwks_document
from kit.channels import RenewingChannel
from kit.interceptors import bearer_token, open_channel
from kit.security import certificate_expiry, channel_credentials
from kit.settings import IssuerSettings, SecuritySettings
from services.score import bootstrap as score_bootstrap
from services.score.servicer import ScoreServicer
from tests.integration.test_score_service import score_settings
from tests.support.jwks import JwksEndpoint, jwks_endpoint
from tests.support.servers import running

ISSUER = "https://idp.rotation.test"
CITY = "https://sign-in.city.test"
AUDIENCE = "egret"
POLL_S = 0.05
ROTATION_TIMEOUT_S = 10.0
SERVER_FILES = "TLS server certificate and client CA"


class Refusals:
    """kit.filewatch's log, recording which watched files changed but were refused (kept
    the last good content): shows that a bad file was looked at, not merely not yet seen."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.what: list[str] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.what.append(fields.get("what", ""))
        self._inner.warning(event, **fields)

    def seen(self, what: str) -> bool:
        return what in self.what

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Secret:
    """A directory mounted from a Secret: each file a symlink through `..data`."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        root.mkdir(parents=True)
        self._versions = 0
        self.publish(files)

    def path(self, name: str) -> Path:
        return self.root / name

    def publish(self, files: dict[str, bytes]) -> None:
        """Replace every file at once, as the kubelet does."""
        self._versions += 1
        target = self.root / f"..v{self._versions}"
        target.mkdir()
        for name, content in files.items():
            (target / name).write_bytes(content)
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.root / "..data")
        for name in files:
            if not self.path(name).is_symlink():
                self.path(name).symlink_to(Path("..data") / name)


def pem_of(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def leaf(ca: trustme.CA, name: str) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost", common_name=name)


def chain(cert: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems)


def admin_token(key: rsa.RSAPrivateKey, kid: str | None = None, issuer: str = ISSUER) -> str:
    return issue_token(key, issuer=issuer, audience=AUDIENCE, subject="ops", role=Role.ADMIN, key_id=kid)


def service_token(key: rsa.RSAPrivateKey, kid: str, subject: str) -> str:
    return issue_token(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject=subject,
        role=Role.SERVICE,
        scopes=(SCOPE_APPLY_OUTCOMES,),
        key_id=kid,
    )


@dataclass
class Seen:
    """Who each call to GetActivePolicy came from: its principal and client certificate."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def by(self, principal: str) -> list[str]:
        return [cn for who, cn in self.calls if who == principal]


@dataclass
class Rotation:
    address: str
    ca: trustme.CA
    server: Secret
    client_ca: Secret
    pem: Secret
    jwks: Secret
    caller: Secret
    caller_token: Secret
    endpoint: JwksEndpoint
    caller_settings: SecuritySettings
    score_settings: SecuritySettings
    pem_key: rsa.RSAPrivateKey
    jwks_keys: dict[str, rsa.RSAPrivateKey]
    city_keys: dict[str, rsa.RSAPrivateKey]
    operator: trustme.LeafCert
    seen: Seen
    refused: Refusals

    def client_tls(self, client: trustme.LeafCert | None = None) -> grpc.ChannelCredentials:
        client = client or self.operator
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem.bytes(),
            private_key=client.private_key_pem.bytes(),
            certificate_chain=chain(client),
        )

    def channel(
        self, token: str | Callable[[], str], client: trustme.LeafCert | None = None
    ) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.address, self.client_tls(client), interceptors=bearer_token(token)
        )

    def presented(self, client: trustme.LeafCert | None = None, ca: trustme.CA | None = None) -> bytes:
        """The certificate the server presents to a fresh TLS connection (DER); raises
        ssl.SSLError when the server refuses `client`'s certificate."""
        client = client or self.operator
        context = ssl.create_default_context(cadata=(ca or self.ca).cert_pem.bytes().decode())
        client.private_key_and_cert_chain_pem.write_to_path(str(self.caller.root.parent / "probe.pem"))
        context.load_cert_chain(str(self.caller.root.parent / "probe.pem"))
        context.set_alpn_protocols(["h2"])
        host, port = self.address.rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # The server checks the client's certificate after its own is sent (TLS 1.3):
            # a refusal shows on the first read.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            tls.recv(1)
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def der(cert: trustme.LeafCert) -> bytes:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )


@pytest.fixture
async def rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rotation]:
    seen = Seen()
    original = ScoreServicer.GetActivePolicy

    async def spied(self: Any, request: Any, context: Any) -> Any:
        principal = current_principal()
        names = context.auth_context().get("x509_common_name", [b""])
        seen.calls.append((principal.id if principal else "", names[0].decode()))
        return await original(self, request, context)

    monkeypatch.setattr(ScoreServicer, "GetActivePolicy", spied)
    refused = Refusals(filewatch.log)
    monkeypatch.setattr(filewatch, "log", refused)

    ca = trustme.CA(organization_name="Rotation test CA")
    server_cert = leaf(ca, "egret-score")
    caller_cert = leaf(ca, "egret-rules")
    pem_key, jwks_key, city_key = new_key(), new_key(), new_key()
    server = Secret(
        tmp_path / "score-tls",
        {"tls.crt": chain(server_cert), "tls.key": server_cert.private_key_pem.bytes()},
    )
    client_ca = Secret(tmp_path / "score-client-ca", {"ca.crt": ca.cert_pem.bytes()})
    pem = Secret(tmp_path / "jwt-pem", {"public.pem": pem_of(pem_key)})
    jwks = Secret(tmp_path / "jwt-jwks", {"jwks.json": jwks_document({"j1": jwks_key.public_key()}).encode()})
    caller = Secret(
        tmp_path / "rules-tls",
        {
            "ca.crt": ca.cert_pem.bytes(),
            "tls.crt": chain(caller_cert),
            "tls.key": caller_cert.private_key_pem.bytes(),
        },
    )
    caller_token = Secret(
        tmp_path / "rules-token", {"token": service_token(jwks_key, "j1", "egret-rules").encode()}
    )
    with jwks_endpoint(jwks_document({"u1": city_key.public_key()})) as endpoint:
        security = SecuritySettings(
            insecure=False,
            tls_cert_file=server.path("tls.crt"),
            tls_key_file=server.path("tls.key"),
            tls_client_ca_file=client_ca.path("ca.crt"),
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            jwt_public_key_file=pem.path("public.pem"),
            jwt_jwks_file=jwks.path("jwks.json"),
            jwt_jwks_cache_s=1.0,
            jwt_extra_issuers=(IssuerSettings(name="CITY", issuer=CITY, jwks_url=endpoint.url),),
        )
        settings = score_settings(f"sqlite:///{tmp_path / 'score.db'}", tmp_path)
        settings = replace(settings, common=replace(settings.common, security=security))
        async with running(settings, score_bootstrap.build, score_bootstrap.MIGRATIONS) as address:
            yield Rotation(
                address=address,
                ca=ca,
                server=server,
                client_ca=client_ca,
                pem=pem,
                jwks=jwks,
                caller=caller,
                caller_token=caller_token,
                endpoint=endpoint,
                caller_settings=SecuritySettings(
                    insecure=False,
                    tls_cert_file=caller.path("tls.crt"),
                    tls_key_file=caller.path("tls.key"),
                    tls_ca_file=caller.path("ca.crt"),
                    service_token_file=caller_token.path("token"),
                ),
                score_settings=security,
                pem_key=pem_key,
                jwks_keys={"j1": jwks_key},
                city_keys={"u1": city_key},
                operator=leaf(ca, "operator"),
                seen=seen,
                refused=refused,
            )


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


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    deadline = time.monotonic() + ROTATION_TIMEOUT_S
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("the rotation did not take effect in time")
        await asyncio.sleep(POLL_S)


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
