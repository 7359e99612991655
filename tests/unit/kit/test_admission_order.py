"""Every service refuses a call in one order: no valid token (UNAUTHENTICATED), then a role
or scope that may not call (PERMISSION_DENIED), then a missing deadline (INVALID_ARGUMENT),
so a caller without a token learns nothing about an RPC's other rules."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.audit_chain import POLICY as AUDIT_CHAIN_POLICY
from kit.auth import CallPolicy, Gate
from kit.errors import InvalidArgument, PermissionDenied, Unauthenticated
from kit.principal import Role
from kit.tokens import TokenVerifier, issue_token
from services.ingest.access import POLICY as INGEST_POLICY
from services.query.access import POLICY as QUERY_POLICY
from services.rules.access import POLICY as RULES_POLICY
from services.score.access import POLICY as SCORE_POLICY

ISSUER, AUDIENCE = "https://idp.city.example", "egret"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
POLICIES: Mapping[str, Mapping[str, CallPolicy]] = {
    "ingest": {**INGEST_POLICY, **AUDIT_CHAIN_POLICY},
    "rules": {**RULES_POLICY, **AUDIT_CHAIN_POLICY},
    "score": {**SCORE_POLICY, **AUDIT_CHAIN_POLICY},
    "query": {**QUERY_POLICY, **AUDIT_CHAIN_POLICY},
}


def rpcs() -> Iterator[tuple[str, str]]:
    for service, policy in POLICIES.items():
        for method in policy:
            yield service, method


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> TokenVerifier:
    pem = tmp_path_factory.mktemp("idp") / "idp.pem"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # Subjects are admitted without a key: no RPC here reaches a handler.
    return TokenVerifier.from_files(issuer=ISSUER, audience=AUDIENCE, public_key_file=pem)


def bearer(role: Role, scopes: frozenset[str] = frozenset()) -> dict[str, str | bytes]:
    subject = "person:resident-id:350200199001011230" if role is Role.SUBJECT else f"a-{role.value}"
    token = issue_token(
        KEY, issuer=ISSUER, audience=AUDIENCE, subject=subject, role=role, scopes=tuple(sorted(scopes))
    )
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("service", "method"), list(rpcs()))
def test_without_a_token_every_rpc_is_unauthenticated_whatever_else_is_missing(
    verifier: TokenVerifier, service: str, method: str
) -> None:
    gate = Gate(verifier, POLICIES[service])
    for metadata in ({}, {"authorization": "Bearer not-a-token"}):
        with pytest.raises(Unauthenticated):
            gate.admit(method, metadata, time_remaining=None)
    # Also an RPC no policy names: the caller must first say who it is.
    with pytest.raises(Unauthenticated):
        gate.admit(method + "Unlisted", {}, time_remaining=None)


@pytest.mark.parametrize(("service", "method"), list(rpcs()))
def test_a_role_the_rpc_is_not_open_to_is_permission_denied_even_without_a_deadline(
    verifier: TokenVerifier, service: str, method: str
) -> None:
    rule = POLICIES[service][method]
    gate = Gate(verifier, POLICIES[service])
    for role in set(Role) - rule.roles:
        with pytest.raises(PermissionDenied):
            gate.admit(method, bearer(role), time_remaining=None)
    if Role.SERVICE in rule.roles:
        with pytest.raises(PermissionDenied):
            gate.admit(method, bearer(Role.SERVICE, frozenset({"egret.other"})), time_remaining=None)


@pytest.mark.parametrize(("service", "method"), list(rpcs()))
def test_a_caller_the_rpc_is_open_to_is_then_held_to_its_deadline_rule(
    verifier: TokenVerifier, service: str, method: str
) -> None:
    rule = POLICIES[service][method]
    gate = Gate(verifier, POLICIES[service])
    for role in rule.roles:
        metadata = bearer(role, rule.service_scopes if role is Role.SERVICE else frozenset())
        assert gate.admit(method, metadata, time_remaining=5.0) is not None
        if rule.require_deadline:
            with pytest.raises(InvalidArgument) as refused:
                gate.admit(method, metadata, time_remaining=None)
            assert "deadline is required" in refused.value.message
            assert [(v.field, v.reason) for v in refused.value.violations] == [("grpc-timeout", "REQUIRED")]
        else:
            assert gate.admit(method, metadata, time_remaining=None) is not None


def test_ingest_is_the_service_whose_calls_need_a_deadline_and_all_of_them_do() -> None:
    assert all(rule.require_deadline for rule in INGEST_POLICY.values())
    assert not any(
        rule.require_deadline
        for name, policy in POLICIES.items()
        if name != "ingest"
        for rule in policy.values()
    )


def test_insecure_mode_still_requires_the_deadline() -> None:
    gate = Gate(None, INGEST_POLICY)
    method = next(iter(INGEST_POLICY))
    with pytest.raises(InvalidArgument):
        gate.admit(method, {}, time_remaining=None)
    assert gate.admit(method, {}, time_remaining=5.0) is None
