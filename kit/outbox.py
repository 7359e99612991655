"""The transactional outbox: durable hand-over from one service to the next.

A service writes its outgoing messages into its outbox table in the same transaction
as the state change that produced them, and acknowledges its caller only after that
commit. A relay then sends outbox rows downstream in batches, deleting them only
after the receiver has committed them: at least once on the wire, exactly once in
effect because every receiver is idempotent.

Rows are claimed with a lease (`available_at` pushed past the call deadline), so a
crashed relay's rows come back by themselves and several replicas can share a table
(PostgreSQL claims with SKIP LOCKED). A failed send is retried with capped
exponential backoff and jitter; order is kept because a batch that fails blocks the
rows behind it until it goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import sqlalchemy as sa
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from kit.interceptors import PeerCredentials, open_channel
from kit.logging import get_logger
from kit.settings import PeerSettings, RelaySettings
from kit.tracing import context_from_traceparent, current_traceparent, links_from_traceparents

log = get_logger(__name__)

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class OutboxMixin:
    """Columns of an outbox table; each service declares `class Outbox(Base, OutboxMixin)`."""

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)
    traceparent: Mapped[str] = mapped_column(sa.String(64), default="")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)


def outbox_rows(payloads: Sequence[bytes], now: datetime) -> list[dict[str, object]]:
    """Rows for a bulk insert of `payloads`, carrying the current trace context."""
    traceparent = current_traceparent()
    return [{"payload": p, "traceparent": traceparent, "attempts": 0, "available_at": now} for p in payloads]


@dataclass(frozen=True)
class _Claimed:
    ids: list[int]
    payloads: list[bytes]
    traceparents: list[str]
    attempts: int


Send = Callable[[list[bytes]], Awaitable[None]]

# Above this many upstream batches in one claim, rows travel in a single call.
MAX_CALLS_PER_CLAIM = 16


class OutboxRelay:
    """Moves rows of one outbox table to a downstream service, batch by batch."""

    def __init__(
        self,
        *,
        name: str,
        sessions: sessionmaker[Session],
        table: type[OutboxMixin],
        send: Send,
        settings: RelaySettings,
        lease_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_close: Callable[[], Awaitable[None]] | None = None,
        where: sa.ColumnElement[bool] | None = None,
    ) -> None:
        self._on_close = on_close
        # The slice of the table this relay owns (e.g. one downstream shard's rows), so
        # several relays drain one table side by side and a slow receiver blocks only its own.
        self._where = sa.true() if where is None else where
        self._name = name
        self._sessions = sessions
        self._table = table
        self._send = send
        self._settings = settings
        self._lease = timedelta(seconds=lease_s)
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._tracer = trace.get_tracer("egret.outbox")
        self.sent = 0

    def notify(self) -> None:
        """Wake the relay: new rows were committed. Safe to call from the event loop only."""
        self._wakeup.set()

    def _claim(self) -> _Claimed | None:
        t = self._table
        now = self._clock()
        # One statement selects and leases, so two relays on one database (replicas)
        # never claim the same row: SQLite takes the write lock before the statement
        # reads; PostgreSQL skips rows another claim has locked.
        with self._sessions() as session, session.begin():
            due = (
                sa.select(t.id)
                .where(t.available_at <= now, self._where)
                .order_by(t.id)
                .limit(self._settings.batch_size)
            )
            if session.get_bind().dialect.name == "postgresql":
                due = due.with_for_update(skip_locked=True)
            claim = (
                sa.update(t)
                .where(t.id.in_(due.scalar_subquery()))
                .values(available_at=now + self._lease)
                .returning(t.id, t.payload, t.traceparent, t.attempts)
            )
            rows = sorted(session.execute(claim).all(), key=lambda r: r.id)
            if not rows:
                return None
            ids = [r.id for r in rows]
        return _Claimed(
            ids=ids,
            payloads=[r.payload for r in rows],
            traceparents=[r.traceparent for r in rows],
            attempts=max(r.attempts for r in rows),
        )

    def _delete(self, ids: list[int]) -> None:
        with self._sessions() as session, session.begin():
            session.execute(sa.delete(self._table).where(self._table.id.in_(ids)))

    def _release(self, ids: list[int]) -> None:
        """End the lease of claimed rows that were not sent, so they go out next."""
        with self._sessions() as session, session.begin():
            session.execute(
                sa.update(self._table).where(self._table.id.in_(ids)).values(available_at=self._clock())
            )

    def _postpone(self, ids: list[int], attempts: int) -> float:
        delay: float = min(
            self._settings.backoff_max_s, self._settings.backoff_initial_s * 2.0 ** min(attempts, 30)
        )
        delay *= random.uniform(0.5, 1.0)
        with self._sessions() as session, session.begin():
            session.execute(
                sa.update(self._table)
                .where(self._table.id.in_(ids))
                .values(
                    attempts=self._table.attempts + 1, available_at=self._clock() + timedelta(seconds=delay)
                )
            )
        return delay

    def pending(self) -> int:
        with self._sessions() as session:
            query = sa.select(sa.func.count()).select_from(self._table).where(self._where)
            return int(session.scalar(query) or 0)

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until `stopping` is set; the batch in flight is finished first."""
        try:
            await self._run(stopping)
        finally:
            if self._on_close is not None:
                await self._on_close()

    async def _run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            # Cleared before the claim, so a notify() during the claim is never lost.
            self._wakeup.clear()
            try:
                claimed = await asyncio.to_thread(self._claim)
            except SQLAlchemyError as exc:
                # The database is away (health reports it); keep trying, never die.
                log.warning("relay cannot read its outbox", relay=self._name, error=type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self._settings.backoff_max_s)
                continue
            if claimed is None:
                waits = [asyncio.create_task(self._wakeup.wait()), asyncio.create_task(stopping.wait())]
                await asyncio.wait(
                    waits, timeout=self._settings.poll_interval_s, return_when=asyncio.FIRST_COMPLETED
                )
                for w in waits:
                    w.cancel()
                continue
            await self._relay(claimed, stopping)

    async def _relay(self, claimed: _Claimed, stopping: asyncio.Event) -> None:
        """Send the claimed rows in order, one call per upstream batch, so each batch's trace
        continues downstream. When a claim holds rows of more than MAX_CALLS_PER_CLAIM
        upstream batches (many tiny ones), they go together in one call whose span links
        to every upstream batch, so tiny batches never multiply the calls."""
        runs = _runs(claimed.traceparents)
        if len(runs) > MAX_CALLS_PER_CLAIM:
            runs = [(0, len(claimed.ids))]
        for start, end in runs:
            if not await self._relay_run(claimed, start, end, stopping):
                # Keep order: what follows a failed run waits for it.
                rest = claimed.ids[end:]
                if rest:
                    with contextlib.suppress(SQLAlchemyError):
                        await asyncio.to_thread(self._release, rest)
                return

    async def _relay_run(self, claimed: _Claimed, start: int, end: int, stopping: asyncio.Event) -> bool:
        ids = claimed.ids[start:end]
        traceparents = claimed.traceparents[start:end]
        with self._tracer.start_as_current_span(
            f"{self._name} relay",
            context=context_from_traceparent(traceparents[0]),
            links=links_from_traceparents(traceparents[1:]),
            attributes={"egret.batch.size": len(ids), "egret.relay.attempt": claimed.attempts + 1},
        ) as span:
            try:
                await self._send(claimed.payloads[start:end])
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                try:
                    delay = await asyncio.to_thread(self._postpone, ids, claimed.attempts)
                except SQLAlchemyError:
                    delay = self._settings.backoff_max_s  # the lease brings the rows back
                log.warning(
                    "relay send failed; will retry",
                    relay=self._name,
                    batch=len(ids),
                    attempts=claimed.attempts + 1,
                    retry_in_s=round(delay, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                return False
            try:
                await asyncio.to_thread(self._delete, ids)
            except SQLAlchemyError as exc:
                # Delivered but not deleted: the rows come back when their lease ends and
                # are sent again, which the idempotent receiver absorbs.
                log.warning(
                    "relay could not delete delivered rows", relay=self._name, error=type(exc).__name__
                )
                return False
            self.sent += len(ids)
            log.debug("relayed", relay=self._name, batch=len(ids))
            return True


MakeSend = Callable[[grpc.aio.Channel, float], Send]


def relay_to_peer(
    *,
    name: str,
    sessions: sessionmaker[Session],
    table: type[OutboxMixin],
    peer: PeerSettings,
    settings: RelaySettings,
    make_send: MakeSend,
    credentials: PeerCredentials | None = None,
    where: sa.ColumnElement[bool] | None = None,
) -> OutboxRelay:
    """A relay to another Egret service over its own channel, closed when the relay stops.

    `make_send(channel, deadline_s)` returns the function that delivers one batch of
    payloads with the service's RPC. A claim's lease outlasts the call's deadline, so
    rows are not sent twice by the same relay while a call is still running. `where`
    limits the relay to some of the table's rows (see OutboxRelay).
    """
    channel = open_channel(peer.address, credentials)
    return OutboxRelay(
        name=name,
        sessions=sessions,
        table=table,
        send=make_send(channel, peer.deadline_s),
        settings=settings,
        lease_s=peer.deadline_s * 2,
        on_close=channel.close,
        where=where,
    )


def _runs(traceparents: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive rows written under the same trace context."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(traceparents) + 1):
        if i == len(traceparents) or traceparents[i] != traceparents[start]:
            runs.append((start, i))
            start = i
    return runs
