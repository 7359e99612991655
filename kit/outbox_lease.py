"""A relay's lease on its slice of an outbox table: what it may claim, and the fenced changes
after a send (the guarantees are stated in kit.outbox's docstring).

One lease row per slice (kit.outbox_table.OutboxLeaseMixin) says who is sending the slice's
head, until when, and how many sends of the head have failed. A claim takes the lease (free,
ended, or held by an earlier generation of the claimer's own identity) and reads the
slice's first rows in id order; the rows themselves are never updated. Every change to a
lease runs after the slice's claims are serialised (PostgreSQL: an advisory lock per table
and slice; SQLite: the write lock, taken before anything is read), so each sees every
earlier one committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from kit.db import as_utc
from kit.logging import get_logger
from kit.outbox_table import MAX_SLICE_LENGTH, OutboxLeaseMixin, OutboxMixin

log = get_logger(__name__)

# For an outbox whose rows may keep their payload in another table (rules' outcomes): the
# payloads of the claimed rows `ids` whose own payload is empty, read in the claim's transaction.
PayloadsOf = Callable[[Session, list[int]], Mapping[int, bytes]]


@dataclass(frozen=True)
class LeaseState:
    """What the claim rule reads of a slice's lease."""

    holder: str | None
    generation: str | None
    until: datetime


def may_take(lease: LeaseState | None, *, instance: str, generation: str, now: datetime) -> bool:
    """Whether a relay may claim the slice: nobody leased it yet, its lease or backoff is
    over, or an earlier generation of this same identity holds it (a restart takes its own
    lease over at once). A live lease of another identity, or of this generation (its
    claim is in flight), or a backoff not yet over, holds every row of the slice back."""
    if lease is None:
        return True
    own_earlier = lease.holder == instance and lease.generation != generation
    return own_earlier or as_utc(lease.until) <= now


@dataclass(frozen=True)
class Claim:
    """The head of a slice, taken with its lease: ids in order, their payloads and trace
    contexts, and the failed sends of the head so far."""

    ids: list[int]
    payloads: list[bytes]
    traceparents: list[str]
    attempts: int


