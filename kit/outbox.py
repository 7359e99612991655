"""The transactional outbox: durable hand-over from one service to the next.

A service writes its outgoing messages into its outbox table in the same transaction
as the state change that produced them, and acknowledges its caller only after that
commit. A relay then sends outbox rows downstream, one call per claim (up to its batch size,
whatever batches wrote the rows), deleting them only after the receiver has committed
them: at least once on the wire, exactly once in effect because every receiver is
idempotent.

Order: within a relay's slice of the table (`where=`, e.g. one rules shard's rows; the
whole table by default), rows are delivered in id order, across restarts and across
replicas sharing the slice. A claim is always a prefix of the slice in id order, up to
the first row that is blocked: claimed by another live relay (until its lease ends) or
waiting in backoff after a failed send. Claims on one slice are serialised (PostgreSQL:
an advisory lock per table and slice; SQLite: the write lock is taken before reading).

Each relay has an identity (`instance`, EGRET_INSTANCE: stable across restarts of one
replica, unique across replicas) and a generation (fresh per start), recorded on the
rows it claims. A restarted relay takes over its identity's earlier claims at once; a
replica that is gone for good holds its claims until their lease ends. Deletes and
postpones touch only rows still claimed by the relay's own generation.
Two live replicas given one identity (a misconfiguration) take each other's claims:
rows go out more than once and order is no longer guaranteed; the relay warns when
its rows were taken over. Details in docs/architecture.md ("Flow and delivery").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

import grpc
import sqlalchemy as sa
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from kit.db import as_utc
from kit.errors import Unavailable
from kit.interceptors import PeerCredentials, open_channel
from kit.logging import get_logger
from kit.metrics import gauge, meter
from kit.settings import PeerSettings, RelaySettings
from kit.tracing import context_from_traceparent, current_traceparent, links_from_traceparents

# The outbox's database is away, or refuses this instance for now (kit.rekey's guard while
# subject keys move to another generation): the relay waits and tries again, never dies.
_STORE_AWAY = (SQLAlchemyError, Unavailable)

log = get_logger(__name__)

_meter = meter("egret.outbox")
_sent = _meter.create_counter("egret.outbox.sent", unit="{row}", description="Rows delivered downstream")
_failures = _meter.create_counter(
    "egret.outbox.send.failures", unit="{call}", description="Sends that failed (the rows wait in backoff)"
)
_retries = _meter.create_counter(
    "egret.outbox.retries", unit="{row}", description="Rows sent again after a failed send"
)
# The relays of this process, for the waiting and lag gauges (read from their last refresh).
_relays: list[OutboxRelay] = []


def _waiting() -> dict[tuple[tuple[str, str], ...], float]:
    return {(("outbox", r.label),): float(r.backlog[0]) for r in _relays if r.backlog is not None}


def _oldest_age() -> dict[tuple[tuple[str, str], ...], float]:
    now = datetime.now(UTC)
    ages: dict[tuple[tuple[str, str], ...], float] = {}
    for relay in _relays:
        if relay.backlog is not None:
            oldest = relay.backlog[1]
            ages[(("outbox", relay.label),)] = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
    return ages


gauge(_meter, "egret.outbox.waiting", _waiting, unit="{row}", description="Rows not yet delivered")
gauge(
    _meter,
    "egret.outbox.oldest_age",
    _oldest_age,
    unit="s",
    description="Age of the oldest undelivered row: the pipeline's lag at this hop",
)
# How often each relay counts its backlog for the gauges (one indexed count per interval).
BACKLOG_REFRESH_S = 5.0

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class OutboxMixin:
    """Columns of an outbox table; each service declares `class Outbox(Base, OutboxMixin)`."""

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)
    traceparent: Mapped[str] = mapped_column(sa.String(64), default="")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    # When the row may be claimed: its lease's end while claimed, its retry time in backoff.
    available_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)
    # The relay identity and generation holding the row's claim; NULL when unclaimed.
    claimed_by: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    claim_generation: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    # When the row was written: the lag gauge's start (NULL for rows older than the column).
    created_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True), default=None)


def outbox_rows(payloads: Sequence[bytes], now: datetime) -> list[dict[str, object]]:
    """Rows for a bulk insert of `payloads`, carrying the current trace context."""
    traceparent = current_traceparent()
    return [
        {"payload": p, "traceparent": traceparent, "attempts": 0, "available_at": now, "created_at": now}
        for p in payloads
    ]


@dataclass(frozen=True)
class RowState:
    """What the claim rule reads of one outbox row."""

    id: int
    claimed_by: str | None
    claim_generation: str | None
    available_at: datetime


def claimable_prefix(rows: Sequence[RowState], *, instance: str, generation: str, now: datetime) -> list[int]:
    """Ids a relay may claim from the head of its slice (`rows`, in id order): the longest
    prefix of rows that are due (free, lease over, backoff over) or claimed by an earlier
    generation of this same identity (a restart takes its own claims over at once). The
    first row claimed by someone else, or by this generation, or in backoff, ends it, so
    no row is ever sent while an earlier row of the slice is held back."""
    ids: list[int] = []
    for row in rows:
        own_earlier_claim = row.claimed_by == instance and row.claim_generation != generation
        if not (own_earlier_claim or as_utc(row.available_at) <= now):
            break
        ids.append(row.id)
    return ids


@dataclass(frozen=True)
class _Claimed:
    ids: list[int]
    payloads: list[bytes]
    traceparents: list[str]
    attempts: int


Send = Callable[[list[bytes]], Awaitable[None]]
# For an outbox whose rows may keep their payload in another table (rules' outcomes): the
# payloads of the claimed rows `ids` whose own payload is empty, read in the claim's transaction.
PayloadsOf = Callable[[Session, list[int]], Mapping[int, bytes]]

# A relay call's span links to at most this many upstream batches besides its parent
# (OpenTelemetry's default span link limit).
MAX_LINKS = 128


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
        instance: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_close: Callable[[], Awaitable[None]] | None = None,
        where: sa.ColumnElement[bool] | None = None,
        max_call_bytes: int | None = None,
        payloads_of: PayloadsOf | None = None,
    ) -> None:
        self._on_close = on_close
        # The receiver's largest request: a claim above it goes in several calls.
        self._max_call_bytes = max_call_bytes
        self._payloads_of = payloads_of
        # The slice of the table this relay owns (e.g. one downstream shard's rows), so
        # several relays drain one table side by side and a slow receiver blocks only its own.
        # Relays that share rows must share the same slice: order is kept per slice.
        self._where = sa.true() if where is None else where
        self._slice_lock = _slice_lock_key(table, self._where)
        self.generation = uuid.uuid4().hex
        # No identity given: a fresh one per start, so a restart waits for the lease.
        self.instance = instance or f"anonymous-{self.generation}"
        self._name = name
        self._sessions = sessions
        # Statements on the Core table: through the mapped class every one would take the
        # ORM's compile and bulk paths (about a tenth of ingest's CPU in the relay).
        self._core = cast(sa.Table, sa.inspect(table).local_table)
        self._send = send
        self._settings = settings
        self._lease = timedelta(seconds=lease_s)
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._tracer = trace.get_tracer("egret.outbox")
        self.sent = 0
        # The metrics' name of this hop (ASCII: ingest-to-rules-0), and its last counted
        # backlog: rows waiting and the oldest one's write time.
        self.label = name.replace("→", "-to-")
        self.backlog: tuple[int, datetime | None] | None = None
        self._backlog_counted = 0.0
        self._labels = {"outbox": self.label}
        for counter in (_sent, _failures, _retries):
            counter.add(0, self._labels)  # exported from the start, not from the first event
        _relays.append(self)

    def notify(self) -> None:
        """Wake the relay: new rows were committed. Safe to call from the event loop only."""
        self._wakeup.set()

    def _claim(self) -> _Claimed | None:
        t = self._core.c
        with self._sessions() as session, session.begin():
            self._serialise_claims(session)
            # Read after the lock, so the state every earlier claim committed is seen.
            now = self._clock()
            head = session.execute(
                sa.select(t.id, t.claimed_by, t.claim_generation, t.available_at)
                .where(self._where)
                .order_by(t.id)
                .limit(self._settings.batch_size)
            ).all()
            ids = claimable_prefix(
                [RowState(*row) for row in head], instance=self.instance, generation=self.generation, now=now
            )
            if not ids:
                return None
            claim = (
                sa.update(self._core)
                .where(t.id.in_(ids))
                .values(
                    claimed_by=self.instance, claim_generation=self.generation, available_at=now + self._lease
                )
                .returning(t.id, t.payload, t.traceparent, t.attempts)
            )
            # A row missing here was deleted by the relay whose expired claim this one took
            # over, after it delivered the row: the rest is still a prefix of what is unsent.
            rows = sorted(session.execute(claim).all(), key=lambda r: r.id)
            if not rows:
                return None
            payloads = [r.payload for r in rows]
            elsewhere = [r.id for r in rows if not r.payload]
            if elsewhere and self._payloads_of is not None:
                found = self._payloads_of(session, elsewhere)
                if missing := [i for i in elsewhere if i not in found]:
                    # Never sent empty: the relay stops loudly rather than lose the rows.
                    raise LookupError(f"{self._name}: outbox rows {missing} have no payload")
                payloads = [found.get(r.id, r.payload) for r in rows]
        return _Claimed(
            ids=[r.id for r in rows],
            payloads=payloads,
            traceparents=[r.traceparent for r in rows],
            attempts=max(r.attempts for r in rows),
        )

    def _serialise_claims(self, session: Session) -> None:
        """Make this transaction the only claim on the slice until it ends."""
        if session.get_bind().dialect.name == "postgresql":
            # Read and update below run in READ COMMITTED after the lock, so each claim sees
            # every earlier one committed. (One UPDATE with subqueries would not: after
            # waiting on a row lock PostgreSQL does not re-evaluate its subqueries.)
            session.execute(sa.select(sa.func.pg_advisory_xact_lock(self._slice_lock)))
        else:
            # A write that matches nothing takes SQLite's write lock before anything is read.
            session.execute(sa.update(self._core).where(sa.false()).values(id=self._core.c.id))

    def _mine(self, ids: list[int]) -> sa.ColumnElement[bool]:
        """Rows of `ids` still claimed by this generation: the fence on every change after a
        send, so a relay whose claim was taken over never deletes or frees another's rows."""
        c = self._core.c
        return sa.and_(c.id.in_(ids), c.claim_generation == self.generation)

    def _changed(self, statement: sa.Delete | sa.Update, ids: list[int], what: str) -> None:
        with self._sessions() as session, session.begin():
            result = session.execute(statement)
        changed = int(getattr(result, "rowcount", len(ids)))
        if changed < len(ids):
            # Only when this relay's lease ran out, or when two live replicas share one identity.
            log.warning(
                "relay rows were taken over by another relay",
                relay=self._name,
                instance=self.instance,
                rows=len(ids) - changed,
                action=what,
            )

    def _delete(self, ids: list[int]) -> None:
        self._changed(sa.delete(self._core).where(self._mine(ids)), ids, "delete")

    def _postpone(self, ids: list[int], attempts: int) -> float:
        """Free rows whose send failed, due again after a backoff; until then they hold back
        every later row of the slice, whichever relay would claim it."""
        delay: float = min(
            self._settings.backoff_max_s, self._settings.backoff_initial_s * 2.0 ** min(attempts, 30)
        )
        delay *= random.uniform(0.5, 1.0)
        backoff = {
            "claimed_by": None,
            "claim_generation": None,
            "attempts": self._core.c.attempts + 1,
            "available_at": self._clock() + timedelta(seconds=delay),
        }
        self._changed(sa.update(self._core).where(self._mine(ids)).values(backoff), ids, "postpone")
        return delay

    def pending(self) -> int:
        with self._sessions() as session:
            query = sa.select(sa.func.count()).select_from(self._core).where(self._where)
            return int(session.scalar(query) or 0)

    def _count_backlog(self) -> None:
        t = self._core.c
        with self._sessions() as session:
            count, oldest = session.execute(
                sa.select(sa.func.count(), sa.func.min(sa.func.coalesce(t.created_at, t.available_at))).where(
                    self._where
                )
            ).one()
        self.backlog = (int(count or 0), as_utc(oldest) if oldest is not None else None)

    async def _refresh_backlog(self) -> None:
        """Count the backlog for the gauges, at most every BACKLOG_REFRESH_S."""
        now = asyncio.get_running_loop().time()
        if now - self._backlog_counted < BACKLOG_REFRESH_S:
            return
        self._backlog_counted = now
        with contextlib.suppress(*_STORE_AWAY):
            await asyncio.to_thread(self._count_backlog)

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until `stopping` is set; the batch in flight is finished first."""
        log.info("relay starting", relay=self._name, instance=self.instance, generation=self.generation)
        try:
            await self._run(stopping)
        finally:
            with contextlib.suppress(ValueError):
                _relays.remove(self)
            if self._on_close is not None:
                await self._on_close()

    async def _run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._refresh_backlog()
            # Cleared before the claim, so a notify() during the claim is never lost.
            self._wakeup.clear()
            try:
                claimed = await asyncio.to_thread(self._claim)
            except _STORE_AWAY as exc:
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
        """Send a claim's rows in one call, whatever upstream batches wrote them: the
        downstream batch is the relay's, not the size a department happened to send (client
        batches of 100 cost the pipeline twice the CPU per event when each went on alone:
        docs/benchmarks.md). A claim larger than the receiver's largest request goes in
        several calls, in order. Each call's span continues the trace of the first upstream
        batch it carries and links to the others', so every batch is followed to the end."""
        for start, end in _calls(claimed.payloads, self._max_call_bytes):
            if not await self._relay_call(claimed, start, end, stopping):
                return

    async def _relay_call(self, claimed: _Claimed, start: int, end: int, stopping: asyncio.Event) -> bool:
        """One call of rows [start, end) of a claim; on a failed send this and every later
        row of the claim wait for a backoff (false: the claim's other calls are not sent)."""
        ids = claimed.ids[start:end]
        traceparents = list(dict.fromkeys(claimed.traceparents[start:end]))
        with self._tracer.start_as_current_span(
            f"{self._name} relay",
            context=context_from_traceparent(traceparents[0]),
            links=links_from_traceparents(traceparents[1 : MAX_LINKS + 1]),
            attributes={
                "egret.batch.size": len(ids),
                "egret.relay.attempt": claimed.attempts + 1,
                "egret.relay.upstream_batches": len(traceparents),
            },
        ) as span:
            if claimed.attempts:
                _retries.add(len(ids), self._labels)
            try:
                await self._send(claimed.payloads[start:end])
            except Exception as exc:
                _failures.add(1, self._labels)
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                try:
                    delay = await asyncio.to_thread(self._postpone, claimed.ids[start:], claimed.attempts)
                except _STORE_AWAY:
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
            except _STORE_AWAY as exc:
                # Delivered but not deleted: the rows come back when their lease ends and
                # are sent again, which the idempotent receiver absorbs.
                log.warning(
                    "relay could not delete delivered rows", relay=self._name, error=type(exc).__name__
                )
                return False
            self.sent += len(ids)
            _sent.add(len(ids), self._labels)
            log.debug("relayed", relay=self._name, batch=len(ids))
            return True


