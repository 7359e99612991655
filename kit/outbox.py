"""The transactional outbox: durable hand-over from one service to the next.

A service writes its outgoing messages into its outbox table in the same transaction
as the state change that produced them, and acknowledges its caller only after that
commit. A relay then sends outbox rows downstream, one call per claim (up to its batch size,
whatever batches wrote the rows), deleting them only after the receiver has committed
them: at least once on the wire, exactly once in effect because every receiver is
idempotent.

Order: within a relay's slice of the table (`where=`, e.g. one rules shard's rows; the
whole table by default), rows are delivered in id order, across restarts and across
replicas sharing the slice. A relay claims the slice's lease and, with it, a prefix of
the slice in id order; nobody else claims while the lease is held (until it ends) or
while the slice's head waits in backoff after a failed send. Claims and every other
change to a lease are serialised (PostgreSQL: an advisory lock per table and slice;
SQLite: the write lock is taken before reading). Rows are only inserted and deleted;
the lease is one small row per slice (kit.outbox_lease, kit.outbox_table).

Each relay has an identity (`instance`, EGRET_INSTANCE: stable across restarts of one
replica, unique across replicas) and a generation (fresh per start), recorded on the
lease it holds. A restarted relay takes over its identity's earlier lease at once; a
replica that is gone for good holds its lease until it ends. Deletes and postpones
change nothing unless the relay's own generation still holds the lease, checked in
their transaction. A relay gives the lease up once its claim is delivered, so replicas
sharing a slice take turns. Two live replicas given one identity (a misconfiguration)
take each other's leases: rows go out more than once and order is no longer
guaranteed; the relay warns when its lease was taken over. Details in
docs/architecture.md ("Flow and delivery").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import grpc
import sqlalchemy as sa
from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from kit.errors import Unavailable
from kit.interceptors import PeerCredentials, open_channel
from kit.logging import get_logger
from kit.metrics import gauge, meter
from kit.outbox_lease import Claim, PayloadsOf, SliceLease
from kit.outbox_table import BigId, OutboxLeaseMixin, OutboxMixin, outbox_rows
from kit.settings import PeerSettings, RelaySettings
from kit.tracing import context_from_traceparent, links_from_traceparents

# What a service declares its outbox with, and writes its rows with (kit.outbox_table).
__all__ = [
    "BigId",
    "MakeSend",
    "OutboxLeaseMixin",
    "OutboxMixin",
    "OutboxRelay",
    "PayloadsOf",
    "Send",
    "outbox_rows",
    "relay_to_peer",
]

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

Send = Callable[[list[bytes]], Awaitable[None]]

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
        leases: type[OutboxLeaseMixin],
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
        self.generation = uuid.uuid4().hex
        # No identity given: a fresh one per start, so a restart waits for the lease.
        self.instance = instance or f"anonymous-{self.generation}"
        self._name = name
        # The slice of the table this relay owns (e.g. one downstream shard's rows), so
        # several relays drain one table side by side and a slow receiver blocks only its own.
        # Relays that share rows must share the same slice: order is kept per slice.
        self.lease = SliceLease(
            name=name,
            sessions=sessions,
            table=table,
            leases=leases,
            where=sa.true() if where is None else where,
            instance=self.instance,
            generation=self.generation,
            lease_s=lease_s,
            clock=clock,
            payloads_of=payloads_of,
        )
        self._send = send
        self._settings = settings
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

    def claim(self) -> Claim | None:
        return self.lease.claim(self._settings.batch_size)

    def postpone(self, ids: list[int], attempts: int) -> float:
        """After a failed send of `ids` (the claim's unsent rows): the slice's head waits for
        a capped, jittered exponential backoff, for every relay of the slice; the delay."""
        delay: float = min(
            self._settings.backoff_max_s, self._settings.backoff_initial_s * 2.0 ** min(attempts, 30)
        )
        delay *= random.uniform(0.5, 1.0)
        self.lease.postpone(ids, self._clock() + timedelta(seconds=delay))
        return delay

    def pending(self) -> int:
        return self.lease.pending()

    async def _refresh_backlog(self) -> None:
        """Count the backlog for the gauges, at most every BACKLOG_REFRESH_S."""
        now = asyncio.get_running_loop().time()
        if now - self._backlog_counted < BACKLOG_REFRESH_S:
            return
        self._backlog_counted = now
        with contextlib.suppress(*_STORE_AWAY):
            self.backlog = await asyncio.to_thread(self.lease.backlog)

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
                claimed = await asyncio.to_thread(self.claim)
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

    async def _relay(self, claimed: Claim, stopping: asyncio.Event) -> None:
        """Send a claim's rows in one call, whatever upstream batches wrote them: the
        downstream batch is the relay's, not the size a department happened to send (client
        batches of 100 cost the pipeline twice the CPU per event when each went on alone:
        docs/benchmarks.md). A claim larger than the receiver's largest request goes in
        several calls, in order. Each call's span continues the trace of the first upstream
        batch it carries and links to the others', so every batch is followed to the end."""
        for start, end in _calls(claimed.payloads, self._max_call_bytes):
            if not await self._relay_call(claimed, start, end, stopping):
                return

    async def _relay_call(self, claimed: Claim, start: int, end: int, stopping: asyncio.Event) -> bool:
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
                    delay = await asyncio.to_thread(self.postpone, claimed.ids[start:], claimed.attempts)
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
                await asyncio.to_thread(self.lease.delivered, ids, last=end == len(claimed.ids))
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
    leases: type[OutboxLeaseMixin],
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
        leases=leases,
        send=make_send(channel, peer.deadline_s),
        settings=settings,
        lease_s=peer.deadline_s * 2,
        instance=instance,
        on_close=channel.close,
        where=where,
        max_call_bytes=max_call_bytes,
        payloads_of=payloads_of,
    )