class SliceLease:
    """The database side of one relay: its slice's lease, claims and deletes."""

    def __init__(
        self,
        *,
        name: str,
        sessions: sessionmaker[Session],
        table: type[OutboxMixin],
        leases: type[OutboxLeaseMixin],
        where: sa.ColumnElement[bool],
        instance: str,
        generation: str,
        lease_s: float,
        clock: Callable[[], datetime],
        payloads_of: PayloadsOf | None,
    ) -> None:
        self._name = name
        self._sessions = sessions
        # Statements on the Core tables: through the mapped classes every one would take the
        # ORM's compile and bulk paths (about a tenth of ingest's CPU in the relay).
        self._rows = cast(sa.Table, sa.inspect(table).local_table)
        self._leases = cast(sa.Table, sa.inspect(leases).local_table)
        self._where = where
        self._slice = str(where.compile(compile_kwargs={"literal_binds": True}))
        if len(self._slice) > MAX_SLICE_LENGTH:
            raise ValueError(f"{name}: a slice's condition is at most {MAX_SLICE_LENGTH} characters")
        self._lock = _lock_key(self._rows, self._slice)
        self._instance = instance
        self._generation = generation
        self._lease = timedelta(seconds=lease_s)
        self._clock = clock
        self._payloads_of = payloads_of

    def claim(self, batch_size: int) -> Claim | None:
        """Take the slice's lease and its first `batch_size` rows, or None when the slice is
        empty or held back."""
        t, lease = self._rows.c, self._leases.c
        with self._sessions() as session, session.begin():
            self._serialise(session)
            # Read after the lock, so the state every earlier claim committed is seen.
            now = self._clock()
            found = session.execute(
                sa.select(lease.holder, lease.generation, lease.until, lease.attempts).where(
                    lease.slice == self._slice
                )
            ).one_or_none()
            state = None if found is None else LeaseState(found.holder, found.generation, found.until)
            if not may_take(state, instance=self._instance, generation=self._generation, now=now):
                return None
            rows = session.execute(
                sa.select(t.id, t.payload, t.traceparent).where(self._where).order_by(t.id).limit(batch_size)
            ).all()
            if not rows:
                return None
            held = {
                "holder": self._instance,
                "generation": self._generation,
                "claimed_through": rows[-1].id,
                "until": now + self._lease,
            }
            if found is None:
                session.execute(sa.insert(self._leases).values(slice=self._slice, attempts=0, **held))
            else:
                session.execute(sa.update(self._leases).where(lease.slice == self._slice).values(held))
            payloads = self._payloads(session, rows)
        return Claim(
            ids=[r.id for r in rows],
            payloads=payloads,
            traceparents=[r.traceparent for r in rows],
            attempts=0 if found is None else found.attempts,
        )

    def _payloads(self, session: Session, rows: Sequence[Any]) -> list[bytes]:
        payloads = [r.payload for r in rows]
        elsewhere = [r.id for r in rows if not r.payload]
        if not elsewhere or self._payloads_of is None:
            return payloads
        found = self._payloads_of(session, elsewhere)
        if missing := [i for i in elsewhere if i not in found]:
            # Never sent empty: the relay stops loudly rather than lose the rows (and the
            # claim's transaction rolls back: the lease is not taken).
            raise LookupError(f"{self._name}: outbox rows {missing} have no payload")
        return [found.get(r.id, r.payload) for r in rows]

    def delivered(self, ids: list[int], *, last: bool) -> None:
        """Delete delivered rows, if this generation still holds the lease; with the claim's
        `last` rows, the lease is given up, so any relay of the slice claims next."""
        with self._sessions() as session, session.begin():
            if not self._still_held(session, ids, "delete"):
                return
            session.execute(sa.delete(self._rows).where(self._rows.c.id.in_(ids)))
            if last:
                self._free(session, until=self._clock(), attempts=0)

    def postpone(self, ids: list[int], retry_at: datetime) -> None:
        """After a failed send: the slice's head (`ids` first) waits until `retry_at`, for
        every relay of the slice, this one's restarts included."""
        with self._sessions() as session, session.begin():
            if self._still_held(session, ids, "postpone"):
                self._free(session, until=retry_at, attempts=self._leases.c.attempts + 1)

    def _still_held(self, session: Session, ids: list[int], action: str) -> bool:
        """Whether this generation holds the lease: the fence on every change after a send,
        so a relay whose lease was taken over never deletes or postpones its successor's rows."""
        self._serialise(session)
        lease = self._leases.c
        holder = session.scalar(sa.select(lease.generation).where(lease.slice == self._slice))
        if holder == self._generation:
            return True
        # Only when this relay's lease ran out, or when two live replicas share one identity.
        log.warning(
            "relay rows were taken over by another relay",
            relay=self._name,
            instance=self._instance,
            rows=len(ids),
            action=action,
        )
        return False

    def _free(self, session: Session, *, until: datetime, attempts: object) -> None:
        """Give the lease up: any relay of the slice may claim once `until` has passed."""
        session.execute(
            sa.update(self._leases)
            .where(self._leases.c.slice == self._slice)
            .values(holder=None, generation=None, claimed_through=None, until=until, attempts=attempts)
        )

    def _serialise(self, session: Session) -> None:
        """Make this transaction the only change to the slice's lease until it ends."""
        if session.get_bind().dialect.name == "postgresql":
            # Reads and writes below run in READ COMMITTED after the lock, so each sees
            # every earlier change committed.
            session.execute(sa.select(sa.func.pg_advisory_xact_lock(self._lock)))
        else:
            # A write that matches nothing takes SQLite's write lock before anything is read.
            session.execute(sa.update(self._leases).where(sa.false()).values(slice=self._leases.c.slice))

    def pending(self) -> int:
        with self._sessions() as session:
            query = sa.select(sa.func.count()).select_from(self._rows).where(self._where)
            return int(session.scalar(query) or 0)

    def backlog(self) -> tuple[int, datetime | None]:
        """Rows of the slice waiting, and the oldest one's write time."""
        t = self._rows.c
        with self._sessions() as session:
            count, oldest = session.execute(
                sa.select(sa.func.count(), sa.func.min(sa.func.coalesce(t.created_at, t.available_at))).where(
                    self._where
                )
            ).one()
        return int(count or 0), as_utc(oldest) if oldest is not None else None


def _lock_key(table: sa.Table, slice_: str) -> int:
    """The PostgreSQL advisory lock of one table and slice, the same in every replica."""
    name = f"egret.outbox|{table}|{slice_}".encode()
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)
