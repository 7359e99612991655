"""The verified-token cache: a token's signature is checked once, and the cache never
accepts a token the full check would refuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.errors import Unauthenticated
from kit.principal import Principal, Role
from kit.tokens import TokenVerifier, issue_token

ISSUER, AUDIENCE = "https://idp.city.example", "egret"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def verifier(tmp_path: Path) -> TokenVerifier:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return TokenVerifier.from_files(issuer=ISSUER, audience=AUDIENCE, public_key_file=pem)


def token(subject: str = "reviewer-1", key: rsa.RSAPrivateKey = KEY) -> str:
    return issue_token(key, issuer=ISSUER, audience=AUDIENCE, subject=subject, role=Role.REVIEWER)


def test_a_token_is_checked_once_then_served_from_the_cache(
    verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: object, **kwargs: object) -> object:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting_decode)
    raw = token()
    first, second = verifier.verify(raw), verifier.verify(raw)
    assert first == second == Principal(id="reviewer-1", role=Role.REVIEWER)
    assert decodes == 1


def test_a_refused_token_is_refused_every_time(verifier: TokenVerifier) -> None:
    forged = token(key=OTHER_KEY)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="signature"):
            verifier.verify(forged)


def test_a_cached_token_is_checked_again_once_its_expiry_and_leeway_passed(
    verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    checks: list[str] = []
    clocked = dataclasses.replace(verifier, clock=lambda: now[0])

    def full_check(self: TokenVerifier, raw: str) -> tuple[Principal, float]:
        checks.append(raw)
        if now[0] >= 1100.0:
            raise Unauthenticated("token expired")
        return Principal(id="reviewer-1", role=Role.REVIEWER), 1100.0

    monkeypatch.setattr(TokenVerifier, "_verify", full_check)
    clocked.verify("t")
    now[0] = 1099.9
    clocked.verify("t")
    assert checks == ["t"]
    now[0] = 1100.0
    with pytest.raises(Unauthenticated, match="expired"):
        clocked.verify("t")
    assert checks == ["t", "t"]


def test_the_deadline_is_the_tokens_expiry_plus_the_leeway(verifier: TokenVerifier) -> None:
    raw = token()
    verifier.verify(raw)
    exp = jwt.decode(raw, options={"verify_signature": False})["exp"]
    assert verifier._verified[raw][1] == exp + verifier.leeway_s


def test_the_cache_holds_at_most_cache_size_tokens(verifier: TokenVerifier) -> None:
    small = dataclasses.replace(verifier, cache_size=2)
    raws = [token(f"reviewer-{i}") for i in range(3)]
    for raw in raws:
        small.verify(raw)
    assert list(small._verified) == raws[1:]
    assert small.verify(raws[0]).id == "reviewer-0"
