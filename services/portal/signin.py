"""Sign-in by OpenID Connect with authlib's Starlette client: authorization code flow with
PKCE (S256), state and nonce; the provider's endpoints and keys come from its discovery
document (issuer + /.well-known/openid-configuration), read at first use.

After the code exchange authlib checks the ID token (signature by the provider's JWKS,
issuer, audience, expiry, nonce). The session keeps the access token (what the portal
sends to the services), the ID token (for RP-initiated logout), the token's expiry, the
role the access token names and a display name; never in a log line or a span.

Which role and subject the access token names is read from its claims as the services
read them (`EGRET_PORTAL_ROLE_CLAIM`, `EGRET_PORTAL_SUBJECT_CLAIM`, default `role` and
`sub` = `<kind>:<scheme>:<value>`). The token's signature is not checked here: it came
straight from the provider's token endpoint over TLS, and every service verifies it on
every call, so a token the portal misread can only be refused, never widen access.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import jwt
from authlib.integrations.starlette_client import OAuth, OAuthError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kit.logging import get_logger
from kit.rate_limit import RateLimiter
from kit.vocabulary import SUBJECT_KINDS
from services.portal.backend import Caller, SubjectId
from services.portal.settings import OidcSettings

log = get_logger(__name__)

# Session keys.
ACCESS_TOKEN = "access_token"  # noqa: S105 - a session key, not a secret
ID_TOKEN = "id_token"  # noqa: S105 - a session key, not a secret
EXPIRES_AT = "expires_at"
ROLE = "role"
NAME = "name"
NEXT = "next"
SUBJECT_ROLE = "subject"


def safe_next(value: str | None) -> str:
    """A local path to return to after sign-in; anything else (another site) becomes /credit."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/credit"
    return value


def claims_of(access_token: str) -> Mapping[str, Any]:
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims if isinstance(claims, dict) else {}


def subject_of(claims: Mapping[str, Any], claim: str) -> SubjectId | None:
    """The subject a subject token names (`<kind>:<scheme>:<value>`), or None."""
    value = str(claims.get(claim, ""))
    kind, _, rest = value.partition(":")
    scheme, _, raw = rest.partition(":")
    if kind not in SUBJECT_KINDS or not scheme or not raw:
        return None
    return SubjectId(kind, scheme, raw)


@dataclass(frozen=True)
class SignedIn:
    """Who the session belongs to, from its access token."""

    role: str
    caller: Caller | None  # None unless the role is subject
    name: str


class SignIn:
    def __init__(
        self,
        settings: OidcSettings,
        *,
        redirect_uri: str,
        post_logout_uri: str,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._redirect_uri = redirect_uri
        self._post_logout_uri = post_logout_uri
        self._limiter = limiter
        self._clock = clock
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self._oauth = OAuth()
        self._oauth.register(
            name="egret",
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            server_metadata_url=f"{settings.issuer}/.well-known/openid-configuration",
            client_kwargs={
                "scope": settings.scope,
                "code_challenge_method": "S256",
                "verify": verify,
                "timeout": 10.0,
            },
        )
        self._client: Any = self._oauth.create_client("egret")

    def limited(self, request: Request) -> bool:
        """True when this client address has started too many sign-ins lately."""
        address = request.client.host if request.client else "unknown"
        return self._limiter.acquire(f"signin:{address}") > 0

    async def start(self, request: Request, next_path: str | None) -> Response:
        """Send the browser to the provider's authorization endpoint."""
        session = request.session
        _end(session)
        session[NEXT] = safe_next(next_path)
        response: Response = await self._client.authorize_redirect(request, self._redirect_uri)
        return response

    async def finish(self, request: Request) -> str:
        """Exchange the code (state, PKCE verifier and nonce checked by authlib); store the
        tokens in the session; return where to go next. Raises OAuthError on any failure."""
        token = await self._client.authorize_access_token(request)
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise OAuthError(error="no_access_token", description="the provider returned no access token")
        claims = claims_of(access)
        userinfo = token.get("userinfo") or {}
        session = request.session
        next_path = safe_next(session.get(NEXT))
        _end(session)
        expires_at = token.get("expires_at") or claims.get("exp") or self._clock() + 300
        session.update(
            {
                ACCESS_TOKEN: access,
                ID_TOKEN: token.get("id_token", ""),
                EXPIRES_AT: float(expires_at),
                ROLE: str(claims.get(self._settings.role_claim, "")),
                NAME: str(userinfo.get("name") or userinfo.get("preferred_username") or ""),
            }
        )
        log.info("signed in", role=session[ROLE])
        return next_path

    def signed_in(self, session: Mapping[str, Any]) -> SignedIn | None:
        """The session's person, or None when nobody is signed in or the token has expired."""
        access = session.get(ACCESS_TOKEN)
        if not isinstance(access, str) or not access:
            return None
        if float(session.get(EXPIRES_AT, 0)) <= self._clock():
            return None
        role = str(session.get(ROLE, ""))
        caller = None
        if role == SUBJECT_ROLE:
            subject = subject_of(claims_of(access), self._settings.subject_claim)
            if subject is not None:
                caller = Caller(access, subject)
        return SignedIn(role, caller, str(session.get(NAME, "")))

    async def sign_out(self, request: Request) -> Response:
        """End the session here, then at the provider when it supports RP-initiated logout."""
        session = request.session
        id_token = session.get(ID_TOKEN) or None
        was_signed_in = bool(session.get(ACCESS_TOKEN))
        _end(session)
        session.clear()
        if was_signed_in:
            log.info("signed out")
        try:
            metadata = await self._client.load_server_metadata()
        except Exception as exc:
            log.warning("identity provider unreachable at sign-out", error=type(exc).__name__)
            return RedirectResponse(self._post_logout_uri, status_code=303)
        if not metadata.get("end_session_endpoint"):
            return RedirectResponse(self._post_logout_uri, status_code=303)
        result = await self._client.create_logout_url(
            post_logout_redirect_uri=self._post_logout_uri,
            id_token_hint=id_token,
            client_id=self._settings.client_id,
        )
        return RedirectResponse(result["url"], status_code=303)


def _end(session: MutableMapping[str, Any]) -> None:
    """Forget everything of a sign-in, keeping nothing but a pending flow's state."""
    for key in (ACCESS_TOKEN, ID_TOKEN, EXPIRES_AT, ROLE, NAME, NEXT, "csrf", "flash"):
        session.pop(key, None)


__all__ = ["OAuthError", "SignIn", "SignedIn", "safe_next"]
