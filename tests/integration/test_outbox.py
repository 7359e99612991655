"""Relays sharing an outbox table, on SQLite and PostgreSQL: who may claim which rows.

Every relay has an identity (stable across its restarts) and a generation (fresh per
start). A claim takes its slice's lease and the slice's first rows in id order; a live
lease of another relay, or a backoff after a failed send, holds the whole slice back; a
restart takes its own lease over at once; changes after a send are fenced to the lease's
generation. Two relays with their own engines (as two replicas would have) draining one
table never send a row twice and, since they take turns, deliver the rows in id order.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from kit.db import create_engine, make_metadata, make_session_factory
from kit.outbox import OutboxLeaseMixin, OutboxMixin, OutboxRelay, PayloadsOf, outbox_rows
from tests.support.outbox import outbox_relay, relay_until_sent

ROWS = 600
LEASE_S = 60.0
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = make_metadata()


class Outbox(Base, OutboxMixin):
    __tablename__ = "test_outbox"

    shard: Mapped[int] = mapped_column(sa.Integer, default=0)


class OutboxLease(Base, OutboxLeaseMixin):
    __tablename__ = "test_outbox_leases"


class Clock:
    """A clock the test moves by hand, shared by the relays of one test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def insert(sessions: sessionmaker[Session], count: int, shard: int = 0) -> None:
    rows = outbox_rows([f"{shard}-{i}".encode() for i in range(count)], T0)
    with sessions() as session, session.begin():
        session.execute(sa.insert(Outbox), [{**row, "shard": shard} for row in rows])


def relay(
    sessions: sessionmaker[Session],
    instance: str,
    clock: Clock,
    *,
    batch: int = 3,
    shard: int | None = None,
    payloads_of: PayloadsOf | None = None,
) -> OutboxRelay:
    """A relay whose claims the test takes and settles by hand, on the test's clock."""
    return outbox_relay(
        sessions,
        Outbox,
        OutboxLease,
        instance=instance,
        batch_size=batch,
        backoff_s=(5, 5),
        lease_s=LEASE_S,
        clock=clock,
        where=None if shard is None else Outbox.shard == shard,
        payloads_of=payloads_of,
    )


def running(sessions: sessionmaker[Session], instance: str, **options: Any) -> OutboxRelay:
    return outbox_relay(sessions, Outbox, OutboxLease, instance=instance, lease_s=LEASE_S, **options)


def claim(relay: OutboxRelay) -> list[int]:
    claimed = relay.claim()
    return [] if claimed is None else claimed.ids


def lease(sessions: sessionmaker[Session]) -> tuple[str | None, int | None] | None:
    """The whole table's lease: the generation holding it and the last id it claimed."""
    with sessions() as session:
        row = session.execute(sa.select(OutboxLease.generation, OutboxLease.claimed_through)).one_or_none()
    return None if row is None else (row[0], row[1])


