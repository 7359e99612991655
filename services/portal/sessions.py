"""Sessions in an encrypted cookie: `scope["session"]` is a dict, stored between requests
as a Fernet token (AES-128-CBC and HMAC-SHA256) under the keys of
EGRET_PORTAL_SESSION_SECRET_FILE, so the browser holds it but can neither read nor change
it (the access token inside never reaches page script: the cookie is HttpOnly).

Timeouts: a session unused for `idle_s` or older than `absolute_s` is dropped, whatever the
cookie says (both instants are inside the encrypted payload, so they cannot be extended by
the browser). The cookie is rewritten on every response that has a session, sliding the
idle timeout. Nothing is kept on the server, so any replica serves any request; the cost is
that signing out clears the browser's cookie, and a copy taken earlier stays usable until
its idle timeout or the access token's expiry, whichever comes first (docs/portal.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from http.cookies import SimpleCookie
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "egret_session"
CREATED = "_created"
SEEN = "_seen"
# Browsers keep cookies up to 4,096 bytes; a bigger one would be dropped silently.
MAX_COOKIE_BYTES = 4000


def fernet(secrets: Sequence[bytes]) -> MultiFernet:
    """One Fernet key per secret (derived with SHA-256), the first encrypting."""
    return MultiFernet([Fernet(base64.urlsafe_b64encode(hashlib.sha256(s).digest())) for s in secrets])


class SessionTooLarge(RuntimeError):
    pass


class EncryptedSessionMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        secrets: Sequence[bytes],
        idle_s: float,
        absolute_s: float,
        secure: bool,
        cookie: str = COOKIE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._app = app
        self._fernet = fernet(secrets)
        self._idle_s = idle_s
        self._absolute_s = absolute_s
        self._secure = secure
        self._cookie = cookie
        self._clock = clock

    def load(self, raw: str | None) -> tuple[dict[str, Any], bool]:
        """The session in a cookie value, and whether one was there but ran out or was bad."""
        if not raw:
            return {}, False
        try:
            data = json.loads(self._fernet.decrypt(raw.encode(), ttl=int(self._absolute_s) + 60))
        except (InvalidToken, ValueError):
            return {}, True
        now = self._clock()
        if not isinstance(data, dict):
            return {}, True
        if (
            now - float(data.get(SEEN, 0)) > self._idle_s
            or now - float(data.get(CREATED, 0)) > self._absolute_s
        ):
            return {}, True
        return data, False

    def dump(self, session: dict[str, Any]) -> str:
        now = self._clock()
        session.setdefault(CREATED, now)
        session[SEEN] = now
        value = self._fernet.encrypt(json.dumps(session, separators=(",", ":")).encode()).decode()
        if len(value) > MAX_COOKIE_BYTES:
            raise SessionTooLarge(f"session cookie of {len(value)} bytes")
        return value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        cookies = SimpleCookie()
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies.load(value.decode("latin-1"))
        morsel = cookies.get(self._cookie)
        had_cookie = morsel is not None
        session, expired = self.load(morsel.value if morsel is not None else None)
        scope["session"] = session
        scope["session_expired"] = expired

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                current = scope["session"]
                flags = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if self._secure else "")
                if current:
                    value = self.dump(current)
                    headers.append("Set-Cookie", f"{self._cookie}={value}{flags}")
                elif had_cookie:
                    headers.append(
                        "Set-Cookie",
                        f"{self._cookie}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT{flags}",
                    )
            await send(message)

        await self._app(scope, receive, send_with_cookie)
