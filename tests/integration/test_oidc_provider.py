"""The local OpenID provider over real HTTP on loopback: the authorization code flow with PKCE
gives an ID token for the client and an access token the services accept as the signed-in
person, and every misuse the protocol forbids is refused with its OAuth error code."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import trustme
from authlib.integrations.starlette_client import OAuth
from cryptography.hazmat.primitives import serialization

from devtools.cluster import free_port
from devtools.localpki import LocalPki, create_local_pki
from devtools.oidc.app import s256
from devtools.oidc.config import SAMPLE_RESIDENT_ID, SAMPLE_USCC, Client
from devtools.oidc.tokens import at_hash, key_id
from devtools.oidc_provider import RunningProvider, command, running, verifier_env, wait_ready, write_jwks
from devtools.population import Population, PopulationConfig
from kit.env import Env
from kit.errors import Unauthenticated
from kit.principal import Principal, Role
from kit.pseudonym import Pseudonymiser
from kit.security import token_verifier
from kit.settings import SecuritySettings
from kit.tokens import TokenVerifier

CLIENT_ID, SECRET = "egret-portal", "portal-secret-for-tests"
CALLBACK = "http://127.0.0.1:8080/auth/callback"
SIGNED_OUT = "http://127.0.0.1:8080/signed-out"
CLIENT = Client(CLIENT_ID, SECRET, (CALLBACK,), (SIGNED_OUT,))
PSEUDONYMS = Pseudonymiser(b"s" * 32, "k1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return create_local_pki(tmp_path_factory.mktemp("oidc") / "pki")


@pytest.fixture(scope="module")
def provider(pki: LocalPki) -> Iterator[RunningProvider]:
    with running(pki.directory, [CLIENT]) as running_provider:
        yield running_provider


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A browser of one person: its own cookies, redirects looked at rather than followed."""
    with httpx.Client(timeout=10.0) as client:
        yield client


def service_verifier(pki: LocalPki, provider: RunningProvider, **env: str) -> TokenVerifier:
    """The verifier query builds: the local PKI's settings as devtools.cluster gives them,
    plus the provider as a further issuer (its JWKS file), through the services' own code."""
    jwks_file = write_jwks(pki.directory, pki.directory / "oidc-jwks.json")
    reader = Env({**pki.env("query"), **verifier_env(provider.issuer, jwks_file), **env})
    settings = SecuritySettings.read(reader)
    reader.check()
    verifier = token_verifier(settings, PSEUDONYMS)
    assert verifier is not None
    return verifier


def query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code in (302, 303), response.text
    location = response.headers["location"]
    assert location.startswith(CALLBACK)
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


@pytest.fixture
def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def authorize(
    http: httpx.Client, provider: RunningProvider, challenge: str | None, **changes: str | None
) -> httpx.Response:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": CALLBACK,
        "scope": "openid profile",
        "state": "state-1",
        "nonce": "nonce-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **changes,
    }
    return http.get(provider.url("/authorize"), params={k: v for k, v in params.items() if v is not None})


def sign_in(
    http: httpx.Client, provider: RunningProvider, challenge: str, account: str = "resident", **changes: str
) -> dict[str, str]:
    """Open the sign-in page, post the form as `account`; the callback's parameters."""
    page = authorize(http, provider, challenge, **changes)
    assert page.status_code == 200, page.text
    match = re.search(r'name="transaction" value="([^"]+)"', page.text)
    assert match is not None
    form = {"transaction": match.group(1), "account": account, "password": "egret", "action": "sign-in"}
    return query(http.post(provider.url("/authorize"), data=form))


def exchange(
    http: httpx.Client,
    provider: RunningProvider,
    code: str,
    verifier: str | None,
    *,
    secret: str = SECRET,
    post: bool = False,
    **changes: str,
) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, **changes}
    if verifier is not None:
        form["code_verifier"] = verifier
    if post:
        return http.post(
            provider.url("/token"), data={**form, "client_id": CLIENT_ID, "client_secret": secret}
        )
    return http.post(provider.url("/token"), data=form, auth=(CLIENT_ID, secret))


