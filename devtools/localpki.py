"""A throwaway public-key infrastructure for local runs and tests: a CA, a certificate per
service, a token-signing key and tokens for each role.

`make run`, the end-to-end tests and the benchmark use it so that Egret runs locally with
security on, exactly as in production (TLS everywhere, mutual TLS between services,
signed bearer tokens). Nothing here is ever committed; every run makes its own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.interceptors import SyncBearerToken, bearer_token
from kit.principal import SERVICE_SCOPES, Role
from kit.tokens import issue_token

SERVICES = ("ingest", "rules", "score", "query")
# Services only other services call: they require a client certificate (mutual TLS).
INTERNAL = ("rules", "score")
# The client certificate of local tools (demo, tests, an operator's console).
OPERATOR = "operator"
# The web portal's client certificate: score requires mutual TLS of every caller.
PORTAL = "portal"
ISSUER = "https://idp.egret.local"
AUDIENCE = "egret"
AUDIT_KEY_ID = "local-1"


@dataclass(frozen=True)
class LocalPki:
    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def jwt_public_key_file(self) -> Path:
        return self.directory / "jwt-public.pem"

    def cert_file(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key_file(self, name: str) -> Path:
        return self.directory / f"{name}-key.pem"

    def service_token_file(self, name: str) -> Path:
        return self.directory / f"{name}.token"

    @property
    def audit_key_file(self) -> Path:
        """The MAC key of every service's audit chain (a mounted Secret in a cluster)."""
        return self.directory / "audit.key"

    def token(
        self,
        subject: str,
        role: Role,
        *,
        scopes: tuple[str, ...] = (),
        lifetime_s: float = 86_400.0,
        issued_at: float | None = None,
    ) -> str:
        """A token for `subject`, issued now (or at `issued_at`); 24 h, the longest lifetime
        services accept by default (EGRET_MAX_TOKEN_LIFETIME_S)."""
        key = serialization.load_pem_private_key((self.directory / "jwt-private.pem").read_bytes(), None)
        return issue_token(
            key,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=subject,
            role=role,
            scopes=scopes,
            lifetime_s=lifetime_s,
            now=issued_at,
        )

    def service_token(self, name: str, *, lifetime_s: float = 86_400.0) -> str:
        """The token service `name` calls the others with: role service, its own scopes."""
        return self.token(f"egret-{name}", Role.SERVICE, scopes=SERVICE_SCOPES[name], lifetime_s=lifetime_s)

    def env(self, name: str) -> dict[str, str]:
        """The security settings of service `name`."""
        env = {
            "EGRET_TLS_CERT_FILE": str(self.cert_file(name)),
            "EGRET_TLS_KEY_FILE": str(self.key_file(name)),
            "EGRET_TLS_CA_FILE": str(self.ca_file),
            "EGRET_JWT_ISSUER": ISSUER,
            "EGRET_JWT_AUDIENCE": AUDIENCE,
            "EGRET_JWT_PUBLIC_KEY_FILE": str(self.jwt_public_key_file),
            "EGRET_SERVICE_TOKEN_FILE": str(self.service_token_file(name)),
            "EGRET_AUDIT_KEY_FILE": str(self.audit_key_file),
            "EGRET_AUDIT_KEY_ID": AUDIT_KEY_ID,
        }
        if name in INTERNAL:
            env["EGRET_TLS_CLIENT_CA_FILE"] = str(self.ca_file)
        return env

    def tls(self, name: str = OPERATOR) -> grpc.ChannelCredentials:
        """TLS against the local CA with `name`'s client certificate (rules and score
        require one; the operator's by default)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file(name).read_bytes(),
            certificate_chain=self.cert_file(name).read_bytes(),
        )

    def service_channel(self, address: str, name: str) -> grpc.aio.Channel:
        """A channel as service `name` calls another: mutual TLS with its certificate, its token."""
        token = self.service_token_file(name).read_text().strip()
        return grpc.aio.secure_channel(address, self.tls(name), interceptors=bearer_token(token))

    def channel(self, address: str, token: str) -> grpc.aio.Channel:
        """A client channel to a local service: TLS against the local CA plus `token`
        (sent by an interceptor, not call credentials: see kit.interceptors.bearer_token)."""
        return grpc.aio.secure_channel(address, self.tls(), interceptors=bearer_token(token))

    def sync_channel(self, address: str, token: str) -> grpc.Channel:
        """The blocking form of `channel`."""
        return grpc.intercept_channel(grpc.secure_channel(address, self.tls()), SyncBearerToken(token))


def create_local_pki(directory: Path) -> LocalPki:
    """Write a fresh CA, service certificates, a signing key and service tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = LocalPki(directory)
    ca = trustme.CA(organization_name="Egret local development CA")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    for name in (*SERVICES, OPERATOR, PORTAL):
        leaf = ca.issue_cert("127.0.0.1", "localhost", f"egret-{name}", common_name=f"egret-{name}")
        leaf.private_key_pem.write_to_path(str(pki.key_file(name)))
        pki.cert_file(name).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "jwt-private.pem").write_bytes(
        signing.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pki.jwt_public_key_file.write_bytes(
        signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for name in (*SERVICES, PORTAL):
        # The longest lifetime services accept (EGRET_MAX_TOKEN_LIFETIME_S, 24 h by default).
        pki.service_token_file(name).write_text(pki.service_token(name))
    pki.audit_key_file.write_text(secrets.token_hex(32))
    for path in directory.iterdir():
        path.chmod(0o600)
    return pki
