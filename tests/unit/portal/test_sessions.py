"""The session cookie: encrypted, bounded in time, and the CSRF token bound to it."""

from __future__ import annotations

from services.portal import csrf
from services.portal.sessions import EncryptedSessionMiddleware


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _app(scope: object, receive: object, send: object) -> None:  # never called
    raise AssertionError


def _middleware(clock: Clock, secrets: tuple[bytes, ...] = (b"k" * 32,)) -> EncryptedSessionMiddleware:
    return EncryptedSessionMiddleware(
        _app, secrets=secrets, idle_s=900, absolute_s=3600, secure=True, clock=clock
    )


def test_the_cookie_is_encrypted_and_round_trips() -> None:
    clock = Clock()
    sessions = _middleware(clock)
    value = sessions.dump({"access_token": "eyJ.secret.token", "role": "subject"})
    assert "secret" not in value
    assert "subject" not in value
    loaded, expired = sessions.load(value)
    assert (loaded["access_token"], expired) == ("eyJ.secret.token", False)


def test_idle_and_absolute_timeouts_end_the_session() -> None:
    clock = Clock()
    sessions = _middleware(clock)
    value = sessions.dump({"a": 1})
    clock.now += 901
    assert sessions.load(value) == ({}, True)
    # Used every 10 minutes, it still ends an hour after it began.
    clock.now = 1_000_000.0
    session, _ = sessions.load(value)
    for _ in range(6):
        value = sessions.dump(session)
        clock.now += 600
        session, expired = sessions.load(value)
        assert not expired
    value = sessions.dump(session)
    clock.now += 60
    assert sessions.load(value) == ({}, True)


def test_a_tampered_or_foreign_cookie_is_no_session() -> None:
    clock = Clock()
    value = _middleware(clock).dump({"a": 1})
    assert _middleware(clock, (b"x" * 32,)).load(value) == ({}, True)
    assert _middleware(clock).load(value[:-4] + "AAAA") == ({}, True)
    assert _middleware(clock).load(None) == ({}, False)


def test_rotated_keys_still_read_cookies_of_the_previous_key() -> None:
    clock = Clock()
    old = _middleware(clock, (b"old" * 11,)).dump({"a": 1})
    assert _middleware(clock, (b"new" * 11, b"old" * 11)).load(old)[0]["a"] == 1


def test_csrf_tokens_are_bound_to_their_session() -> None:
    mine: dict[str, object] = {}
    theirs: dict[str, object] = {}
    token = csrf.token(mine)
    assert csrf.token(mine) == token
    assert csrf.valid(mine, token)
    assert not csrf.valid(theirs, token)
    assert not csrf.valid(mine, "")
    assert not csrf.valid(mine, None)
    assert not csrf.valid({}, "")
