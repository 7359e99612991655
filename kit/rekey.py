"""Moving stored subject keys to the current key generation, and keeping instances of an
older generation from writing while it happens (docs/security.md, "Rotating the subject key").

Every table that stores a subject key stores its generation next to it (`subject_key_id`;
NULL in rows written before generations were recorded, which are of the root generation).
One row per database, the *generation marker*, says which generation the stored keys are
in and whether the move to it is complete. The re-keying job:

1. sets the marker to (current, incomplete): from then on every instance whose current
   generation is not the marker's, or that finds it incomplete, refuses each transaction
   with UNAVAILABLE (`GenerationGuard`), so its callers (outbox relays, departments' clients)
   retry until an instance of the current generation serves them;
2. waits `settle_s` for transactions begun before the marker changed to end;
3. moves every row of an older generation, a batch per transaction, each row by a
   conditional UPDATE (a row another job moved already is skipped), appending one record per
   batch to the service's audit chain; a killed job resumes where it stopped, since moved
   rows are of the current generation;
4. sets the marker complete.

No instance writes a key of one generation while rows of another remain, so no subject is
ever split over two keys in one database. Keys in flight between services carry their
generation and are moved forward on arrival (`Pseudonymiser.forward`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from egret.common.v1 import event_pb2, outcome_pb2
from kit import audit
from kit.errors import Unavailable
from kit.logging import get_logger
from kit.pseudonym import Pseudonymiser

log = get_logger(__name__)

_MARKER_ID = 1
ACTOR = "rekey-job"


class GenerationMixin:
    """The generation marker's one row; each service names the table `<service>_subject_key_generation`."""

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(sa.String(32))
    complete: Mapped[bool] = mapped_column(sa.Boolean)
    changed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


# Writes the subject key and its generation into a stored message (a serialized
# RecordedEvent or Outcome that carries them), returning the new bytes.
Rewrite = Callable[[bytes, str, str], bytes]


def rewrite_recorded_event(payload: bytes, key: str, key_id: str) -> bytes:
    """A stored RecordedEvent with its subject key moved."""
    event = event_pb2.RecordedEvent.FromString(payload)
    event.subject_key, event.subject_key_id = key, key_id
    return event.SerializeToString(deterministic=True)


def rewrite_outcome(payload: bytes, key: str, key_id: str) -> bytes:
    """A stored Outcome with its subject key moved, and the key of every event in its evidence."""
    outcome = outcome_pb2.Outcome.FromString(payload)
    outcome.subject_key, outcome.subject_key_id = key, key_id
    for event in outcome.events:
        event.subject_key, event.subject_key_id = key, key_id
    return outcome.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class KeyedColumn:
    """A table column holding subject keys and the column holding their generation; with
    `payload`, also a column of serialized messages that embed the same key, which
    `rewrite` moves with it (a stored copy must not keep the old key)."""

    table: sa.Table
    key: str = "subject_key"
    key_id: str = "subject_key_id"
    payload: str | None = None
    rewrite: Rewrite | None = None

    def __post_init__(self) -> None:
        if (self.payload is None) != (self.rewrite is None):
            raise ValueError("a payload column needs its rewrite, and a rewrite its payload column")


@dataclass(frozen=True)
class KeyedStore:
    """What a service's database holds under subject keys: the marker model, every keyed
    column, and the audit chain (log and head models) the job records its batches in."""

    generation: Any
    columns: Sequence[KeyedColumn]
    audit_log: Any
    audit_head: Any


class StaleKeyGeneration(Unavailable):
    """This instance's key generation is not the one the database is in (or moving to)."""


def read_marker(connection: Connection | Session, generation: Any) -> tuple[str, bool] | None:
    row = connection.execute(
        sa.select(generation.key_id, generation.complete).where(generation.id == _MARKER_ID)
    ).one_or_none()
    return None if row is None else (str(row[0]), bool(row[1]))


class GenerationGuard:
    """Refuses every transaction of an instance of another generation than the marker's,
    or while the move to it is incomplete. The marker is read at most once per
    `interval_s` while it matches (one primary-key read per interval, not per transaction)."""

    def __init__(self, generation: Any, key_id: str, *, interval_s: float = 1.0) -> None:
        self._generation = generation
        self._key_id = key_id
        self._interval_s = interval_s
        self._checked_at = float("-inf")

    def install(self, sessions: sessionmaker[Session]) -> None:
        sa.event.listen(sessions, "after_begin", self._after_begin)

    def _after_begin(self, _session: Session, _transaction: Any, connection: Connection) -> None:
        now = time.monotonic()
        if now - self._checked_at < self._interval_s:
            return
        marker = read_marker(connection, self._generation)
        if marker is not None and marker != (self._key_id, True):
            stored, complete = marker
            raise StaleKeyGeneration(
                f"subject keys are being moved to generation {stored!r}; this instance writes "
                f"{self._key_id!r}: retry"
                if not complete
                else f"stored subject keys are of generation {stored!r}, this instance's are "
                f"{self._key_id!r}: retry against an instance of the current settings"
            )
        self._checked_at = now


