"""The outbox's tables: the rows a service writes in its own transactions, and the leases
its relays take on slices of them (kit.outbox_lease). A service declares both:
`class Outbox(Base, OutboxMixin)` and `class OutboxLease(Base, OutboxLeaseMixin)`.

A row is only ever inserted (by the service, with the state change that produced it) and
deleted (by the relay, once delivered): who is sending it, and when it may be retried,
is its slice's lease, one small row per slice (issue 18: per-row claim updates left a
dead tuple per row and per claim on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from kit.settings import MAX_INSTANCE_LENGTH
from kit.tracing import current_traceparent

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# A slice's name in the lease table: its condition as SQL, at most this long.
MAX_SLICE_LENGTH = 200


class OutboxMixin:
    """Columns of an outbox table."""

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)
    traceparent: Mapped[str] = mapped_column(sa.String(64), default="")
    # When the row was written; read only as the lag gauge's start for rows older than
    # created_at. (It was the claim's lease end before the slice leases: dropping it needs
    # ingest's batch insert, which binds it, changed with it.)
    available_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    # When the row was written: the lag gauge's start (NULL for rows older than the column).
    created_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True), default=None)


class OutboxLeaseMixin:
    """Columns of an outbox's lease table: one row per slice, written by its relays only."""

    # The slice's condition as SQL ("true" for the whole table).
    slice: Mapped[str] = mapped_column(sa.String(MAX_SLICE_LENGTH), primary_key=True)
    # The relay identity and generation sending the slice's head; NULL when nobody is.
    holder: Mapped[str | None] = mapped_column(sa.String(MAX_INSTANCE_LENGTH), default=None)
    generation: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    # The last id of the holder's claim: rows of the slice up to it are in flight.
    claimed_through: Mapped[int | None] = mapped_column(BigId, default=None)
    # Until when the slice is held: the lease's end while held, the retry time in backoff.
    until: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    # Failed sends of the slice's head since it was last delivered (the backoff's exponent).
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)


def outbox_rows(payloads: Sequence[bytes], now: datetime) -> list[dict[str, object]]:
    """Rows for a bulk insert of `payloads`, carrying the current trace context."""
    traceparent = current_traceparent()
    return [
        {"payload": p, "traceparent": traceparent, "available_at": now, "created_at": now} for p in payloads
    ]