def stored(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        return list(session.scalars(sa.select(Outbox.id).order_by(Outbox.id)))


def test_a_restarted_relay_takes_over_its_own_lease_at_once(sessions: sessionmaker[Session]) -> None:
    insert(sessions, 5)
    clock = Clock()
    assert claim(relay(sessions, "ingest-a", clock)) == [1, 2, 3]  # then killed, claim in flight
    # Another identity respects the lease; the same identity restarted does not wait for it.
    assert claim(relay(sessions, "ingest-b", clock)) == []
    restarted = relay(sessions, "ingest-a", clock)
    assert claim(restarted) == [1, 2, 3]
    assert lease(sessions) == (restarted.generation, 3)


def test_a_lease_of_a_replica_gone_for_good_holds_until_it_ends(sessions: sessionmaker[Session]) -> None:
    insert(sessions, 5)
    clock = Clock()
    assert claim(relay(sessions, "ingest-a", clock)) == [1, 2, 3]
    other = relay(sessions, "ingest-b", clock)
    clock.now += timedelta(seconds=LEASE_S - 1)
    assert claim(other) == []
    clock.now += timedelta(seconds=1)
    assert claim(other) == [1, 2, 3]


def test_a_foreign_live_lease_holds_back_its_slice_only(sessions: sessionmaker[Session]) -> None:
    insert(sessions, 6, shard=0)
    insert(sessions, 3, shard=1)
    clock = Clock()
    first, second = relay(sessions, "a", clock, shard=0), relay(sessions, "b", clock, shard=0)
    assert claim(first) == [1, 2, 3]
    assert claim(second) == [], "rows 4..6 must wait for 1..3"
    assert claim(relay(sessions, "c", clock, shard=1)) == [7, 8, 9], "another slice is not held back"
    first.lease.delivered([1, 2, 3], last=True)
    assert claim(second) == [4, 5, 6]
    assert claim(first) == []


def test_a_claim_delivered_in_parts_holds_its_slice_until_the_last_part(
    sessions: sessionmaker[Session],
) -> None:
    insert(sessions, 6)
    clock = Clock()
    holder, other = relay(sessions, "a", clock), relay(sessions, "b", clock, batch=6)
    assert claim(holder) == [1, 2, 3]
    holder.lease.delivered([1, 2], last=False)  # the claim's first call
    assert stored(sessions) == [3, 4, 5, 6]
    assert claim(other) == [], "never past a's claim on row 3"
    holder.lease.delivered([3], last=True)
    assert lease(sessions) == (None, None)
    assert claim(other) == [4, 5, 6]


def test_a_backoff_holds_back_every_row_of_the_slice(sessions: sessionmaker[Session]) -> None:
    insert(sessions, 6)
    clock = Clock()
    first = relay(sessions, "a", clock)
    assert claim(first) == [1, 2, 3]
    delay = first.postpone([1, 2, 3], attempts=0)  # the send failed
    assert claim(first) == []
    assert claim(relay(sessions, "b", clock)) == []
    assert claim(relay(sessions, "a", clock)) == [], "a restart waits for the backoff too"
    clock.now += timedelta(seconds=delay)
    retried = first.claim()
    assert retried is not None
    assert retried.ids == [1, 2, 3]
    assert retried.attempts == 1
    first.lease.delivered([1, 2, 3], last=True)
    again = first.claim()
    assert again is not None
    assert (again.ids, again.attempts) == ([4, 5, 6], 0), "delivery ends the backoff's count"


def test_a_stale_generation_cannot_delete_or_postpone_after_its_lease_was_taken_over(
    sessions: sessionmaker[Session],
) -> None:
    insert(sessions, 3)
    clock = Clock()
    stale = relay(sessions, "a", clock)
    assert claim(stale) == [1, 2, 3]
    restarted = relay(sessions, "a", clock)  # the same identity, started again
    assert claim(restarted) == [1, 2, 3]
    stale.lease.delivered([1], last=True)
    stale.postpone([2, 3], attempts=0)
    assert stored(sessions) == [1, 2, 3]
    assert lease(sessions) == (restarted.generation, 3)
    # And after a lease ran out and another identity took the rows over.
    clock.now += timedelta(seconds=LEASE_S)
    taker = relay(sessions, "b", clock)
    assert claim(taker) == [1, 2, 3]
    restarted.lease.delivered([1, 2, 3], last=True)
    assert stored(sessions) == [1, 2, 3]
    assert lease(sessions) == (taker.generation, 3)
    taker.lease.delivered([1, 2, 3], last=True)
    assert stored(sessions) == []
    assert lease(sessions) == (None, None)


async def test_a_failed_send_holds_back_the_rows_behind_it_and_order_is_kept(
    sessions: sessionmaker[Session],
) -> None:
    insert(sessions, 20)
    delivered: list[bytes] = []
    failures = 2

    async def send(batch: list[bytes]) -> None:
        nonlocal failures
        if failures and b"0-7" in batch:
            failures -= 1
            raise ConnectionError("downstream away")
        delivered.extend(batch)

    relays = [
        running(sessions, f"replica-{i}", send=send, batch_size=4, backoff_s=(0.05, 0.1)) for i in range(2)
    ]
    await relay_until_sent(relays, 20)
    assert delivered == [f"0-{i}".encode() for i in range(20)]


async def test_a_claim_goes_in_one_call_traced_to_every_batch_that_wrote_it(
    sessions: sessionmaker[Session], span_exporter: InMemorySpanExporter
) -> None:
    """Rows of three upstream batches (three traces) travel in one call: the downstream
    batch is the relay's size, not the upstream's. Its span continues the first batch's
    trace and links to the other two."""
    tracer = trace.get_tracer("test")
    contexts = []
    for b in range(3):
        with tracer.start_as_current_span(f"upstream {b}") as span:
            rows = outbox_rows([f"{b}-{i}".encode() for i in range(4)], T0)
            contexts.append(span.get_span_context())
        with sessions() as session, session.begin():
            session.execute(sa.insert(Outbox), rows)
    calls: list[list[bytes]] = []

    async def send(batch: list[bytes]) -> None:
        calls.append(batch)

    span_exporter.clear()
    relay = running(sessions, "one-call", send=send, batch_size=100, backoff_s=(5, 5))
    await relay_until_sent([relay], 12)
    assert calls == [[f"{b}-{i}".encode() for b in range(3) for i in range(4)]]
    (sent,) = [s for s in span_exporter.get_finished_spans() if s.name == "one-call relay"]
    assert sent.context.trace_id == contexts[0].trace_id
    assert sent.parent is not None
    assert sent.parent.span_id == contexts[0].span_id
    assert [link.context.span_id for link in sent.links] == [c.span_id for c in contexts[1:]]
    assert sent.attributes is not None
    assert sent.attributes["egret.relay.upstream_batches"] == 3


async def test_a_claim_above_the_receivers_request_limit_goes_in_several_calls_in_order(
    sessions: sessionmaker[Session],
) -> None:
    """Rows of 100 bytes, requests of at most 350: calls of 3, 3, 3 and 1 rows. The second
    call fails once: the first call's rows stay delivered, the rest are sent again in order."""
    payloads = [f"{i:03d}".encode().ljust(100, b".") for i in range(10)]
    with sessions() as session, session.begin():
        session.execute(sa.insert(Outbox), outbox_rows(payloads, T0))
    calls: list[list[bytes]] = []
    failures = 1

    async def send(batch: list[bytes]) -> None:
        nonlocal failures
        assert sum(map(len, batch)) <= 350
        calls.append(batch)
        if failures and len(calls) == 2:
            failures -= 1
            raise ConnectionError("downstream away")

    relay = running(sessions, "bounded", send=send, batch_size=100, backoff_s=(0.05, 0.1), max_call_bytes=350)
    await relay_until_sent([relay], 10)
    assert [len(c) for c in calls] == [3, 3, 3, 3, 1]
    assert calls[1] == calls[2] == payloads[3:6]
    assert [p for c in calls[:1] + calls[2:] for p in c] == payloads


async def test_two_relays_on_one_table_deliver_every_row_exactly_once_in_id_order(database_url: str) -> None:
    setup = create_engine(database_url)
    Base.metadata.create_all(setup)
    with setup.begin() as connection:
        payloads = [str(i).encode() for i in range(ROWS)]
        connection.execute(sa.insert(Outbox), outbox_rows(payloads, datetime.now(UTC)))
    setup.dispose()

    delivered: list[bytes] = []
    engines = [create_engine(database_url) for _ in range(2)]

    async def send(batch: list[bytes]) -> None:
        delivered.extend(batch)
        await asyncio.sleep(0)

    relays = [
        running(make_session_factory(engine), f"replica-{i}", send=send, batch_size=7)
        for i, engine in enumerate(engines)
    ]
    try:
        await relay_until_sent(relays, ROWS)  # returns once every relay has stopped: no claim is in flight
    finally:
        for engine in engines:
            engine.dispose()

    assert all(relay.sent > 0 for relay in relays), "both replicas should have taken part"
    counts = Counter(delivered)
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1][:5]
    assert delivered == payloads, "replicas sharing a slice take turns, in id order"
    assert sum(relay.sent for relay in relays) == ROWS


def test_rows_keeping_their_payload_elsewhere_are_claimed_with_it_or_not_at_all(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session, session.begin():
        session.execute(sa.insert(Outbox), outbox_rows([b"", b"own", b""], T0))
    asked: list[list[int]] = []

    def payloads_of(session: Session, ids: list[int]) -> dict[int, bytes]:
        asked.append(ids)
        return {i: f"elsewhere-{i}".encode() for i in ids}

    found = relay(sessions, "a", Clock(), batch=10, payloads_of=payloads_of)
    claimed = found.claim()
    assert claimed is not None
    assert asked == [[1, 3]]
    assert claimed.payloads == [b"elsewhere-1", b"own", b"elsewhere-3"]

    # A row whose payload cannot be found stops the claim: nothing is sent empty or claimed.
    found.lease.delivered([], last=True)  # a's claim given up, its rows not delivered
    lost = relay(sessions, "b", Clock(), batch=10, payloads_of=lambda session, ids: {})
    with pytest.raises(LookupError, match=r"\[1, 3\]"):
        lost.claim()
    assert lease(sessions) == (None, None)
    assert stored(sessions) == [1, 2, 3]
