"""CSRF protection for every form: a random secret per session, sent back in a hidden
field and compared in constant time. A page from another site can make the browser post
with the session cookie (SameSite=Lax does not cover every case, e.g. older browsers and
top-level POSTs right after sign-in), but it cannot read the secret."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import MutableMapping
from typing import Any

FIELD = "csrf_token"
_KEY = "csrf"


def token(session: MutableMapping[str, Any]) -> str:
    """The session's CSRF token, created on first use (bound to this session only)."""
    value = session.get(_KEY)
    if not isinstance(value, str) or not value:
        value = secrets.token_urlsafe(32)
        session[_KEY] = value
    return value


def valid(session: MutableMapping[str, Any], submitted: object) -> bool:
    expected = session.get(_KEY)
    if not isinstance(expected, str) or not expected or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())
