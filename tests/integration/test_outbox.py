"""Replicas share one outbox table: every row goes out once, whoever claims it.

Two relays with their own engines (as two replicas would have) drain one table at the
same time, on SQLite and PostgreSQL. A claim is one statement, so no row can be
claimed by both; a row sent twice would show up as a duplicate delivery here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase

from kit.db import create_engine, make_metadata, make_session_factory
from kit.outbox import OutboxMixin, OutboxRelay, outbox_rows
from kit.settings import RelaySettings

ROWS = 600


class Base(DeclarativeBase):
    metadata = make_metadata()


class Outbox(Base, OutboxMixin):
    __tablename__ = "test_outbox"


async def test_two_relays_on_one_table_deliver_every_row_exactly_once(database_url: str) -> None:
    setup = create_engine(database_url)
    Base.metadata.create_all(setup)
    with setup.begin() as connection:
        payloads = [str(i).encode() for i in range(ROWS)]
        connection.execute(sa.insert(Outbox), outbox_rows(payloads, datetime.now(UTC)))
    setup.dispose()

    delivered: Counter[bytes] = Counter()
    engines = [create_engine(database_url) for _ in range(2)]

    async def send(batch: list[bytes]) -> None:
        delivered.update(batch)
        await asyncio.sleep(0)

    relays = [
        OutboxRelay(
            name=f"replica-{i}",
            sessions=make_session_factory(engine),
            table=Outbox,
            send=send,
            settings=RelaySettings(
                batch_size=7, poll_interval_s=0.01, backoff_initial_s=0.01, backoff_max_s=0.05
            ),
            lease_s=60.0,
        )
        for i, engine in enumerate(engines)
    ]
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stopping)) for relay in relays]
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while sum(relay.sent for relay in relays) < ROWS:
            assert asyncio.get_running_loop().time() < deadline, "relays did not drain the table"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # a duplicate claim in flight would land now
    finally:
        stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks)
        for engine in engines:
            engine.dispose()

    assert all(relay.sent > 0 for relay in relays), "both replicas should have taken part"
    assert sorted(delivered) == sorted(payloads)
    assert max(delivered.values()) == 1, [p for p, n in delivered.items() if n > 1][:5]
    assert sum(relay.sent for relay in relays) == ROWS
