"""A ready-to-use client setup for a local cluster: a token per role and an `egret` config
file with one profile per role (clients/python, egret_client.profile).

`make run` writes it under var/demo/ and the CLI's tests under their own directory, so
a newcomer and a test use the same files the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from devtools.cluster import Cluster
from devtools.localpki import AUDIENCE, ISSUER, OPERATOR
from kit.principal import Role


@dataclass(frozen=True)
class Identity:
    """Who a profile calls as: the token's role and subject claim, and its default purpose."""

    profile: str
    role: Role
    subject: str
    purpose: str = ""


# The department submits library events (config/catalogue.yaml); the benefit provider is
# the library (config/benefits.yaml); purposes come from config/purposes.yaml.
def default_identities(resident_id: str) -> tuple[Identity, ...]:
    return (
        Identity("department", Role.DEPARTMENT, "library"),
        Identity("reviewer", Role.REVIEWER, "reviewer-demo", "subject-request"),
        Identity("auditor", Role.AUDITOR, "auditor-demo", "audit"),
        Identity("admin", Role.ADMIN, "admin-demo", "operations"),
        Identity("benefit-provider", Role.BENEFIT_PROVIDER, "library", "eligibility-check"),
        Identity("subject", Role.SUBJECT, f"person:resident-id:{resident_id}", "own-record"),
    )


def write_client_config(
    cluster: Cluster,
    directory: Path,
    identities: Sequence[Identity],
    *,
    current: str = "reviewer",
    lifetime_s: float = 86_400.0,
) -> Path:
    """Write directory/tokens/<profile>.token and directory/egret.yaml; return the config path.

    Every profile uses the operator's client certificate (score requires mutual TLS of every
    caller) and the cluster's CA. Tokens last `lifetime_s` (24 h, the longest services accept);
    `egret dev token` mints fresh ones from the same signing key.
    """
    pki = cluster.pki
    if pki is None:
        raise ValueError("the cluster runs without TLS and tokens; nothing to write")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    endpoints: Mapping[str, str] = {
        name: cluster.address(name) for name in ("ingest", "rules", "score", "query")
    }
    tls = {
        "ca": str(pki.ca_file),
        "cert": str(pki.cert_file(OPERATOR)),
        "key": str(pki.key_file(OPERATOR)),
    }
    profiles = {}
    for identity in identities:
        token_file = tokens / f"{identity.profile}.token"
        token_file.write_text(pki.token(identity.subject, identity.role, lifetime_s=lifetime_s) + "\n")
        token_file.chmod(0o600)
        profile: dict[str, object] = {
            "endpoints": dict(endpoints),
            "tls": tls,
            "token-file": str(token_file.relative_to(directory)),
            "local": True,
        }
        if identity.purpose:
            profile["purpose"] = identity.purpose
        profiles[identity.profile] = profile
    document = {
        "current-profile": current,
        "profiles": profiles,
        "dev": {
            "signing-key": str(pki.directory / "jwt-private.pem"),
            "issuer": ISSUER,
            "audience": AUDIENCE,
        },
    }
    path = directory / "egret.yaml"
    path.write_text(
        "# The `egret` command's profiles for this local cluster (written by devtools.client_config).\n"
        + yaml.safe_dump(document, sort_keys=False),
        encoding="utf-8",
    )
    return path