def _calls(payloads: Sequence[bytes], max_bytes: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive rows whose merged request stays within `max_bytes`
    (a request merged from one-item requests is their concatenation); a row above it alone
    goes in a call of its own, which the receiver refuses, as it would any such row."""
    if max_bytes is None:
        return [(0, len(payloads))] if payloads else []
    calls: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, payload in enumerate(payloads):
        if i > start and size + len(payload) > max_bytes:
            calls.append((start, i))
            start, size = i, 0
        size += len(payload)
    if payloads:
        calls.append((start, len(payloads)))
    return calls


MakeSend = Callable[[grpc.aio.Channel, float], Send]


def relay_to_peer(
    *,
    name: str,
    sessions: sessionmaker[Session],
    table: type[OutboxMixin],
    peer: PeerSettings,
    settings: RelaySettings,
    make_send: MakeSend,
    instance: str,
    credentials: PeerCredentials | None = None,
    where: sa.ColumnElement[bool] | None = None,
    max_call_bytes: int | None = None,
    payloads_of: PayloadsOf | None = None,
) -> OutboxRelay:
    """A relay to another Egret service over its own channel, closed when the relay stops.

    `make_send(channel, deadline_s)` returns the function that delivers one batch of
    payloads with the service's RPC. A claim's lease outlasts the call's deadline, so
    rows are not sent twice by the same relay while a call is still running. `where`
    limits the relay to some of the table's rows and `instance` is the relay's identity
    (see OutboxRelay and the module docstring). `max_call_bytes`: the receiver's largest
    request (EGRET_MAX_MESSAGE_BYTES, which a deployment gives every service alike);
    `payloads_of` reads the payloads rows keep elsewhere (PayloadsOf).
    """
    channel = open_channel(peer.address, credentials)
    return OutboxRelay(
        name=name,
        sessions=sessions,
        table=table,
        send=make_send(channel, peer.deadline_s),
        settings=settings,
        lease_s=peer.deadline_s * 2,
        instance=instance,
        on_close=channel.close,
        where=where,
        max_call_bytes=max_call_bytes,
        payloads_of=payloads_of,
    )


def _slice_lock_key(table: type[OutboxMixin], where: sa.ColumnElement[bool]) -> int:
    """The PostgreSQL advisory lock of one table and slice, the same in every replica."""
    condition = where.compile(compile_kwargs={"literal_binds": True})
    name = f"egret.outbox|{sa.inspect(table).local_table}|{condition}".encode()
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)
