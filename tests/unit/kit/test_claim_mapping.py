"""Claim mapping and further trusted issuers: an identity provider's tokens name Egret's role
and subject through documented settings, and each issuer is checked with its own keys."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kit.claims import ClaimMapping
from kit.env import Env, SettingsError
from kit.errors import Unauthenticated
from kit.principal import Role
from kit.pseudonym import Pseudonymiser
from kit.security import token_verifier
from kit.settings import SecuritySettings
from kit.tokens import TokenVerifier, TrustedIssuer, jwks_document

SERVICES_ISSUER, CITY_ISSUER = "https://workload.egret.example", "https://login.city.example"
SERVICES_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CITY_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PSEUDONYMS = Pseudonymiser(b"k" * 32, "k1")
RESIDENT = "person:resident-id:350200199001011230"


def sign(claims: dict[str, Any], key: rsa.RSAPrivateKey = CITY_KEY, kid: str | None = "city-1") -> str:
    now = int(time.time())
    full = {"iss": CITY_ISSUER, "aud": "egret", "iat": now, "exp": now + 300, "sub": "7f3c-uuid", **claims}
    return jwt.encode(full, key, algorithm="RS256", headers={"kid": kid} if kid else None)


def city_verifier(mapping: ClaimMapping) -> TokenVerifier:
    return TokenVerifier(
        {"city-1": CITY_KEY.public_key()},
        CITY_ISSUER,
        "egret",
        subject_key_of=PSEUDONYMS.subject_key,
        claims=mapping,
    )


def test_by_default_role_and_subject_come_from_role_and_sub() -> None:
    verifier = city_verifier(ClaimMapping())
    principal = verifier.verify(sign({"sub": RESIDENT, "role": "subject"}))
    assert principal.role is Role.SUBJECT
    assert principal.subject_key == PSEUDONYMS.subject_key("person", "resident-id", "350200199001011230")
    assert verifier.verify(sign({"role": "reviewer"})).id == "7f3c-uuid"


def test_a_subject_is_read_from_the_subject_claim_and_staff_stay_named_by_sub() -> None:
    verifier = city_verifier(ClaimMapping(role_claim="egret_role", subject_claim="egret_subject"))
    principal = verifier.verify(sign({"egret_role": "subject", "egret_subject": RESIDENT}))
    assert principal.subject_key == PSEUDONYMS.subject_key("person", "resident-id", "350200199001011230")
    # A staff member's principal is the provider's stable `sub`, whatever else the token says.
    reviewer = verifier.verify(sign({"egret_role": "reviewer", "egret_subject": "ignored"}))
    assert (reviewer.id, reviewer.role) == ("7f3c-uuid", Role.REVIEWER)
    # The default claims grant nothing once others are configured.
    with pytest.raises(Unauthenticated, match="no valid role"):
        verifier.verify(sign({"role": "admin"}))


def test_a_subject_token_without_the_subject_claim_is_refused() -> None:
    verifier = city_verifier(ClaimMapping(subject_claim="egret_subject"))
    with pytest.raises(Unauthenticated, match="does not name a subject"):
        verifier.verify(sign({"role": "subject", "sub": RESIDENT}))
    with pytest.raises(Unauthenticated, match="does not name a subject"):
        verifier.verify(sign({"role": "subject", "egret_subject": ["person", "resident-id"]}))
    with pytest.raises(Unauthenticated, match="does not name a valid subject"):
        verifier.verify(sign({"role": "subject", "egret_subject": "person:resident-id:350200199001011231"}))


def test_a_namespaced_claim_is_read_as_written_and_a_dotted_one_walks_nested_objects() -> None:
    namespaced = city_verifier(ClaimMapping(role_claim="https://egret.city.example/role"))
    assert namespaced.verify(sign({"https://egret.city.example/role": "auditor"})).role is Role.AUDITOR
    nested = city_verifier(
        ClaimMapping(role_claim="realm_access.roles", role_map={"egret-auditor": Role.AUDITOR})
    )
    token = sign({"realm_access": {"roles": ["offline_access", "egret-auditor", "uma_authorization"]}})
    assert nested.verify(token).role is Role.AUDITOR
    with pytest.raises(Unauthenticated, match="no valid role"):
        nested.verify(sign({"realm_access": "egret-auditor.roles"}))


def test_a_role_map_translates_the_providers_values_and_is_the_complete_list() -> None:
    verifier = city_verifier(
        ClaimMapping(role_map={"resident": Role.SUBJECT, "credit-office": Role.REVIEWER})
    )
    assert verifier.verify(sign({"role": "credit-office"})).role is Role.REVIEWER
    assert verifier.verify(sign({"role": "resident", "sub": RESIDENT})).role is Role.SUBJECT
    # Spelled like an Egret role, but not mapped: the provider never meant to grant it.
    with pytest.raises(Unauthenticated, match="no valid role"):
        verifier.verify(sign({"role": "admin"}))


def test_a_token_naming_two_roles_is_refused_rather_than_guessed() -> None:
    verifier = city_verifier(ClaimMapping(role_claim="roles"))
    assert verifier.verify(sign({"roles": ["reviewer", "not-egret"]})).role is Role.REVIEWER
    with pytest.raises(Unauthenticated, match="more than one role"):
        verifier.verify(sign({"roles": ["reviewer", "admin"]}))


@pytest.fixture
def two_issuers() -> TokenVerifier:
    """Services' tokens from a workload issuer (defaults), people's from the city (mapped)."""
    city = TrustedIssuer(
        CITY_ISSUER,
        {"city-1": CITY_KEY.public_key()},
        ClaimMapping(role_claim="egret_role", role_map={"resident": Role.SUBJECT, "staff": Role.REVIEWER}),
    )
    return TokenVerifier(
        {None: SERVICES_KEY.public_key()},
        SERVICES_ISSUER,
        "egret",
        subject_key_of=PSEUDONYMS.subject_key,
        more_issuers=(city,),
    )


def test_each_trusted_issuer_is_verified_with_its_own_mapping(two_issuers: TokenVerifier) -> None:
    service = sign(
        {"iss": SERVICES_ISSUER, "sub": "egret-rules", "role": "service", "scope": "egret.score.apply"},
        SERVICES_KEY,
        kid=None,
    )
    principal = two_issuers.verify(service)
    assert (principal.id, principal.role, principal.scopes) == (
        "egret-rules",
        Role.SERVICE,
        frozenset({"egret.score.apply"}),
    )
    assert two_issuers.verify(sign({"egret_role": "staff"})).role is Role.REVIEWER
    assert two_issuers.verify(sign({"egret_role": "resident", "sub": RESIDENT})).role is Role.SUBJECT
    # The city's mapping is the city's: its `role` claim means nothing there, ...
    with pytest.raises(Unauthenticated, match="no valid role"):
        two_issuers.verify(sign({"role": "service"}))
    # ... and the services' issuer does not read `egret_role`.
    with pytest.raises(Unauthenticated, match="no valid role"):
        two_issuers.verify(sign({"iss": SERVICES_ISSUER, "egret_role": "staff"}, SERVICES_KEY, kid=None))


def test_a_token_is_checked_against_the_keys_of_the_issuer_it_names_only(two_issuers: TokenVerifier) -> None:
    # The city's key cannot vouch for the services' issuer, nor the other way round.
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        two_issuers.verify(sign({"iss": SERVICES_ISSUER, "role": "admin"}, CITY_KEY, kid=None))
    with pytest.raises(Unauthenticated, match="unknown key"):
        two_issuers.verify(sign({"egret_role": "staff"}, SERVICES_KEY, kid="services-1"))
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        two_issuers.verify(sign({"egret_role": "staff"}, SERVICES_KEY, kid="city-1"))
    with pytest.raises(Unauthenticated, match="unknown issuer"):
        two_issuers.verify(
            sign({"iss": "https://elsewhere.example", "role": "admin"}, SERVICES_KEY, kid=None)
        )


def pem(tmp_path: Path, name: str, key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / name
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def security(tmp_path: Path, **env: str) -> SecuritySettings:
    base = {
        "EGRET_JWT_ISSUER": SERVICES_ISSUER,
        "EGRET_JWT_PUBLIC_KEY_FILE": str(pem(tmp_path, "services.pem", SERVICES_KEY)),
    }
    reader = Env({**base, **env})
    settings = SecuritySettings.read(reader)
    reader.check()
    return settings


def test_without_mapping_settings_a_service_reads_role_and_sub_as_before(tmp_path: Path) -> None:
    settings = security(tmp_path)
    assert (settings.jwt_role_claim, settings.jwt_subject_claim, settings.jwt_role_map) == ("role", "sub", ())
    assert settings.jwt_extra_issuers == ()
    verifier = token_verifier(settings, PSEUDONYMS)
    assert verifier is not None
    assert verifier.more_issuers == ()
    assert (
        verifier.verify(sign({"iss": SERVICES_ISSUER, "role": "admin"}, SERVICES_KEY, kid=None)).role
        is Role.ADMIN
    )


def test_the_settings_build_a_verifier_trusting_a_further_issuer_with_its_mapping(tmp_path: Path) -> None:
    jwks = tmp_path / "city-jwks.json"
    jwks.write_text(jwks_document({"city-1": CITY_KEY.public_key()}))
    settings = security(
        tmp_path,
        EGRET_JWT_ROLE_CLAIM="egret_role",
        EGRET_JWT_EXTRA_ISSUERS="city",
        EGRET_JWT_CITY_ISSUER=CITY_ISSUER,
        EGRET_JWT_CITY_JWKS_FILE=str(jwks),
        EGRET_JWT_CITY_SUBJECT_CLAIM="egret_subject",
        EGRET_JWT_CITY_ROLE_MAP="resident = subject, credit-office=reviewer",
    )
    assert settings.jwt_role_claim == "egret_role"
    (city,) = settings.jwt_extra_issuers
    assert (city.name, city.issuer, city.jwks_file, city.role_map) == (
        "CITY",
        CITY_ISSUER,
        jwks,
        (("resident", "subject"), ("credit-office", "reviewer")),
    )
    assert [m for m in settings.missing() if "JWT" in m] == []
    verifier = token_verifier(settings, PSEUDONYMS)
    assert verifier is not None
    person = verifier.verify(sign({"role": "resident", "egret_subject": RESIDENT}))
    assert person.subject_key == PSEUDONYMS.subject_key("person", "resident-id", "350200199001011230")
    assert verifier.verify(sign({"role": "credit-office"})).id == "7f3c-uuid"
    own = sign({"iss": SERVICES_ISSUER, "egret_role": "admin"}, SERVICES_KEY, kid=None)
    assert verifier.verify(own).role is Role.ADMIN


def test_bad_mapping_settings_are_all_listed_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        security(
            tmp_path,
            EGRET_JWT_ROLE_MAP="resident,staff=superuser,a=admin,a=auditor",
            EGRET_JWT_EXTRA_ISSUERS="city,city,bad-name",
            EGRET_JWT_CITY_ISSUER=SERVICES_ISSUER,
            EGRET_JWT_CITY_JWKS_FILE=str(tmp_path / "absent.json"),
        )
    problems = caught.value.problems
    assert "EGRET_JWT_ROLE_MAP: 'resident' is not ISSUER_VALUE=EGRET_ROLE" in problems
    assert any(p.startswith("EGRET_JWT_ROLE_MAP: 'superuser' is not a role") for p in problems)
    assert "EGRET_JWT_ROLE_MAP: 'a' is mapped twice" in problems
    assert "EGRET_JWT_EXTRA_ISSUERS: 'CITY' is listed twice" in problems
    assert any(p.startswith("EGRET_JWT_EXTRA_ISSUERS: 'BAD-NAME' is not a name") for p in problems)
    assert f"EGRET_JWT_CITY_JWKS_FILE={str(tmp_path / 'absent.json')!r}: no such file" in problems
    assert f"an issuer is trusted twice: {SERVICES_ISSUER}, {SERVICES_ISSUER}" in problems


def test_a_further_issuer_needs_its_issuer_and_keys_to_serve(tmp_path: Path) -> None:
    settings = security(tmp_path, EGRET_JWT_EXTRA_ISSUERS="CITY")
    assert [m for m in settings.missing() if "JWT" in m] == [
        "EGRET_JWT_CITY_ISSUER is required unless EGRET_INSECURE=true (never in production)",
        "EGRET_JWT_CITY_PUBLIC_KEY_FILE, EGRET_JWT_CITY_JWKS_FILE or EGRET_JWT_CITY_JWKS_URL is required "
        "unless EGRET_INSECURE=true (never in production)",
    ]
