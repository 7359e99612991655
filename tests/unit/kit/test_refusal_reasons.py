"""Refusals carry a machine-readable reason (google.rpc.ErrorInfo, domain egret.city) and
subject tokens carry every generation of their key, so a subject can name itself."""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2

from kit import reasons
from kit.errors import AlreadyExists, FailedPrecondition
from kit.interceptors import status_of
from kit.principal import SCOPE_PUBLIC_READ, SERVICE_SCOPES, Role
from kit.pseudonym import KeyLink, Pseudonymiser
from kit.tokens import TokenVerifier, issue_token

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _info(error: FailedPrecondition | AlreadyExists) -> error_details_pb2.ErrorInfo | None:
    _, status = status_of(error)
    info = error_details_pb2.ErrorInfo()
    return info if any(item.Unpack(info) for item in status.details) else None


def test_a_failed_precondition_with_a_reason_carries_it_and_its_metadata_in_error_info() -> None:
    error = FailedPrecondition(
        "a repair may be applied for from 2026-05-01",
        reasons.REPAIR_TOO_EARLY,
        {"earliest_date": "2026-05-01"},
    )
    code, status = status_of(error)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert status.message == "a repair may be applied for from 2026-05-01"
    info = _info(error)
    assert info is not None
    assert (info.domain, info.reason, dict(info.metadata)) == (
        "egret.city",
        "REPAIR_TOO_EARLY",
        {"earliest_date": "2026-05-01"},
    )


def test_a_refusal_without_a_reason_has_no_error_info_and_every_reason_is_one_domain() -> None:
    assert _info(FailedPrecondition("no rule set is active")) is None
    conflict = _info(AlreadyExists("event id reused", reason="EVENT_ID_CONFLICT"))
    assert conflict is not None
    assert conflict.domain == "egret.city"
    assert len(set(reasons.ALL)) == len(reasons.ALL)
    assert all(r.isupper() and " " not in r for r in reasons.ALL)


def test_the_portal_service_token_holds_the_public_read_scope_only() -> None:
    assert set(SERVICE_SCOPES["portal"]) == {SCOPE_PUBLIC_READ}
    assert all(SCOPE_PUBLIC_READ not in scopes for name, scopes in SERVICE_SCOPES.items() if name != "portal")


def test_a_subject_token_carries_every_generation_of_its_key(tmp_path: Path) -> None:
    chain = Pseudonymiser(b"k" * 32, "k1", (KeyLink("k2", b"s" * 32),))
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verifier = TokenVerifier.from_files(
        issuer="https://idp",
        audience="egret",
        public_key_file=pem,
        subject_key_of=chain.subject_key,
        generation_keys_of=chain.generation_keys,
    )
    token = issue_token(
        KEY,
        issuer="https://idp",
        audience="egret",
        subject="person:resident-id:350200199001011230",
        role=Role.SUBJECT,
    )
    principal = verifier.verify(token)
    generations = chain.generation_keys("person", "resident-id", "350200199001011230")
    assert principal.generation_keys == generations
    assert principal.subject_key == principal.id == generations[-1][1]
    assert "350200199001011230" not in repr(principal)
    assert generations[0][1] not in repr(principal)
