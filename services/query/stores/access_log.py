"""Query's own store: the access log, a hash-chained record of every read of a subject's data.

Reads are served from score's database (read-only); who read what is written here, in
query's own database, so the read path never takes score's write lock. Each read is
recorded (who, role, stated purpose, when, which read) and committed before its answer is
sent: a read whose record cannot be written fails with UNAVAILABLE, so there is no
unrecorded read. Records from concurrent reads are committed together (group commit):
while one commit runs, new records queue up and the next commit takes all of them, so
the cost per read is a share of one commit rather than a commit each.

Records keep the subject key they were written with: rewriting them at a key rotation would
break the chain and its anchors. Each names its key's generation instead, and a subject
named by raw id is found under every generation's key (docs/security.md, "Rotating the
subject key").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kit.audit import AuditHeadMixin, AuditKeys, AuditMixin, AuditRecord, PreparedAppend
from kit.db import as_utc, make_metadata, make_session_factory, run_blocking
from kit.logging import get_logger
from services.query import metrics

log = get_logger(__name__)

# A subject sees who read its data over this period (ListAccessLog).
ACCESS_LOG_PERIOD = timedelta(days=365)
# Records per group commit, at most; more wait for the next commit.
MAX_GROUP = 2000


class Base(DeclarativeBase):
    metadata = make_metadata()


class QueryAuditLog(Base, AuditMixin):
    """Every read of a subject's data; see kit.audit for the chain."""

    __tablename__ = "query_audit_log"
    # ListAccessLog: one subject's records, newest first.
    __table_args__ = (sa.Index("ix_query_audit_log_subject_key_seq", "subject_key", "seq"),)

    # The generation of subject_key (kit.pseudonym) when query derived the key; NULL when it
    # cannot tell: in records from before generations (root generation keys) and for keys a
    # caller gave or score's rows held. ListAccessLog matches keys, not this (keys of two
    # generations never collide), yet new records' MACs cover it (kit.audit) so that no
    # column of a new record changes unseen. Old records' MACs cannot: they were signed
    # without it.
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))


class QueryAuditHead(Base, AuditHeadMixin):
    __tablename__ = "query_audit_head"


@dataclass(frozen=True)
class AccessEntry:
    """One read as a subject sees it in ListAccessLog."""

    seq: int
    at: datetime
    actor: str
    role: str
    purpose: str
    method: str
    purpose_note: str = ""


READ_PREFIX = "read:"


class SqlAccessLog:
    """Appends records and pages one subject's reads."""

    def __init__(self, engine: Engine, *, audit_keys: AuditKeys) -> None:
        self._sessions = make_session_factory(engine)
        # Statements compiled once, run on a DBAPI connection: SQLAlchemy's per-commit
        # handling cost more than the statements themselves (kit.audit.PreparedAppend).
        self._append = PreparedAppend(engine, QueryAuditLog, QueryAuditHead, keys=audit_keys)

    def append(self, records: Sequence[AuditRecord]) -> None:
        """Append and commit `records` (one group commit)."""
        self._append(records)

    def page(
        self, subject_keys: Sequence[str], since: datetime, before_seq: int | None, limit: int
    ) -> list[AccessEntry]:
        """One subject's records, newest first: those written under any of `subject_keys`
        (its keys of every generation, when it was named by raw id)."""
        t = QueryAuditLog
        query = (
            sa.select(t.seq, t.at, t.actor, t.role, t.purpose, t.action, t.detail)
            .where(t.subject_key.in_(subject_keys), t.at >= since)
            .order_by(t.seq.desc())
            .limit(limit)
        )
        if before_seq is not None:
            query = query.where(t.seq < before_seq)
        with self._sessions() as session:
            return [
                AccessEntry(
                    seq=int(seq),
                    at=as_utc(at),
                    actor=actor,
                    role=role,
                    purpose=purpose,
                    method=action.removeprefix(READ_PREFIX),
                    purpose_note=_note_of(detail),
                )
                for seq, at, actor, role, purpose, action, detail in session.execute(query)
            ]


def _note_of(detail: str) -> str:
    note = json.loads(detail or "{}").get("purpose_note", "") if detail.startswith("{") else ""
    return note if isinstance(note, str) else ""


@dataclass
class _Pending:
    records: Sequence[AuditRecord]
    done: asyncio.Future[None]


class AccessRecorder:
    """Group commit of access records: `record` returns once its records are committed.

    `commit_interval_s` spaces commits: one starts at most that long after the previous one
    started, so under steady load the records that arrive meanwhile share its fsync. The
    first read after a quiet spell commits at once; a read waits at most the interval (plus
    a commit) for its record, never without it."""

    def __init__(
        self,
        store: SqlAccessLog,
        executor: Executor,
        clock: Callable[[], datetime],
        commit_interval_s: float = 0.0,
    ) -> None:
        self._store = store
        self._executor = executor
        self._clock = clock
        self._interval_s = commit_interval_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        for committed in (True, False):
            metrics.access_records(0, committed=committed)  # exported from the start

    def now(self) -> datetime:
        return self._clock()

    async def record(self, records: Sequence[AuditRecord]) -> None:
        """Commit `records`; raises what the commit raised (the read must then fail)."""
        if not records:
            return
        if self._writer is None or self._writer.done():
            # Started lazily inside the serving loop; restarted if it ever died.
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(records, done))
        await done

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        started = -self._interval_s
        while True:
            group = [await self._queue.get()]
            wait = started + self._interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            started = loop.time()
            size = len(group[0].records)
            while not self._queue.empty() and size < MAX_GROUP:
                item = self._queue.get_nowait()
                group.append(item)
                size += len(item.records)
            records = [r for pending in group for r in pending.records]
            try:
                await run_blocking(self._executor, self._store.append, records)
            except Exception as exc:  # every waiting read fails with the commit's error
                metrics.access_records(len(records), committed=False)
                log.warning("access log commit failed", records=len(records), error=type(exc).__name__)
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            metrics.access_records(len(records), committed=True)
            for pending in group:
                if not pending.done.done():
                    pending.done.set_result(None)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
