"""The rotation harness: a score service over mutual TLS whose certificates, client CA, token
keys (PEM, JWKS file, JWKS URL) and a caller's token and certificate live in Secret-like
directories a test replaces while calls run (tests/integration/test_rotation.py,
test_portal_rotation.py)."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit import filewatch
from kit.interceptors import bearer_token
from kit.principal import SCOPE_APPLY_OUTCOMES, Role, current_principal
from kit.settings import IssuerSettings, SecuritySettings
from kit.tokens import issue_token, jwks_document
from services.score import bootstrap as score_bootstrap
from services.score.servicer import ScoreServicer
from tests.support import waiting
from tests.support.jwks import JwksEndpoint, jwks_endpoint
from tests.support.score import score_settings
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


@asynccontextmanager
async def rotating_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rotation]:
    """Score over mutual TLS, every key and certificate file in a Secret-like directory."""
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


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """tests/support/waiting.py's `until` with the rotation tests' bound and pace; on timeout it
    names the condition by where the caller wrote it."""
    await waiting.until(condition, within_s=ROTATION_TIMEOUT_S, every_s=POLL_S)
