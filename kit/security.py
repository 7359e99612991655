"""Transport security and credentials built from SecuritySettings: TLS for every server,
mutual TLS where a client CA is configured, bearer tokens for calls between services."""

from __future__ import annotations

import grpc

from kit.auth import ClaimMapping, RateLimiter, Role, TokenVerifier, TrustedIssuer
from kit.interceptors import PeerCredentials
from kit.pseudonym import Pseudonymiser
from kit.settings import SecuritySettings


def token_verifier(settings: SecuritySettings, pseudonymiser: Pseudonymiser | None) -> TokenVerifier | None:
    """The verifier of incoming tokens; None in insecure mode."""
    if settings.insecure:
        return None
    return TokenVerifier.from_files(
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        public_key_file=settings.jwt_public_key_file,
        jwks_file=settings.jwt_jwks_file,
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


def server_credentials(settings: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS for the listening port; with a client CA, clients must present a certificate."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(settings: SecuritySettings) -> PeerCredentials | None:
    """For calls to other services: TLS against the services' CA, this service's
    certificate as client certificate (mutual TLS), and its bearer token."""
    if settings.tls_ca_file is None:
        return None
    tls = grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=settings.tls_key_file.read_bytes() if settings.tls_key_file else None,
        certificate_chain=settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None,
    )
    if settings.service_token_file is None:
        return PeerCredentials(tls)
    return PeerCredentials(tls, settings.service_token_file.read_text().strip())
