"""The operator's security Secrets for a rehearsal: a throwaway CA, cert-manager-shaped TLS
Secrets, the identity provider's signing key and JWKS, and the services' bearer tokens.

Like devtools.localpki, but shaped by the manifests rather than by a fixed file layout: every
Secret name, key, issuer and audience is read from what the rendered pods mount and set, so a
renamed Secret or key in the chart fails the rehearsal. Each service certificate names what
docs/deploy.md tells an operator to put in its cert-manager Certificate (the DNS names of the
Services selecting the pod) plus the pod's rehearsal IP, which stands in for the cluster's DNS:
the services dial the translated address (127.0.1.N), so hostname verification of every
service-to-service call still has to pass, against exactly the callee's pod.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.interceptors import bearer_token
from kit.principal import SERVICE_SCOPES, Role
from kit.tokens import issue_token, jwks_document
from tests.support.k8s import matches
from tests.support.rehearsal import Pod, Rehearsal, RehearsalError, dns_names

KEY_ID = "rehearsal-1"


@dataclass
class RehearsalPki:
    """What the operator (cert-manager, the identity provider) would have put in the cluster."""

    issuer: str
    audience: str
    ca_pem: bytes
    signing_key: rsa.RSAPrivateKey
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)

    def token(
        self, subject: str, role: Role, *, scopes: tuple[str, ...] = (), lifetime_s: float = 3600.0
    ) -> str:
        return issue_token(
            self.signing_key,
            issuer=self.issuer,
            audience=self.audience,
            subject=subject,
            role=role,
            scopes=scopes,
            lifetime_s=lifetime_s,
            key_id=KEY_ID,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """Server-authenticated TLS against the cluster CA."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)

    def channel(self, rehearsal: Rehearsal, service: str, token: str | None) -> grpc.aio.Channel:
        """A client in the cluster dialling Service `service` by name, as a department or reader
        would; the token travels in an interceptor (kit.interceptors.bearer_token)."""
        return grpc.aio.secure_channel(
            rehearsal.service_address(service),
            self.credentials(),
            options=[("grpc.ssl_target_name_override", service)],
            interceptors=bearer_token(token) if token else None,
        )


def _volume(pod: Pod, name: str) -> dict[str, Any] | None:
    found = [v for v in pod.spec.get("volumes", []) if v["name"] == name]
    return dict(found[0]) if found else None


def create_rehearsal_pki(rehearsal: Rehearsal) -> RehearsalPki:
    """Issue every security Secret the rehearsal's pods mount; add them to its Secrets."""
    deployments = [rehearsal.pods[name] for name in rehearsal.deployments()]
    envs = [rehearsal.declared_env(pod) for pod in deployments]
    # The services verify tokens; the portal only carries them.
    verifying = [env for env in envs if env.get("EGRET_JWT_ISSUER") or "EGRET_PORTAL_PUBLIC_URL" not in env]
    issuers = {env.get("EGRET_JWT_ISSUER") for env in verifying}
    audiences = {env.get("EGRET_JWT_AUDIENCE") for env in verifying}
    if len(issuers) != 1 or len(audiences) != 1 or None in issuers | audiences:
        raise RehearsalError(f"the services disagree on the token issuer or audience: {issuers} {audiences}")
    ca = trustme.CA(organization_name="Egret rehearsal CA")
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki = RehearsalPki(issuers.pop() or "", audiences.pop() or "", ca.cert_pem.bytes(), signing)

    # TLS: one kubernetes.io/tls Secret per Secret name; a certificate naming every Service that
    # selects a pod mounting it (and the pod's IP), or a plain client certificate (the test pod).
    names: dict[str, list[str]] = {}
    for pod in rehearsal.pods.values():
        volume = _volume(pod, "tls")
        if volume is None:
            continue
        identities = names.setdefault(volume["secret"]["secretName"], [])
        if pod.manifest["kind"] == "Deployment":
            for service in rehearsal.services.values():
                if matches(service["spec"]["selector"], pod.metadata["labels"]):
                    identities.extend(sorted(dns_names(service["metadata"]["name"])))
            identities.append(pod.ip)
    for secret, identities in names.items():
        leaf = ca.issue_cert(*(identities or [secret.removesuffix("-tls")]), common_name=secret)
        pki.secrets[(secret, "tls.crt")] = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
        pki.secrets[(secret, "tls.key")] = leaf.private_key_pem.bytes().decode()
        pki.secrets[(secret, "ca.crt")] = ca.cert_pem.bytes().decode()

    # The identity provider's verification keys, in the format the pods read.
    public = signing.public_key()
    for pod, env in zip(deployments, envs, strict=True):
        volume = _volume(pod, "jwt")
        if volume is None:
            continue
        if "secret" not in volume:
            raise RehearsalError(f"{pod.name}: the rehearsal plays only Secrets, not {sorted(volume)}")
        (item,) = volume["secret"]["items"]
        if "EGRET_JWT_JWKS_FILE" in env:
            document = jwks_document({KEY_ID: public})
        else:
            document = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        pki.secrets[(volume["secret"]["secretName"], item["key"])] = document

    # Each calling service's own bearer token (role "service"), and the config-apply Job's.
    for pod in rehearsal.pods.values():
        volume = _volume(pod, "service-token")
        if volume is None:
            continue
        (item,) = volume["secret"]["items"]
        service = pod.metadata["labels"]["app.kubernetes.io/component"]
        pki.secrets[(volume["secret"]["secretName"], item["key"])] = pki.token(
            f"egret-{service}", Role.SERVICE, scopes=SERVICE_SCOPES[service], lifetime_s=86_400.0
        )

    rehearsal.secrets.update(pki.secrets)
    return pki
