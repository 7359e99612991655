"""Transport security and credentials: TLS for every server, mutual TLS where required,
and bearer tokens for calls between services.

Production refuses to start without TLS and token keys; running without them needs
EGRET_INSECURE=true, and then every service says so loudly at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from kit.auth import RateLimiter, TokenVerifier
from kit.pseudonym import Pseudonymiser
from kit.settings import Env


@dataclass(frozen=True)
class SecuritySettings:
    insecure: bool
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca_file: Path | None = None
    # CA that signs the other services' certificates, for outgoing calls.
    tls_ca_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256")
    # This service's own token for calls to other services.
    service_token_file: Path | None = None
    rate_per_second: float = 200.0
    rate_burst: float = 400.0

    @classmethod
    def insecure_for_tests(cls) -> SecuritySettings:
        return cls(insecure=True)

    @classmethod
    def read(cls, env: Env) -> SecuritySettings:
        insecure = env.flag("EGRET_INSECURE", False)

        def path(name: str) -> Path | None:
            raw = env.optional(name)
            if raw is None:
                return None
            if not Path(raw).is_file():
                env.problems.append(f"{name}={raw!r}: no such file")
            return Path(raw)

        settings = cls(
            insecure=insecure,
            tls_cert_file=path("EGRET_TLS_CERT_FILE"),
            tls_key_file=path("EGRET_TLS_KEY_FILE"),
            tls_client_ca_file=path("EGRET_TLS_CLIENT_CA_FILE"),
            tls_ca_file=path("EGRET_TLS_CA_FILE"),
            jwt_issuer=env.optional("EGRET_JWT_ISSUER") or "",
            jwt_audience=env.optional("EGRET_JWT_AUDIENCE") or "egret",
            jwt_public_key_file=path("EGRET_JWT_PUBLIC_KEY_FILE"),
            jwt_jwks_file=path("EGRET_JWT_JWKS_FILE"),
            jwt_algorithms=tuple(
                a.strip()
                for a in (env.optional("EGRET_JWT_ALGORITHMS") or "RS256,ES256").split(",")
                if a.strip()
            ),
            service_token_file=path("EGRET_SERVICE_TOKEN_FILE"),
            rate_per_second=env.number("EGRET_RATE_LIMIT_PER_SECOND", 200.0, minimum=0.1),
            rate_burst=env.number("EGRET_RATE_LIMIT_BURST", 400.0, minimum=1.0),
        )
        if not insecure:
            missing = [
                name
                for name, value in (
                    ("EGRET_TLS_CERT_FILE", settings.tls_cert_file),
                    ("EGRET_TLS_KEY_FILE", settings.tls_key_file),
                    ("EGRET_JWT_ISSUER", settings.jwt_issuer),
                )
                if not value
            ]
            if settings.jwt_public_key_file is None and settings.jwt_jwks_file is None:
                missing.append("EGRET_JWT_PUBLIC_KEY_FILE or EGRET_JWT_JWKS_FILE")
            for name in missing:
                env.problems.append(f"{name} is required unless EGRET_INSECURE=true (never in production)")
        return settings

    def verifier(self, pseudonymiser: Pseudonymiser | None) -> TokenVerifier | None:
        if self.insecure:
            return None
        return TokenVerifier.from_files(
            issuer=self.jwt_issuer,
            audience=self.jwt_audience,
            public_key_file=self.jwt_public_key_file,
            jwks_file=self.jwt_jwks_file,
            algorithms=self.jwt_algorithms,
            subject_key_of=pseudonymiser.subject_key if pseudonymiser is not None else None,
        )

    def limiter(self) -> RateLimiter:
        return RateLimiter(rate=self.rate_per_second, burst=self.rate_burst)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        client_ca = self.tls_client_ca_file.read_bytes() if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS (with this service's certificate as client certificate) plus its token."""
        if self.tls_ca_file is None:
            return None
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca_file.read_bytes(),
            private_key=self.tls_key_file.read_bytes() if self.tls_key_file else None,
            certificate_chain=self.tls_cert_file.read_bytes() if self.tls_cert_file else None,
        )
        if self.service_token_file is None:
            return tls
        token = self.service_token_file.read_text().strip()
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))
