"""Where a call's bearer token comes from: a string, a file kept fresh, or the identity
provider's token endpoint (OAuth 2.0 client credentials)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Protocol

from egret_client.profile import Oidc, Profile, ProfileError


class TokenSource(Protocol):
    async def token(self) -> str | None: ...


class NoToken:
    """Calls that carry no token: health, reflection, a service behind its own proxy."""

    async def token(self) -> str | None:
        return None


class StaticToken:
    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str | None:
        return self._token


class TokenFile:
    """A token file re-read when it changes (a projected Secret, a renewed dev token)."""

    def __init__(self, path: Path, recheck_s: float = 1.0) -> None:
        self._path = path
        self._recheck_s = recheck_s
        self._checked_at = float("-inf")
        self._mtime_ns = -1
        self._token = ""

    async def token(self) -> str | None:
        now = time.monotonic()
        if now - self._checked_at >= self._recheck_s:
            self._checked_at = now
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime_ns:
                    self._token = self._path.read_text(encoding="utf-8").strip()
                    self._mtime_ns = mtime
            except OSError as exc:
                raise ProfileError(f"cannot read the token file {self._path}: {exc}") from None
        return self._token


class ClientCredentials:
    """Tokens from the identity provider, fetched on first use and renewed before expiry."""

    def __init__(self, oidc: Oidc, renew_before_s: float = 60.0) -> None:
        self._oidc = oidc
        self._renew_before_s = renew_before_s
        self._token = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str | None:
        async with self._lock:
            if time.time() >= self._expires_at - self._renew_before_s:
                # Imported here: only profiles with an identity provider need it.
                from authlib.integrations.httpx_client import AsyncOAuth2Client  # noqa: PLC0415

                secret = self._oidc.client_secret_file.read_text(encoding="utf-8").strip()
                async with AsyncOAuth2Client(
                    self._oidc.client_id, secret, scope=self._oidc.scope or None
                ) as client:
                    issued = await client.fetch_token(self._oidc.token_url, grant_type="client_credentials")
                self._token = str(issued["access_token"])
                self._expires_at = float(issued.get("expires_at") or time.time() + 300)
        return self._token


def token_source(profile: Profile) -> TokenSource:
    if profile.oidc is not None:
        return ClientCredentials(profile.oidc)
    if profile.token_file is not None:
        return TokenFile(profile.token_file)
    return NoToken()