def refresh(http: httpx.Client, provider: RunningProvider, token: str, **extra: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": token, **extra}
    return http.post(provider.url("/token"), data=data, auth=(CLIENT_ID, SECRET))


def oauth_error(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    return str(response.json()["error"])


def test_the_discovery_document_names_the_endpoints_and_the_flow_it_supports(
    provider: RunningProvider,
) -> None:
    document = httpx.get(provider.discovery_url).json()
    assert document["issuer"] == provider.issuer
    assert provider.issuer.startswith("http://127.0.0.1:")
    for name, path in (
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("userinfo_endpoint", "/userinfo"),
        ("jwks_uri", "/jwks"),
        ("end_session_endpoint", "/logout"),
    ):
        assert document[name] == provider.url(path)
    assert document["response_types_supported"] == ["code"]
    assert document["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["token_endpoint_auth_methods_supported"] == ["client_secret_basic", "client_secret_post"]
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]
    assert document["subject_types_supported"] == ["public"]
    assert "openid" in document["scopes_supported"]
    assert {"sub", "role", "nonce"} <= set(document["claims_supported"])


def test_the_jwks_serves_the_local_pki_token_key_under_its_thumbprint(
    pki: LocalPki, provider: RunningProvider
) -> None:
    served = httpx.get(provider.url("/jwks")).json()
    (jwk,) = jwt.PyJWKSet.from_dict(served).keys
    assert jwk.key_id == key_id(jwk.key)
    pem = jwk.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pem == pki.jwt_public_key_file.read_bytes()
    # The file the services read holds the same document.
    assert json.loads(write_jwks(pki.directory, pki.directory / "served.json").read_text()) == served


@pytest.mark.parametrize(
    ("account", "role", "expected_key"),
    [
        ("resident", Role.SUBJECT, PSEUDONYMS.subject_key("person", "resident-id", SAMPLE_RESIDENT_ID)),
        ("business", Role.SUBJECT, PSEUDONYMS.subject_key("organization", "uscc", SAMPLE_USCC)),
        ("reviewer", Role.REVIEWER, None),
        ("auditor", Role.AUDITOR, None),
        ("admin", Role.ADMIN, None),
        ("metro", Role.BENEFIT_PROVIDER, None),
    ],
)
def test_a_sign_in_gives_an_id_token_with_the_nonce_and_an_access_token_the_services_accept(
    pki: LocalPki,
    provider: RunningProvider,
    http: httpx.Client,
    pkce: tuple[str, str],
    account: str,
    role: Role,
    expected_key: str | None,
) -> None:
    verifier, challenge = pkce
    callback = sign_in(http, provider, challenge, account)
    assert callback["state"] == "state-1"
    assert callback["iss"] == provider.issuer  # RFC 9207: the client can tell which provider answered
    response = exchange(http, provider, callback["code"], verifier, post=account == "business")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    tokens = response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "openid profile"

    keys = jwt.PyJWKSet.from_dict(httpx.get(provider.url("/jwks")).json())
    header = jwt.get_unverified_header(tokens["id_token"])
    id_token = jwt.decode(
        tokens["id_token"],
        keys[header["kid"]].key,
        algorithms=["RS256"],
        audience=CLIENT_ID,
        issuer=provider.issuer,
    )
    assert id_token["nonce"] == "nonce-1"
    assert id_token["at_hash"] == at_hash(tokens["access_token"])
    assert id_token["preferred_username"] == account
    assert id_token["role"] == role.value

    principal: Principal = service_verifier(pki, provider).verify(tokens["access_token"])
    assert principal.role is role
    if expected_key is not None:
        assert principal.subject_key == principal.id == expected_key
    else:
        assert principal.id == id_token["sub"]
    access = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert access["aud"] == "egret"
    assert access["exp"] - access["iat"] == tokens["expires_in"] == 900
    # The ID token is for the client only: a service refuses it.
    with pytest.raises(Unauthenticated, match="another audience"):
        service_verifier(pki, provider).verify(tokens["id_token"])


async def test_authlib_the_portals_client_completes_the_flow_and_accepts_the_id_token(
    provider: RunningProvider,
) -> None:
    oauth = OAuth()
    oauth.register(
        name="egret",
        client_id=CLIENT_ID,
        client_secret=SECRET,
        server_metadata_url=provider.discovery_url,
        client_kwargs={"scope": "openid profile", "code_challenge_method": "S256"},
    )
    client: Any = oauth.create_client("egret")
    started = await client.create_authorization_url(redirect_uri=CALLBACK)
    async with httpx.AsyncClient(timeout=10.0) as browser:
        page = await browser.get(started["url"])
        match = re.search(r'name="transaction" value="([^"]+)"', page.text)
        assert match is not None
        form = {"transaction": match.group(1), "account": "resident", "password": "egret"}
        callback = query(await browser.post(provider.url("/authorize"), data=form))
        assert callback["state"] == started["state"]
        token = await client.fetch_access_token(
            redirect_uri=CALLBACK, code=callback["code"], code_verifier=started["code_verifier"]
        )
        # Signature by the JWKS, issuer, audience, expiry, nonce and at_hash, as authlib checks them.
        identity = await client.parse_id_token(token, nonce=started["nonce"])
        assert identity["sub"] == f"person:resident-id:{SAMPLE_RESIDENT_ID}"
        assert identity["name"] == "Chen Jing, resident"
        logout = await client.create_logout_url(
            post_logout_redirect_uri=SIGNED_OUT, id_token_hint=token["id_token"], client_id=CLIENT_ID
        )
        signed_out = await browser.get(logout["url"])
    assert signed_out.status_code == 302
    assert signed_out.headers["location"] == f"{SIGNED_OUT}?state={logout['state']}"


def test_the_services_still_accept_the_local_pki_tokens_beside_the_providers(
    pki: LocalPki, provider: RunningProvider
) -> None:
    verifier = service_verifier(pki, provider)
    assert verifier.verify(pki.service_token("rules")).role is Role.SERVICE
    assert verifier.verify(pki.token("library", Role.DEPARTMENT)).id == "library"


def test_userinfo_names_the_person_the_access_token_was_issued_for(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    tokens = exchange(http, provider, sign_in(http, provider, challenge, "reviewer")["code"], verifier).json()
    info = http.get(provider.url("/userinfo"), headers={"authorization": f"Bearer {tokens['access_token']}"})
    assert info.status_code == 200
    assert info.json() == {
        "sub": "reviewer-wang",
        "role": "reviewer",
        "name": "Wang Fang, credit office reviewer",
        "preferred_username": "reviewer",
    }
    refused = http.get(provider.url("/userinfo"), headers={"authorization": f"Bearer {tokens['id_token']}"})
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]


def test_a_wrong_code_verifier_is_refused_and_spends_the_code(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    code = sign_in(http, provider, challenge)["code"]
    assert oauth_error(exchange(http, provider, code, secrets.token_urlsafe(48))) == "invalid_grant"
    assert oauth_error(exchange(http, provider, code, verifier)) == "invalid_grant"


def test_a_missing_or_malformed_code_verifier_is_an_invalid_request(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    code = sign_in(http, provider, challenge)["code"]
    assert oauth_error(exchange(http, provider, code, None)) == "invalid_request"
    assert oauth_error(exchange(http, provider, code, "short")) == "invalid_request"
    # Neither spent the code: the client that holds the verifier still can.
    assert exchange(http, provider, code, verifier).status_code == 200


def test_a_reused_code_is_refused_and_revokes_what_it_obtained(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    code = sign_in(http, provider, challenge)["code"]
    first = exchange(http, provider, code, verifier)
    assert first.status_code == 200
    assert oauth_error(exchange(http, provider, code, verifier)) == "invalid_grant"
    assert oauth_error(refresh(http, provider, first.json()["refresh_token"])) == "invalid_grant"


def test_a_redirect_uri_not_registered_gets_no_redirect_and_a_different_one_no_tokens(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    page = authorize(http, provider, challenge, redirect_uri="https://attacker.example/callback")
    assert page.status_code == 400
    assert "location" not in page.headers
    assert "not registered" in page.text
    unknown = authorize(http, provider, challenge, client_id="someone-else")
    assert unknown.status_code == 400
    assert "location" not in unknown.headers
    code = sign_in(http, provider, challenge)["code"]
    assert (
        oauth_error(exchange(http, provider, code, verifier, redirect_uri=CALLBACK + "?x=1"))
        == "invalid_grant"
    )


@pytest.mark.parametrize("post", [False, True])
def test_a_wrong_client_secret_is_refused_as_an_invalid_client(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str], post: bool
) -> None:
    verifier, challenge = pkce
    code = sign_in(http, provider, challenge)["code"]
    response = exchange(http, provider, code, verifier, secret="not-the-secret", post=post)
    assert oauth_error(response, 401) == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")
    anonymous = http.post(
        provider.url("/token"),
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": CLIENT_ID,
            "code_verifier": verifier,
        },
    )
    assert oauth_error(anonymous, 401) == "invalid_client"
    # The code was never reached: the real client still redeems it.
    assert exchange(http, provider, code, verifier).status_code == 200


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "profile"}, "invalid_scope"),
        ({"request": "eyJ..."}, "request_not_supported"),
    ],
)
def test_a_bad_authorization_request_goes_back_to_the_client_with_its_error(
    provider: RunningProvider,
    http: httpx.Client,
    pkce: tuple[str, str],
    changes: dict[str, str | None],
    error: str,
) -> None:
    callback = query(authorize(http, provider, pkce[1], **changes))
    assert callback["error"] == error
    assert callback["state"] == "state-1"
    assert "code" not in callback


