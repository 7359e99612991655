"""The provider's short-lived state, in memory: sign-ins waiting for the form, signed-in
sessions, authorization codes and refresh tokens. Nothing survives a restart, as nothing
of a local provider should.

Every handle is 256 random bits. Codes are single use: a second redemption is refused and
revokes the refresh tokens the first one obtained (RFC 6749 10.5); a rotated refresh token
presented again revokes its whole family (RFC 9700 4.14.2).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from devtools.oidc.config import Account, ProviderConfig


@dataclass(frozen=True)
class AuthorizationRequest:
    """A validated authorization request: what the code will be bound to."""

    client_id: str
    redirect_uri: str
    scope: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str
    login_hint: str | None = None


@dataclass(frozen=True)
class Session:
    """A signed-in person at the provider (single sign-on until it ends or they sign out)."""

    account: Account
    auth_time: int
    sid: str


@dataclass
class Pending:
    request: AuthorizationRequest
    failed_attempts: int = 0


@dataclass
class Code:
    request: AuthorizationRequest
    session: Session
    redeemed: bool = False
    # The refresh-token family obtained with this code, revoked if the code is replayed.
    family: str | None = None


@dataclass
class Refresh:
    client_id: str
    scope: tuple[str, ...]
    session: Session
    family: str
    rotated: bool = False


_V = TypeVar("_V")


@dataclass
class _Expiring(Generic[_V]):
    """Values by random handle, each forgotten after its lifetime."""

    lifetime_s: float
    clock: Callable[[], float]
    _items: dict[str, tuple[_V, float]] = field(default_factory=dict)

    def add(self, value: _V) -> str:
        now = self.clock()
        for handle in [h for h, (_, until) in self._items.items() if until <= now]:
            del self._items[handle]
        handle = secrets.token_urlsafe(32)
        self._items[handle] = (value, now + self.lifetime_s)
        return handle

    def get(self, handle: str | None) -> _V | None:
        item = self._items.get(handle or "")
        if item is None or item[1] <= self.clock():
            return None
        return item[0]

    def pop(self, handle: str) -> None:
        self._items.pop(handle, None)

    def items(self) -> list[tuple[str, _V]]:
        return [(handle, value) for handle, (value, _) in self._items.items()]


class Store:
    def __init__(self, config: ProviderConfig, clock: Callable[[], float] = time.time) -> None:
        self.pending = _Expiring[Pending](config.sign_in_lifetime_s, clock)
        self.sessions = _Expiring[Session](config.session_lifetime_s, clock)
        self.codes = _Expiring[Code](config.code_lifetime_s, clock)
        self.refresh = _Expiring[Refresh](config.refresh_token_lifetime_s, clock)
        self._clock = clock

    def sign_in(self, account: Account) -> tuple[str, Session]:
        """A new session for `account`: its cookie handle and the session."""
        session = Session(account, int(self._clock()), secrets.token_urlsafe(16))
        return self.sessions.add(session), session

    def sign_out(self, handle: str | None) -> None:
        """End the session and revoke the refresh tokens obtained in it."""
        session = self.sessions.get(handle)
        if handle is None or session is None:
            return
        self.sessions.pop(handle)
        for refresh_handle, refresh in self.refresh.items():
            if refresh.session.sid == session.sid:
                self.refresh.pop(refresh_handle)

    def new_refresh_token(self, code_or_refresh: Code | Refresh) -> str:
        if isinstance(code_or_refresh, Code):
            request = code_or_refresh.request
            family = secrets.token_urlsafe(16)
            code_or_refresh.family = family
            refresh = Refresh(request.client_id, request.scope, code_or_refresh.session, family)
        else:
            old = code_or_refresh
            refresh = Refresh(old.client_id, old.scope, old.session, old.family)
        return self.refresh.add(refresh)

    def revoke_family(self, family: str | None) -> None:
        for handle, refresh in self.refresh.items():
            if refresh.family == family:
                self.refresh.pop(handle)
