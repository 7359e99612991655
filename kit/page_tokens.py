"""The one page-token codec of every paging RPC (issue 17).

A token carries the cursor of the next page and an HMAC-SHA256 over (version, the request it
came from, cursor), so a caller can neither forge a cursor nor page one query with another's
token. The key is derived from the service's current audit key with a fixed label: every
replica of a service derives the same key, tokens survive restarts, and no new secret is
needed. Rotating the audit key refuses the tokens handed out before (clients re-list).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kit.errors import InvalidArgument, Violation

if TYPE_CHECKING:
    from kit.settings import AuditSettings

_VERSION = "1"
_LABEL = b"egret page tokens v1"
# Only for EGRET_INSECURE development without an audit key: anyone can forge such tokens,
# which then page nothing the caller could not list from the first page anyway.
DEVELOPMENT_KEY = b"egret development page-token key, not a secret"
_MAC_BYTES = 16


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()


class PageTokens:
    """Encodes and checks page tokens under one service's key."""

    def __init__(self, key: bytes) -> None:
        self._key = hmac.new(key, _LABEL, hashlib.sha256).digest()

    @classmethod
    def from_audit(cls, audit: AuditSettings) -> PageTokens:
        """Keyed by the current audit key; the development key when there is none (only
        EGRET_INSECURE runs without one: AuditSettings.missing)."""
        key = audit.keys.get(audit.key_id) if audit.key_id else None
        return cls(key or DEVELOPMENT_KEY)

    @classmethod
    def development(cls) -> PageTokens:
        return cls(DEVELOPMENT_KEY)

    def _mac(self, bound_to: Mapping[str, Any], body: bytes) -> bytes:
        binding = hashlib.sha256(_canonical(bound_to)).digest()
        message = _VERSION.encode() + b"\0" + binding + b"\0" + body
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, cursor: Any, *, bound_to: Mapping[str, Any]) -> str:
        """An opaque URL-safe token for `cursor` (JSON-able), valid only with `bound_to`:
        the method and the request fields that define the result set (not page_token or
        page_size)."""
        body = _canonical(cursor)
        return f"{_VERSION}.{_b64(body)}.{_b64(self._mac(bound_to, body))}"

    def decode(self, token: str, *, bound_to: Mapping[str, Any]) -> Any:
        """The cursor `encode` put in `token` with the same binding; None for "" (the first
        page); InvalidArgument on page_token for anything else."""
        if not token:
            return None
        invalid = InvalidArgument(
            "invalid page token",
            [Violation("page_token", "is not a page token of this query", "INVALID_PAGE_TOKEN")],
        )
        version, _, rest = token.partition(".")
        body_text, _, mac_text = rest.partition(".")
        try:
            body, mac = _unb64(body_text), _unb64(mac_text)
        except (binascii.Error, ValueError) as exc:
            raise invalid from exc
        if version != _VERSION or not hmac.compare_digest(mac, self._mac(bound_to, body)):
            raise invalid
        try:
            return json.loads(body)
        except ValueError as exc:  # only a key holder could have MACed it
            raise invalid from exc