@dataclass(frozen=True)
class RekeyResult:
    moved: int
    generation: str


def _set_marker(connection: Connection, generation: Any, key_id: str, complete: bool) -> None:
    values = {"key_id": key_id, "complete": complete, "changed_at": datetime.now(UTC)}
    updated = connection.execute(
        sa.update(generation).where(generation.id == _MARKER_ID).values(**values)
    ).rowcount
    if not updated:
        connection.execute(sa.insert(generation).values(id=_MARKER_ID, **values))


def needs_rekey(engine: Engine, store: KeyedStore, pseudonymiser: Pseudonymiser) -> bool:
    """True unless the marker says every stored key is of the current generation. A
    database without a marker (new, or from before generations) is of the root generation.
    StaleKeyGeneration when the stored generation is one the chain does not hold (newer)."""
    with engine.connect() as connection:
        marker = read_marker(connection, store.generation)
    stored = marker or (pseudonymiser.key_id, True)
    if stored[0] not in pseudonymiser.generations:
        # An instance of older settings (a pod restarted mid-rollout) must neither serve nor
        # move keys "back": it cannot, and marking the database would stop every current one.
        raise StaleKeyGeneration(
            f"stored subject keys are of generation {stored[0]!r}, which this instance's key chain "
            f"({', '.join(pseudonymiser.generations)}) does not hold: start it with the current "
            "subject key settings"
        )
    return stored != (pseudonymiser.current_key_id, True)


def rekey(
    engine: Engine,
    store: KeyedStore,
    pseudonymiser: Pseudonymiser,
    keys: audit.AuditKeys,
    *,
    batch_size: int = 1000,
    settle_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> RekeyResult:
    """Move every stored key of an older generation to the current one (the module's steps).
    Safe to run while instances serve, to run twice at once, and to kill and run again."""
    current = pseudonymiser.current_key_id
    if not needs_rekey(engine, store, pseudonymiser):
        return RekeyResult(0, current)
    with engine.begin() as connection:
        _set_marker(connection, store.generation, current, complete=False)
    log.info("subject key rotation started", generation=current)
    sleep(settle_s)
    moved = sum(
        _move_column(engine, c, store=store, pseudonymiser=pseudonymiser, keys=keys, batch_size=batch_size)
        for c in store.columns
    )
    with engine.begin() as connection:
        _set_marker(connection, store.generation, current, complete=True)
        audit.append(
            connection,
            store.audit_log,
            store.audit_head,
            [_record("subject-keys-rotated", "", {"generation": current, "rows": moved})],
            keys=keys,
        )
    log.info("subject key rotation complete", generation=current, rows=moved)
    return RekeyResult(moved, current)


def _record(action: str, target: str, detail: dict[str, Any]) -> audit.AuditRecord:
    return audit.AuditRecord(action, ACTOR, "system", datetime.now(UTC), target=target, detail=detail)


def _move_column(
    engine: Engine,
    column: KeyedColumn,
    *,
    store: KeyedStore,
    pseudonymiser: Pseudonymiser,
    keys: audit.AuditKeys,
    batch_size: int,
) -> int:
    table = column.table
    key, key_id = table.c[column.key], table.c[column.key_id]
    primary = list(table.primary_key.columns)
    current = pseudonymiser.current_key_id
    stale = sa.or_(key_id.is_(None), key_id != current)
    payload = table.c[column.payload] if column.payload is not None else None
    selected = [*primary, key, key_id, *([payload] if payload is not None else [])]
    select = sa.select(*selected).where(stale, key.is_not(None)).limit(batch_size)
    values: dict[Any, Any] = {key: sa.bindparam("new_key"), key_id: current}
    if payload is not None:
        values[payload] = sa.bindparam("new_payload")
    update = (
        sa.update(table)
        .where(*(c == sa.bindparam(f"pk_{c.name}") for c in primary))
        .where(sa.func.coalesce(key_id, pseudonymiser.key_id) == sa.bindparam("old_id"))
        .values(values)
    )
    n = len(primary)
    target = f"{table.name}.{column.key}"
    moved = 0
    while True:
        with engine.begin() as connection:
            rows = connection.execute(select).all()
            if not rows:
                return moved
            params = []
            for row in rows:
                old_id = row[n + 1] or pseudonymiser.key_id
                new_key = pseudonymiser.rekey(row[n], old_id)
                moved_row = {f"pk_{c.name}": row[i] for i, c in enumerate(primary)}
                moved_row.update(old_id=old_id, new_key=new_key)
                if column.rewrite is not None:
                    moved_row["new_payload"] = column.rewrite(row[n + 2], new_key, current)
                params.append(moved_row)
            connection.execute(update, params)
            audit.append(
                connection,
                store.audit_log,
                store.audit_head,
                [_record("subject-keys-rekeyed", target, {"rows": len(rows), "to": current})],
                keys=keys,
            )
        moved += len(rows)