def test_the_token_endpoint_names_an_unsupported_grant(provider: RunningProvider, http: httpx.Client) -> None:
    response = http.post(provider.url("/token"), data={"grant_type": "password"}, auth=(CLIENT_ID, SECRET))
    assert oauth_error(response) == "unsupported_grant_type"


def test_a_wrong_password_shows_the_form_again_with_the_error_and_cancel_returns_access_denied(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    page = authorize(http, provider, pkce[1])
    match = re.search(r'name="transaction" value="([^"]+)"', page.text)
    assert match is not None
    transaction = match.group(1)
    wrong = http.post(
        provider.url("/authorize"),
        data={"transaction": transaction, "account": "admin", "password": "guess", "action": "sign-in"},
    )
    assert wrong.status_code == 400
    assert "location" not in wrong.headers
    assert "There is a problem" in wrong.text
    assert '<a href="#password">The password is not right for this account</a>' in wrong.text
    cancelled = http.post(provider.url("/authorize"), data={"transaction": transaction, "action": "cancel"})
    assert query(cancelled)["error"] == "access_denied"
    # The page's transaction is spent.
    again = http.post(
        provider.url("/authorize"),
        data={"transaction": transaction, "account": "admin", "password": "egret", "action": "sign-in"},
    )
    assert again.status_code == 400
    assert "expired" in again.text


def test_a_session_signs_in_again_without_the_form_until_sign_out(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    tokens = exchange(http, provider, sign_in(http, provider, challenge, "auditor")["code"], verifier).json()
    again = query(authorize(http, provider, challenge, prompt="none", state="state-2"))
    assert again["state"] == "state-2"
    assert "code" in again
    logout = http.get(
        provider.url("/logout"),
        params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": SIGNED_OUT, "state": "bye"},
    )
    assert logout.status_code == 302
    assert logout.headers["location"] == f"{SIGNED_OUT}?state=bye"
    assert query(authorize(http, provider, challenge, prompt="none"))["error"] == "login_required"
    # Signing out ended what the session obtained.
    assert oauth_error(refresh(http, provider, tokens["refresh_token"])) == "invalid_grant"


def test_sign_out_returns_only_to_a_registered_address(
    provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    tokens = exchange(http, provider, sign_in(http, provider, challenge)["code"], verifier).json()
    refused = http.get(
        provider.url("/logout"),
        params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": "https://attacker.example/"},
    )
    assert refused.status_code == 400
    assert "location" not in refused.headers
    forged = http.get(provider.url("/logout"), params={"id_token_hint": tokens["access_token"]})
    assert forged.status_code == 400


def test_a_refresh_token_rotates_and_a_replayed_one_revokes_its_family(
    pki: LocalPki, provider: RunningProvider, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    first = exchange(http, provider, sign_in(http, provider, challenge)["code"], verifier).json()
    wider = refresh(http, provider, first["refresh_token"], scope="openid admin")
    assert oauth_error(wider) == "invalid_scope"
    second = refresh(http, provider, first["refresh_token"]).json()
    assert "id_token" not in second
    assert second["refresh_token"] != first["refresh_token"]
    assert service_verifier(pki, provider).verify(second["access_token"]).role is Role.SUBJECT
    assert oauth_error(refresh(http, provider, first["refresh_token"])) == "invalid_grant"
    assert oauth_error(refresh(http, provider, second["refresh_token"])) == "invalid_grant"


def test_claims_under_other_names_reach_the_services_through_their_claim_mapping(
    pki: LocalPki, http: httpx.Client, pkce: tuple[str, str]
) -> None:
    verifier, challenge = pkce
    with running(pki.directory, [CLIENT], role_claim="egret_role", subject_claim="egret_subject") as custom:
        tokens = exchange(http, custom, sign_in(http, custom, challenge, "business")["code"], verifier).json()
        claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
        assert (claims["sub"], claims["egret_role"]) == ("business", "subject")
        assert "role" not in claims
        plain = service_verifier(pki, custom)
        with pytest.raises(Unauthenticated, match="no valid role"):
            plain.verify(tokens["access_token"])
        mapped = service_verifier(
            pki,
            custom,
            EGRET_JWT_LOCALOIDC_ROLE_CLAIM="egret_role",
            EGRET_JWT_LOCALOIDC_SUBJECT_CLAIM="egret_subject",
        )
        principal = mapped.verify(tokens["access_token"])
        assert principal.subject_key == PSEUDONYMS.subject_key("organization", "uscc", SAMPLE_USCC)


def test_the_sample_subjects_are_subjects_of_the_demo_population() -> None:
    population = Population(PopulationConfig(subjects=10_000, seed=1))
    assert (population.subject(72).id_scheme, population.subject(72).id_value) == (
        "resident-id",
        SAMPLE_RESIDENT_ID,
    )
    assert (population.subject(159).id_scheme, population.subject(159).id_value) == ("uscc", SAMPLE_USCC)


def test_the_provider_serves_https_with_a_given_certificate(
    pki: LocalPki, tmp_path: Path, http: httpx.Client
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    with running(pki.directory, [CLIENT], tls=(cert, key)) as secure:
        assert secure.issuer.startswith("https://127.0.0.1:")
        wait_ready(secure.issuer, ca_file=ca_file, timeout_s=5.0)


def test_the_command_line_serves_the_provider_as_a_process(pki: LocalPki, tmp_path: Path) -> None:
    secret_file = tmp_path / "client.secret"
    secret_file.write_text(SECRET + "\n")
    port = free_port()
    argv = command(
        port=port,
        pki_dir=pki.directory,
        client_id=CLIENT_ID,
        client_secret_file=secret_file,
        redirect_uris=[CALLBACK],
        post_logout_redirect_uris=[SIGNED_OUT],
        python=sys.executable,
        extra=["--write-jwks", str(tmp_path / "jwks.json"), "--log-level", "warning"],
    )
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        issuer = f"http://127.0.0.1:{port}"
        wait_ready(issuer)
        document: dict[str, Any] = httpx.get(f"{issuer}/.well-known/openid-configuration").json()
        assert document["token_endpoint"] == f"{issuer}/token"
        served = httpx.get(document["jwks_uri"]).json()
        assert json.loads((tmp_path / "jwks.json").read_text()) == served
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert f"local OpenID provider {issuer}".encode() in output
    # A clean shutdown: uvicorn stops serving, then re-raises the SIGTERM it caught.
    assert process.returncode in (0, -signal.SIGTERM)
