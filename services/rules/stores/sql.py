"""Bulk statements over event keys, in chunks that keep IN lists well below SQLite's and
PostgreSQL's bound-parameter limits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

import sqlalchemy as sa

from services.rules.domain import split_key

_CHUNK: Final = 5000


def chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _keys_by_source(keys: Sequence[str]) -> dict[str, list[str]]:
    by_source: dict[str, list[str]] = {}
    for key in keys:
        source, event_id = split_key(key)
        by_source.setdefault(source, []).append(event_id)
    return by_source


def key_filter(table: Any, keys: Sequence[str]) -> Any:
    """WHERE (source, event_id) is one of `keys`, as one OR of IN lists per source."""
    return sa.or_(
        *(
            sa.and_(table.source == source, table.event_id.in_(ids))
            for source, ids in _keys_by_source(keys).items()
        )
    )
