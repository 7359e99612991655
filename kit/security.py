"""Transport security and credentials built from SecuritySettings: TLS for every server,
mutual TLS where a client CA is configured, bearer tokens for calls between services.

Every certificate, key, CA, token and verification key is read again when its file changes
(kit.filewatch), so a renewal needs no restart: docs/security.md, "Rotation without restart".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kit.claims import ClaimMapping
from kit.filewatch import FileWatch
from kit.interceptors import PeerCredentials
from kit.principal import Role
from kit.pseudonym import Pseudonymiser
from kit.rate_limit import RateLimiter
from kit.settings import SecuritySettings
from kit.tokens import TokenVerifier, TrustedIssuer


def token_verifier(settings: SecuritySettings, pseudonymiser: Pseudonymiser | None) -> TokenVerifier | None:
    """The verifier of incoming tokens; None in insecure mode. Its keys are read again when
    their files change, and a JWKS URL is fetched again (kit.token_keys)."""
    if settings.insecure:
        return None
    return TokenVerifier.from_files(
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        public_key_file=settings.jwt_public_key_file,
        jwks_file=settings.jwt_jwks_file,
        jwks_url=settings.jwt_jwks_url,
        jwks_lifespan_s=settings.jwt_jwks_cache_s,
        algorithms=settings.jwt_algorithms,
        subject_key_of=pseudonymiser.subject_key if pseudonymiser is not None else None,
        generation_keys_of=pseudonymiser.generation_keys
        if pseudonymiser is not None and pseudonymiser.key
        else None,
        max_lifetime_s=settings.max_token_lifetime_s,
        claims=_claims(settings.jwt_role_claim, settings.jwt_subject_claim, settings.jwt_role_map),
        more_issuers=[
            TrustedIssuer.from_files(
                extra.issuer,
                public_key_file=extra.public_key_file,
                jwks_file=extra.jwks_file,
                jwks_url=extra.jwks_url,
                jwks_lifespan_s=settings.jwt_jwks_cache_s,
                claims=_claims(extra.role_claim, extra.subject_claim, extra.role_map),
            )
            for extra in settings.jwt_extra_issuers
        ],
    )


def _claims(role_claim: str, subject_claim: str, role_map: tuple[tuple[str, str], ...]) -> ClaimMapping:
    mapped = {value: Role(role) for value, role in role_map}
    return ClaimMapping(role_claim, subject_claim, mapped or None)


def rate_limiter(settings: SecuritySettings) -> RateLimiter:
    return RateLimiter(rate=settings.rate_per_second, burst=settings.rate_burst)


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    certificates = x509.load_pem_x509_certificates(pem)
    if not certificates:
        raise ValueError(f"{what} holds no certificate")
    return certificates


def _key_pair(certificate_pem: bytes, key_pem: bytes) -> None:
    """Raises unless `key_pem` is the private key of the (first) certificate in `certificate_pem`:
    between the writes of a certificate and its key, the files do not belong together."""
    public = _certificates(certificate_pem, "the certificate file")[0].public_key()
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != public.public_bytes(*spki):
        raise ValueError("the private key does not belong to the certificate")


class _ServingCertificate:
    """The server's certificate configuration for gRPC's dynamic TLS credentials: gRPC asks
    on every new handshake, and gets a new configuration only once the files changed."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        paths = [cert_file, key_file, *([client_ca_file] if client_ca_file else [])]
        self._watch = FileWatch(paths, self._parse, what="TLS server certificate and client CA")
        self._served = self._watch.generation

    @staticmethod
    def _parse(contents: list[bytes]) -> grpc.ServerCertificateConfiguration:
        cert, key, *client_ca = contents
        _key_pair(cert, key)
        if client_ca:
            _certificates(client_ca[0], "the client CA file")
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=client_ca[0] if client_ca else None
        )

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._watch.get()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """None keeps the current configuration (gRPC's contract for the fetcher)."""
        generation = self._watch.generation
        if generation == self._served:
            return None
        self._served = generation
        return self._watch.get()


def server_credentials(settings: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS for the listening port; with a client CA, clients must present a certificate.
    A renewed certificate, key or client CA is served to new connections, without restart."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    serving = _ServingCertificate(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    # gRPC's fetcher may answer None (no change); the type stubs leave that out.
    fetch = cast("Callable[[], grpc.ServerCertificateConfiguration]", serving)
    return grpc.dynamic_ssl_server_credentials(
        serving.initial(),
        fetch,
        require_client_authentication=settings.tls_client_ca_file is not None,
    )


def _channel_tls(contents: list[bytes]) -> grpc.ChannelCredentials:
    ca, *pair = contents
    _certificates(ca, "the CA file")
    if not pair:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    cert, key = pair
    _key_pair(cert, key)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _token(contents: list[bytes]) -> str:
    token = contents[0].decode().strip()
    if not token or any(c.isspace() for c in token):
        # The message never holds the token.
        raise ValueError("the token file is empty or holds more than one word")
    return token


class CallerFiles(Protocol):
    """The files a caller of the services reads: SecuritySettings' fields of these names,
    and the portal's settings (services.portal.settings), which have the same ones."""

    @property
    def tls_ca_file(self) -> Path | None: ...
    @property
    def tls_cert_file(self) -> Path | None: ...
    @property
    def tls_key_file(self) -> Path | None: ...
    @property
    def service_token_file(self) -> Path | None: ...


def channel_credentials(settings: CallerFiles) -> PeerCredentials | None:
    """For calls to other services: TLS against the services' CA, this service's
    certificate as client certificate (mutual TLS), and its bearer token. Each is read
    again when its files change: a channel opened with these credentials reopens itself
    with renewed TLS files, and the next call carries a renewed token (kit.channels).
    None without a CA (insecure mode): no TLS, and no token either."""
    if settings.tls_ca_file is None:
        return None
    pair = (
        [settings.tls_cert_file, settings.tls_key_file]
        if settings.tls_cert_file is not None and settings.tls_key_file is not None
        else []
    )
    tls = FileWatch([settings.tls_ca_file, *pair], _channel_tls, what="TLS client credentials")
    if settings.service_token_file is None:
        return PeerCredentials(tls.get)
    token = FileWatch([settings.service_token_file], _token, what="service token")
    return PeerCredentials(tls.get, token.get)


def _not_after(contents: list[bytes]) -> float:
    return _certificates(contents[0], "the certificate file")[0].not_valid_after_utc.timestamp()


@functools.cache
def _expiry_watch(path: Path) -> FileWatch[float]:
    # One watch per configured file for the process's life (at most three): the metric is
    # read on every scrape, and this keeps that to a stat a second.
    return FileWatch([path], _not_after, what="certificate expiry")


def certificate_expiry(settings: SecuritySettings) -> dict[str, float]:
    """When each configured certificate now on disk expires (its first certificate's
    notAfter, unix seconds): "server" (EGRET_TLS_CERT_FILE), "ca" (EGRET_TLS_CA_FILE),
    "client_ca" (EGRET_TLS_CLIENT_CA_FILE). A file that has never parsed is left out; one
    that stops parsing keeps its last good value, as the services keep using it."""
    files = {
        "server": settings.tls_cert_file,
        "ca": settings.tls_ca_file,
        "client_ca": settings.tls_client_ca_file,
    }
    expiry: dict[str, float] = {}
    for name, path in files.items():
        if path is None:
            continue
        try:
            expiry[name] = _expiry_watch(path).get()
        except (OSError, ValueError):
            continue
    return expiry
