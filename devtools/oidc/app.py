"""The provider's HTTP endpoints: OpenID Connect Core 1.0 (authorization code flow only),
Discovery 1.0 and RP-Initiated Logout 1.0, over OAuth 2.0 (RFC 6749) with PKCE (RFC 7636,
S256 only, required of every client) and the `iss` authorization response parameter
(RFC 9207). Errors carry the protocol's error codes, so a client meets here what it meets
at a real provider.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import string
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import jwt
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from devtools.oidc.config import SCOPES, ProviderConfig
from devtools.oidc.pages import FieldError, message_page, sign_in_page
from devtools.oidc.store import AuthorizationRequest, Code, Pending, Session, Store
from devtools.oidc.tokens import ALGORITHM, Signed, Signer, jwks

SESSION_COOKIE = "egret_local_idp"
# A sign-in page refuses further tries after this many wrong answers.
MAX_SIGN_IN_ATTEMPTS = 5
_S256_CHALLENGE_LENGTH = 43
_BASE64URL = frozenset(string.ascii_letters + string.digits + "-_")
# RFC 7636 4.1: a verifier is 43 to 128 unreserved characters.
_VERIFIER_CHARACTERS = _BASE64URL | {".", "~"}
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def s256(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _with_query(uri: str, params: Mapping[str, str | None]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(name, value) for name, value in params.items() if value is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _text(form: FormData | Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value != "" else None


def _oauth_error(error: str, description: str, status: int = 400, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description}, status, headers={**_NO_STORE, **headers}
    )


def _invalid_client(description: str) -> JSONResponse:
    return _oauth_error(
        "invalid_client", description, 401, **{"WWW-Authenticate": 'Basic realm="egret-local"'}
    )


class Provider:
    def __init__(self, config: ProviderConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.signer = Signer(config)
        self.store = Store(config, clock)
        self._clock = clock

    def url(self, path: str) -> str:
        return self.config.issuer.rstrip("/") + path

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize, methods=["GET", "POST"]),
                Route("/token", self.token, methods=["POST"]),
                Route("/userinfo", self.userinfo, methods=["GET", "POST"]),
                Route("/logout", self.logout, methods=["GET", "POST"]),
            ]
        )

    # -- discovery and keys ------------------------------------------------------------

    async def discovery(self, request: Request) -> JSONResponse:
        config = self.config
        claims = {"iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "sid", "at_hash", "azp"}
        claims |= {"name", "preferred_username", config.role_claim, config.subject_claim}
        return JSONResponse(
            {
                "issuer": config.issuer,
                "authorization_endpoint": self.url("/authorize"),
                "token_endpoint": self.url("/token"),
                "userinfo_endpoint": self.url("/userinfo"),
                "jwks_uri": self.url("/jwks"),
                "end_session_endpoint": self.url("/logout"),
                "scopes_supported": list(SCOPES),
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": [ALGORITHM],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "code_challenge_methods_supported": ["S256"],
                "prompt_values_supported": ["none", "login"],
                "claims_supported": sorted(claims),
                "authorization_response_iss_parameter_supported": True,
                "request_parameter_supported": False,
                "request_uri_parameter_supported": False,
                "claims_parameter_supported": False,
            }
        )

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse(json.loads(jwks(self.config.signing_key.public_key())))

    # -- authorization endpoint --------------------------------------------------------

    async def authorize(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._sign_in(request)
        params = request.query_params
        repeated = sorted({name for name in params if len(params.getlist(name)) > 1})
        client = self.config.client(params.get("client_id"))
        redirect_uri = params.get("redirect_uri")
        # Until the client and its redirect URI are known good, nothing may be sent back there
        # (RFC 6749 4.1.2.1): an open redirector would hand codes and errors to anyone.
        if client is None or "client_id" in repeated:
            return message_page("Unknown client", "The service that sent you here is not registered.", 400)
        if redirect_uri is None or redirect_uri not in client.redirect_uris or "redirect_uri" in repeated:
            return message_page(
                "Unregistered redirect URI",
                f"The address {client.client_id} asked to return you to is not registered for it.",
                400,
            )
        state = params.get("state")

        def refuse(error: str, description: str) -> Response:
            return self._authorization_response(
                redirect_uri, {"error": error, "error_description": description}, state
            )

        if repeated:
            return refuse("invalid_request", f"parameter {repeated[0]} is repeated")
        if "request" in params:
            return refuse("request_not_supported", "request objects are not supported")
        if "request_uri" in params:
            return refuse("request_uri_not_supported", "request_uri is not supported")
        if params.get("response_type") != "code":
            return refuse(
                "unsupported_response_type", "only the authorization code flow (response_type=code)"
            )
        if params.get("response_mode", "query") != "query":
            return refuse("invalid_request", "only response_mode=query is supported")
        asked = set(params.get("scope", "").split())
        if "openid" not in asked:
            return refuse("invalid_scope", "scope must include openid")
        challenge = params.get("code_challenge")
        if not challenge:
            return refuse("invalid_request", "code_challenge is required (PKCE with S256)")
        if params.get("code_challenge_method") != "S256":
            return refuse("invalid_request", "code_challenge_method must be S256")
        if len(challenge) != _S256_CHALLENGE_LENGTH or not set(challenge) <= _BASE64URL:
            return refuse("invalid_request", "code_challenge is not the base64url of a SHA-256 digest")
        prompt = set(params.get("prompt", "").split())
        if "none" in prompt and len(prompt) > 1:
            return refuse("invalid_request", "prompt=none cannot be combined with other values")
        max_age = params.get("max_age")
        if max_age is not None and not max_age.isdigit():
            return refuse("invalid_request", "max_age must be a whole number of seconds")
        auth = AuthorizationRequest(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            # Scopes this provider does not know are left out of the grant (RFC 6749 3.3).
            scope=tuple(scope for scope in SCOPES if scope in asked),
            state=state,
            nonce=params.get("nonce"),
            code_challenge=challenge,
            login_hint=params.get("login_hint"),
        )
        session = self.store.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None and max_age is not None and self._clock() - session.auth_time > int(max_age):
            session = None
        if session is not None and not prompt & {"login", "select_account"}:
            return self._issue_code(auth, session, status=302)
        if "none" in prompt:
            return refuse("login_required", "the person is not signed in")
        handle = self.store.pending.add(Pending(auth))
        return self._sign_in_page(handle, auth, selected=auth.login_hint)

    def _sign_in_page(
        self,
        handle: str,
        auth: AuthorizationRequest,
        *,
        selected: str | None,
        errors: tuple[FieldError, ...] = (),
    ) -> Response:
        return sign_in_page(
            action=self.url("/authorize"),
            transaction=handle,
            client_id=auth.client_id,
            accounts=self.config.accounts,
            selected=selected,
            errors=errors,
        )

    async def _sign_in(self, request: Request) -> Response:
        form = await request.form()
        handle = _text(form, "transaction") or ""
        pending = self.store.pending.get(handle)
        if pending is None:
            return message_page(
                "Sign-in expired",
                "This sign-in page has expired or was already used. "
                "Go back to the service and sign in again.",
                400,
            )
        auth = pending.request
        if _text(form, "action") == "cancel":
            self.store.pending.pop(handle)
            return self._access_denied(auth, "the person cancelled the sign-in")
        username, password = _text(form, "account"), _text(form, "password")
        account = self.config.account(username)
        errors = []
        if account is None:
            errors.append(FieldError("account", "Choose the account to sign in as"))
        if password is None:
            errors.append(FieldError("password", "Enter the password"))
        elif account is not None and not hmac.compare_digest(password.encode(), account.password.encode()):
            errors.append(FieldError("password", "The password is not right for this account"))
        if account is None or errors:
            pending.failed_attempts += 1
            if pending.failed_attempts >= MAX_SIGN_IN_ATTEMPTS:
                self.store.pending.pop(handle)
                return self._access_denied(auth, "too many failed sign-in attempts")
            return self._sign_in_page(handle, auth, selected=username, errors=tuple(errors))
        self.store.pending.pop(handle)
        cookie, session = self.store.sign_in(account)
        response = self._issue_code(auth, session, status=303)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=self.config.session_lifetime_s,
            path="/",
            secure=self.config.secure,
            httponly=True,
            samesite="lax",
        )
        return response

    def _access_denied(self, auth: AuthorizationRequest, description: str) -> Response:
        params = {"error": "access_denied", "error_description": description}
        return self._authorization_response(auth.redirect_uri, params, auth.state, 303)

    def _issue_code(self, auth: AuthorizationRequest, session: Session, *, status: int) -> Response:
        code = self.store.codes.add(Code(auth, session))
        return self._authorization_response(auth.redirect_uri, {"code": code}, auth.state, status)

    def _authorization_response(
        self, redirect_uri: str, params: dict[str, str], state: str | None, status: int = 302
    ) -> Response:
        location = _with_query(redirect_uri, {**params, "state": state, "iss": self.config.issuer})
        return RedirectResponse(location, status, headers=_NO_STORE)

    # -- token endpoint ----------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        form = await request.form()
        repeated = sorted({name for name in form if len(form.getlist(name)) > 1})
        if repeated:
            return _oauth_error("invalid_request", f"parameter {repeated[0]} is repeated")
        client_id = self._authenticated_client(request, form)
        if isinstance(client_id, Response):
            return client_id
        grant_type = _text(form, "grant_type")
        if grant_type == "authorization_code":
            return self._code_grant(client_id, form)
        if grant_type == "refresh_token":
            return self._refresh_grant(client_id, form)
        return _oauth_error(
            "unsupported_grant_type", "grant_type must be authorization_code or refresh_token"
        )

    def _authenticated_client(self, request: Request, form: FormData) -> str | Response:
        """The client's id once its secret is checked (client_secret_basic or _post)."""
        header = request.headers.get("authorization", "")
        posted_id, posted_secret = _text(form, "client_id"), _text(form, "client_secret")
        if header[:6].lower() == "basic ":
            if posted_secret is not None:
                return _oauth_error("invalid_request", "use one client authentication method, not two")
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return _invalid_client("the Basic credentials are not base64 of id:secret")
            raw_id, separator, raw_secret = decoded.partition(":")
            if not separator:
                return _invalid_client("the Basic credentials are not base64 of id:secret")
            # RFC 6749 2.3.1: both are form-urlencoded before they are joined.
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if posted_id is not None and posted_id != client_id:
                return _oauth_error("invalid_request", "client_id differs from the authenticated client")
        elif posted_id is not None and posted_secret is not None:
            client_id, secret = posted_id, posted_secret
        else:
            return _invalid_client(
                "client authentication is required (client_secret_basic or client_secret_post)"
            )
        client = self.config.client(client_id)
        if client is None or not hmac.compare_digest(secret.encode(), client.secret.encode()):
            return _invalid_client("unknown client or wrong secret")
        return client.client_id

    def _code_grant(self, client_id: str, form: FormData) -> Response:
        code = self.store.codes.get(_text(form, "code"))
        if code is None or code.request.client_id != client_id:
            return _oauth_error("invalid_grant", "the code is unknown, expired or another client's")
        if code.redeemed:
            # A replayed code: whoever redeemed it first may be an attacker, so what it
            # obtained stops working (RFC 6749 4.1.2).
            self.store.revoke_family(code.family)
            return _oauth_error(
                "invalid_grant", "the code was already used; the tokens it obtained are revoked"
            )
        verifier = _text(form, "code_verifier")
        if verifier is None:
            return _oauth_error("invalid_request", "code_verifier is required (PKCE)")
        if not 43 <= len(verifier) <= 128 or not set(verifier) <= _VERIFIER_CHARACTERS:
            return _oauth_error("invalid_request", "code_verifier must be 43 to 128 of A-Z a-z 0-9 - . _ ~")
        # From here the code is spent, whatever the outcome: a wrong verifier or redirect URI
        # means someone other than the client that asked for it holds it.
        code.redeemed = True
        if _text(form, "redirect_uri") != code.request.redirect_uri:
            return _oauth_error("invalid_grant", "redirect_uri differs from the authorization request's")
        if not hmac.compare_digest(s256(verifier), code.request.code_challenge):
            return _oauth_error("invalid_grant", "code_verifier does not match the code_challenge")
        session = code.session
        signed = self.signer.issue(
            session.account,
            client_id=client_id,
            scope=code.request.scope,
            auth_time=session.auth_time,
            sid=session.sid,
            nonce=code.request.nonce,
        )
        return self._token_response(signed, self.store.new_refresh_token(code), code.request.scope)

    def _refresh_grant(self, client_id: str, form: FormData) -> Response:
        refresh = self.store.refresh.get(_text(form, "refresh_token"))
        if refresh is None or refresh.client_id != client_id:
            return _oauth_error(
                "invalid_grant", "the refresh token is unknown, expired, revoked or another client's"
            )
        if refresh.rotated:
            self.store.revoke_family(refresh.family)
            return _oauth_error(
                "invalid_grant", "the refresh token was already used; its successors are revoked"
            )
        scope = refresh.scope
        asked = _text(form, "scope")
        if asked is not None:
            if not set(asked.split()) <= set(refresh.scope):
                return _oauth_error("invalid_scope", "a refresh may narrow the scope, never widen it")
            scope = tuple(s for s in refresh.scope if s in asked.split())
        refresh.rotated = True
        session = refresh.session
        signed = self.signer.issue(
            session.account,
            client_id=client_id,
            scope=scope,
            auth_time=session.auth_time,
            sid=session.sid,
            with_id_token=False,
        )
        return self._token_response(signed, self.store.new_refresh_token(refresh), scope)

    def _token_response(self, signed: Signed, refresh_token: str, scope: tuple[str, ...]) -> JSONResponse:
        body: dict[str, Any] = {
            "access_token": signed.access_token,
            "token_type": "Bearer",
            "expires_in": signed.expires_in,
            "scope": " ".join(scope),
            "refresh_token": refresh_token,
        }
        if signed.id_token is not None:
            body["id_token"] = signed.id_token
        return JSONResponse(body, headers=_NO_STORE)

    # -- userinfo and logout -----------------------------------------------------------

    async def userinfo(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        challenge = 'Bearer realm="egret-local"'
        if header[:7].lower() != "bearer ":
            return Response(status_code=401, headers={"WWW-Authenticate": challenge})
        try:
            claims = self.signer.read_access_token(header[7:].strip())
        except jwt.InvalidTokenError:
            return Response(
                status_code=401, headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'}
            )
        scope = str(claims.get("scope", "")).split()
        if "openid" not in scope:
            return Response(
                status_code=403, headers={"WWW-Authenticate": f'{challenge}, error="insufficient_scope"'}
            )
        account = next(
            (a for a in self.config.accounts if self.signer.identity(a)["sub"] == claims["sub"]),
            None,
        )
        if account is None:
            return Response(
                status_code=401, headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'}
            )
        body = self.signer.identity(account)
        if "profile" in scope:
            body |= self.signer.profile(account)
        return JSONResponse(body, headers=_NO_STORE)

    async def logout(self, request: Request) -> Response:
        params: Mapping[str, Any] = await request.form() if request.method == "POST" else request.query_params
        client = None
        hint = _text(params, "id_token_hint")
        if hint is not None:
            try:
                client = self.config.client(self.signer.read_id_token_hint(hint)["aud"])
            except jwt.InvalidTokenError:
                return message_page(
                    "Sign-out refused", "The ID token hint is not one this provider issued.", 400
                )
        client_id = _text(params, "client_id")
        if client_id is not None:
            named = self.config.client(client_id)
            if named is None or (client is not None and named != client):
                return message_page(
                    "Sign-out refused", "The client_id does not match the ID token hint.", 400
                )
            client = named
        target = _text(params, "post_logout_redirect_uri")
        if target is not None and (client is None or target not in client.post_logout_redirect_uris):
            return message_page(
                "Sign-out refused",
                "The address to return to after signing out is not registered for the client.",
                400,
            )
        self.store.sign_out(request.cookies.get(SESSION_COOKIE))
        response: Response
        if target is not None:
            response = RedirectResponse(
                _with_query(target, {"state": _text(params, "state")}), 302, _NO_STORE
            )
        else:
            response = message_page("Signed out", "You are signed out of the local identity provider.")
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=self.config.secure, httponly=True, samesite="lax"
        )
        return response


def create_app(config: ProviderConfig) -> Starlette:
    return Provider(config).app()
