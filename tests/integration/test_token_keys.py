"""kit.token_keys: verification keys follow their files and the identity provider's JWKS URL,
a failed fetch keeps the last good keys, and a verifier forgets tokens of a removed key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit import filewatch
from kit.env import Env
from kit.errors import Unauthenticated
from kit.principal import Role
from kit.settings import SecuritySettings
from kit.token_keys import RemoteJwks, check_jwks_url
from kit.tokens import TokenVerifier, issue_token, jwks_document
from tests.support.jwks import jwks_endpoint
from tests.support.logs import capture
from tests.support.waiting import wait_until

ISSUER = "https://idp.test"
AUDIENCE = "egret"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: rsa.RSAPrivateKey, kid: str | None = None) -> str:
    return issue_token(key, issuer=ISSUER, audience=AUDIENCE, subject="ops", role=Role.ADMIN, key_id=kid)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://idp.example/jwks", True),
        ("http://127.0.0.1:8080/jwks", True),
        ("http://localhost/jwks", True),
        ("http://idp.example/jwks", False),
        ("file:///etc/jwks.json", False),
        ("https:///no-host", False),
    ],
)
def test_a_jwks_url_is_https_except_to_this_host(url: str, allowed: bool) -> None:
    assert (check_jwks_url(url) is None) is allowed


def test_an_unknown_key_id_fetches_once_and_then_not_again_for_a_while() -> None:
    old, new = signing_key(), signing_key()
    with jwks_endpoint(jwks_document({"old": old.public_key()})) as endpoint:
        clock = Clock()
        keys = RemoteJwks(endpoint.url, lifespan_s=300, what="test", refetch_every_s=10, clock=clock)
        assert endpoint.fetches == 1
        assert keys.key("old") is not None
        assert endpoint.fetches == 1

        endpoint.document = jwks_document({"old": old.public_key(), "new": new.public_key()})
        assert keys.key("new") is not None
        assert endpoint.fetches == 2
        # Made-up key ids: no fetch until the refetch interval has passed.
        assert keys.key("made-up-1") is None
        assert keys.key("made-up-2") is None
        assert endpoint.fetches == 2
        clock.now = 10.0
        assert keys.key("made-up-3") is None
        assert endpoint.fetches == 3


def test_a_failed_fetch_keeps_the_last_good_keys() -> None:
    key = signing_key()
    with jwks_endpoint(jwks_document({"k1": key.public_key()})) as endpoint:
        clock = Clock()
        keys = RemoteJwks(endpoint.url, lifespan_s=60, what="test", clock=clock)
        endpoint.failing = True
        clock.now = 61.0
        generation = keys.generation()  # starts the refresh after the lifespan
        wait_until(lambda: endpoint.fetches == 2)
        wait_until(lambda: not keys._refreshing)
        assert keys.key("k1") is not None
        assert keys.generation() == generation


def test_the_jwks_is_fetched_again_after_its_lifespan() -> None:
    old, new = signing_key(), signing_key()
    with jwks_endpoint(jwks_document({"old": old.public_key()})) as endpoint:
        clock = Clock()
        keys = RemoteJwks(endpoint.url, lifespan_s=60, what="test", clock=clock)
        endpoint.document = jwks_document({"new": new.public_key()})
        clock.now = 59.0
        assert keys.key("old") is not None
        clock.now = 60.0
        keys.generation()
        wait_until(lambda: keys.generation() == 2)
        assert keys.key("new") is not None
        # The removed key is gone (and no fetch is due for it within the refetch interval).
        assert keys.key("old") is None


def test_a_removed_key_refuses_tokens_it_verified_before(tmp_path: Path) -> None:
    """The verifier's cache of verified tokens is emptied when the keys change."""
    old, new = signing_key(), signing_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(jwks_document({"old": old.public_key(), "new": new.public_key()}))
    verifier = TokenVerifier.from_files(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks)
    signed_by_old = token(old, "old")
    assert verifier.verify(signed_by_old).role is Role.ADMIN

    jwks.write_text(jwks_document({"new": new.public_key()}))
    wait_until(lambda: verifier.keys.generation() == 1)  # type: ignore[union-attr]
    with pytest.raises(Unauthenticated, match="unknown key"):
        verifier.verify(signed_by_old)
    assert verifier.verify(token(new, "new")).role is Role.ADMIN


def test_a_public_key_file_that_is_not_a_key_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = signing_key()
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verifier = TokenVerifier.from_files(issuer=ISSUER, audience=AUDIENCE, public_key_file=pem)
    pem.write_bytes(b"-----BEGIN PUBLIC KEY-----\ntruncated")
    signed = token(key)
    logs = capture(monkeypatch, filewatch)
    # Each verify looks at the file once the watch's interval has passed.
    wait_until(lambda: bool(verifier.verify(signed)) and any(line["log_level"] == "warning" for line in logs))
    assert verifier.verify(signed).role is Role.ADMIN
    assert verifier.keys.generation() == 0  # type: ignore[union-attr]


def test_settings_refuse_a_jwks_url_that_is_not_https() -> None:
    env = Env(
        {
            "EGRET_JWT_JWKS_URL": "http://idp.example/jwks",
            "EGRET_JWT_EXTRA_ISSUERS": "CITY",
            "EGRET_JWT_CITY_ISSUER": "https://sign-in.city.test",
            "EGRET_JWT_CITY_JWKS_URL": "https://sign-in.city.test/jwks",
        }
    )
    settings = SecuritySettings.read(env)
    assert env.problems == [
        "EGRET_JWT_JWKS_URL='http://idp.example/jwks' is not an https URL"
        " (http only to 127.0.0.1 or localhost)"
    ]
    assert settings.jwt_extra_issuers[0].jwks_url == "https://sign-in.city.test/jwks"
    assert settings.jwt_extra_issuers[0].missing() == []
