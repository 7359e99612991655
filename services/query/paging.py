"""Page sizes and signed page tokens (kit.page_tokens) of query's list reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kit.errors import InvalidArgument, Violation
from kit.page_tokens import PageTokens

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last entry it returned."""

    occurred_at: datetime
    entry_id: str


def _invalid_token() -> InvalidArgument:
    return InvalidArgument(
        "invalid page token",
        [Violation("page_token", "is not a page token of this query", "INVALID_PAGE_TOKEN")],
    )


def encode_cursor(tokens: PageTokens, cursor: Cursor, *, bound_to: Mapping[str, object]) -> str:
    return tokens.encode([cursor.occurred_at.astimezone(UTC).isoformat(), cursor.entry_id], bound_to=bound_to)


def decode_cursor(tokens: PageTokens, token: str, *, bound_to: Mapping[str, object]) -> Cursor | None:
    """The ListEntries cursor in `token` (kit.page_tokens checks it); None for the first page."""
    value = tokens.decode(token, bound_to=bound_to)
    if value is None:
        return None
    try:
        occurred_at, entry_id = value
        when = datetime.fromisoformat(occurred_at)
    except (ValueError, TypeError) as exc:
        raise _invalid_token() from exc
    if when.tzinfo is None or not isinstance(entry_id, str):
        raise _invalid_token()
    return Cursor(when.astimezone(UTC), entry_id)


def decode_token(tokens: PageTokens, token: str, kind: type, *, bound_to: Mapping[str, object]) -> Any:
    """The single value a token of `tokens.encode` holds, of type `kind`; None for ""."""
    value = tokens.decode(token, bound_to=bound_to)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _invalid_token()
    return value


def page_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            "invalid page size",
            [
                Violation(
                    "page_size",
                    f"must be 0 (default {DEFAULT_PAGE_SIZE}) or 1 to {MAX_PAGE_SIZE}",
                    "OUT_OF_RANGE",
                )
            ],
        )
    return requested
