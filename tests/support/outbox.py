"""Outbox relays in tests: one builder, running relays until they sent what they should, and
waiting for a service's outbox to drain, so that a test can then assert nothing more arrives.

A service writes a call's outbox rows before it answers the call, and the relay deletes a row
only after the receiver committed it (kit/outbox.py). Once the table is empty, every message of
every answered call has reached the receiver: a count taken then is final, not early.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from kit.outbox import OutboxLeaseMixin, OutboxMixin, OutboxRelay, PayloadsOf, Send
from kit.settings import RelaySettings
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


async def _unused_send(_: list[bytes]) -> None:
    raise AssertionError("this relay's claims are taken and settled by hand")


def outbox_relay(
    sessions: sessionmaker[Session],
    table: type[OutboxMixin],
    leases: type[OutboxLeaseMixin],
    *,
    instance: str,
    send: Send = _unused_send,
    batch_size: int = 3,
    backoff_s: tuple[float, float] = (0.01, 0.05),
    lease_s: float = 60.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    where: sa.ColumnElement[bool] | None = None,
    max_call_bytes: int | None = None,
    payloads_of: PayloadsOf | None = None,
) -> OutboxRelay:
    """A relay as the services build one, with settings for tests: it polls every 10 ms and
    backs off for `backoff_s` (initial, max); its name is its identity."""
    initial, most = backoff_s
    return OutboxRelay(
        name=instance,
        sessions=sessions,
        table=table,
        leases=leases,
        send=send,
        settings=RelaySettings(
            batch_size=batch_size, poll_interval_s=0.01, backoff_initial_s=initial, backoff_max_s=most
        ),
        lease_s=lease_s,
        instance=instance,
        where=where,
        max_call_bytes=max_call_bytes,
        payloads_of=payloads_of,
        clock=clock,
    )


async def relay_until_sent(relays: Sequence[OutboxRelay], rows: int, *, within_s: float = 30) -> None:
    """Runs `relays` until they have sent `rows` rows between them, then stops them and waits
    until each has stopped: no claim is in flight when this returns."""
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stopping)) for relay in relays]
    try:
        sent = lambda: sum(relay.sent for relay in relays) >= rows  # noqa: E731
        await until(sent, what="relays to send the rows", within_s=within_s)
    finally:
        stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks)
