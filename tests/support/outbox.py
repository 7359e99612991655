"""Waiting for a service's outbox to drain, so that a test can then assert nothing more arrives.

A service writes a call's outbox rows before it answers the call, and the relay deletes a row
only after the receiver committed it (kit/outbox.py). Once the table is empty, every message of
every answered call has reached the receiver: a count taken then is final, not early.
"""

from __future__ import annotations

import sqlalchemy as sa

from tests.support.waiting import WITHIN_S, until


async def until_drained(database_url: str, table: str, *, within_s: float = WITHIN_S) -> None:
    """Waits until `table` (e.g. "rules_outbox") holds no row."""
    engine = sa.create_engine(database_url)
    count = sa.select(sa.func.count()).select_from(sa.table(table))

    def empty() -> bool:
        with engine.connect() as connection:
            return connection.scalar(count) == 0

    try:
        await until(empty, what=f"{table} to drain", within_s=within_s)
    finally:
        engine.dispose()
