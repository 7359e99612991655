"""The audit trail: an append-only, hash-chained log of who read or changed what.

Every service that performs an audited act (a read of a subject's data, a rule set
publication or activation, a dispute or repair decision, a retraction, a consent change)
appends its record to its own database's log in the same transaction as the act, so an
act without its record cannot commit. Each record carries a keyed MAC (HMAC-SHA256) of its
canonical content and of the record before it, under a key kept outside the database
(`AuditKeys`; the record names its key id, so keys rotate); a one-row head table holds the
last sequence number and MAC. Records written before a key was configured carry a plain
SHA-256 and an empty key id; once a keyed record appears, every later one must be keyed.
`verify` walks the chain and reports any record that was altered, inserted or deleted (a
deleted tail is caught by the head). Someone who can rewrite the whole table and the head
consistently cannot forge the MACs without the key; anchors catch the rest: each service
appends its head to an append-only file at intervals (kit.audit_anchors), `verify-audit`
checks every one of them, and `verify-audit --anchor SEQ:HASH` checks one recorded by hand.
Every MAC covers every record before it, so a matching anchor proves the first SEQ records
unchanged since it was taken (docs/security.md).

Each service declares `class AuditLog(Base, AuditMixin)` and `class AuditHead(Base,
AuditHeadMixin)` with its own table names, like the outbox. A log that keeps subject keys of
several generations (query's access log) adds a `subject_key_id` column: records that carry
the key's generation are MACed with it, records without one keep the content they had.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from kit.principal import Principal, current_principal
from kit.settings import AuditSettings

GENESIS = "0" * 64
HEAD_ID = 1
# SQLite only autoincrements INTEGER PRIMARY KEY; sequence numbers are assigned here,
# but the type must still match across dialects.
_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class AuditMixin:
    """Columns of an audit log table."""

    seq: Mapped[int] = mapped_column(_BigInt, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(sa.String(256))
    role: Mapped[str] = mapped_column(sa.String(32))
    # What was done, e.g. "read:GetScore", "dispute.resolve", "ruleset.activate".
    action: Mapped[str] = mapped_column(sa.String(64))
    # The pseudonymous subject concerned, when there is one (never a raw id).
    subject_key: Mapped[str | None] = mapped_column(sa.String(64))
    purpose: Mapped[str] = mapped_column(sa.Text)
    # What the act was about: an entry id, a rule set, an event reference...
    target: Mapped[str] = mapped_column(sa.String(512))
    # Canonical JSON of any further facts (a decision, a reason).
    detail: Mapped[str] = mapped_column(sa.Text)
    prev_hash: Mapped[str] = mapped_column(sa.String(64))
    hash: Mapped[str] = mapped_column(sa.String(64))
    # The id of the MAC key of `hash`; "" for a plain SHA-256 (records from before keys).
    key_id: Mapped[str] = mapped_column(sa.String(32), server_default="")


class AuditHeadMixin:
    """The one-row head of an audit log: its last sequence number and hash."""

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(_BigInt)
    hash: Mapped[str] = mapped_column(sa.String(64))


@dataclass(frozen=True)
class AuditKeys:
    """The MAC keys of an audit chain, by id: new records use `current`, verification accepts
    every key listed. No current key means plain SHA-256 (development only)."""

    current: str = ""
    keys: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.current and self.current not in self.keys:
            raise ValueError(f"the current audit key id {self.current!r} has no key")

    def digest(self, key_id: str, content: bytes) -> str | None:
        """The MAC of `content` under key `key_id` (SHA-256 for ""); None for an unknown id."""
        if not key_id:
            return hashlib.sha256(content).hexdigest()
        key = self.keys.get(key_id)
        return None if key is None else hmac.new(key, content, hashlib.sha256).hexdigest()


UNKEYED = AuditKeys()


def audit_keys(settings: AuditSettings) -> AuditKeys:
    """The keys the settings name (UNKEYED without EGRET_AUDIT_KEY_FILE)."""
    return AuditKeys(settings.key_id, dict(settings.keys))


@dataclass(frozen=True)
class AuditRecord:
    """One audited act, before it is chained."""

    action: str
    actor: str
    role: str
    at: datetime
    subject_key: str | None = None
    purpose: str = ""
    target: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    # The generation of subject_key (kit.pseudonym), for a log with a subject_key_id column.
    subject_key_id: str | None = None


def actor_of(principal: Principal | None, claimed: str = "") -> tuple[str, str]:
    """(actor, role) for a record: the authenticated principal, else the claimed name
    (insecure development mode only)."""
    if principal is None:
        return (claimed or "anonymous", "unauthenticated")
    return (principal.loggable_id, principal.role.value)


def record(
    action: str,
    at: datetime,
    *,
    subject_key: str | None = None,
    purpose: str = "",
    target: str = "",
    detail: Mapping[str, Any] | None = None,
    claimed_actor: str = "",
    subject_key_id: str | None = None,
) -> AuditRecord:
    """A record of an act by the principal of the call being handled."""
    actor, role = actor_of(current_principal(), claimed_actor)
    return AuditRecord(
        action=action,
        actor=actor,
        role=role,
        at=at,
        subject_key=subject_key,
        purpose=purpose,
        target=target,
        detail=dict(detail or {}),
        subject_key_id=subject_key_id,
    )


def _canonical_time(at: datetime) -> str:
    # Stored and re-read values must hash alike: UTC, microseconds, explicit offset.
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _detail_text(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def chain_hash(
    *,
    seq: int,
    at: datetime,
    actor: str,
    role: str,
    action: str,
    subject_key: str | None,
    purpose: str,
    target: str,
    detail: str,
    prev_hash: str,
    key_id: str = "",
    keys: AuditKeys = UNKEYED,
    subject_key_id: str | None = None,
) -> str | None:
    """The record's MAC under `key_id` (plain SHA-256 for ""), None when that key is unknown."""
    fields: list[object] = [
        seq,
        _canonical_time(at),
        actor,
        role,
        action,
        subject_key or "",
        purpose,
        target,
        detail,
        prev_hash,
    ]
    if key_id:
        # The key id is covered too; unkeyed records keep the content they were hashed with.
        fields.append(key_id)
    if subject_key_id is not None:
        # Tagged, so that it never reads as a key id; records without it keep their content.
        fields.append(["subject_key_id", subject_key_id])
    content = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    return keys.digest(key_id, content.encode())


def append(
    session: Session | Connection,
    log: Any,
    head: Any,
    records: Sequence[AuditRecord],
    *,
    keys: AuditKeys,
) -> None:
    """Append `records`, in order, within the caller's transaction (an ORM session or,
    cheaper on a hot path, a Core connection), MACed with the current key of `keys`.

    The head is moved first with one UPDATE ... RETURNING, which takes the write lock
    (PostgreSQL row lock, SQLite's database lock) before anything is read, so concurrent
    appenders serialize and the chain never forks.
    """
    if not records:
        return
    n = len(records)
    move, insert, set_hash, generations = _statements(log, head)
    _check_generations(log, records, generations)
    moved = session.execute(move, {"n": n}).one_or_none()
    if moved is None:
        session.execute(sa.insert(head).values(id=HEAD_ID, seq=n, hash=GENESIS))
        last_seq, prev = n, GENESIS
    else:
        last_seq, prev = int(moved[0]), str(moved[1])
    rows, last_hash = _chained_rows(records, last_seq, prev, keys=keys, generations=generations)
    session.execute(insert, rows)
    session.execute(set_hash, {"h": last_hash})


def _check_generations(log: Any, records: Sequence[AuditRecord], generations: bool) -> None:
    if not generations and any(r.subject_key_id is not None for r in records):
        raise ValueError(f"{log.__tablename__} has no subject_key_id column for the records' key generation")


def _chained_rows(
    records: Sequence[AuditRecord], last_seq: int, prev: str, *, keys: AuditKeys, generations: bool
) -> tuple[list[dict[str, Any]], str]:
    """The rows of `records`, chained after `prev`, the last of them at `last_seq`, and the
    last row's MAC (the head's new hash)."""
    n = len(records)
    rows = []
    for offset, r in enumerate(records):
        seq = last_seq - n + 1 + offset
        detail = _detail_text(r.detail)
        at = r.at if r.at.tzinfo is not None else r.at.replace(tzinfo=UTC)
        digest = chain_hash(
            seq=seq,
            at=at,
            actor=r.actor,
            role=r.role,
            action=r.action,
            subject_key=r.subject_key,
            purpose=r.purpose,
            target=r.target,
            detail=detail,
            prev_hash=prev,
            key_id=keys.current,
            keys=keys,
            subject_key_id=r.subject_key_id,
        )
        assert digest is not None  # AuditKeys holds its current key
        row = {
            "seq": seq,
            "at": at,
            "actor": r.actor,
            "role": r.role,
            "action": r.action,
            "subject_key": r.subject_key,
            "purpose": r.purpose,
            "target": r.target,
            "detail": detail,
            "prev_hash": prev,
            "hash": digest,
            "key_id": keys.current,
        }
        if generations:
            row["subject_key_id"] = r.subject_key_id
        rows.append(row)
        prev = digest
    return rows, prev


class _Prepared:
    """One statement compiled for a dialect, run on a DBAPI cursor: its SQL text and how a
    row of values becomes the driver's parameters (the columns' own bind conversions
    applied, positional or named as the driver takes them)."""

    def __init__(self, statement: Any, dialect: Any, table: Any, column_keys: Sequence[str] | None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql: str = compiled.string
        # Values the statement carries itself (the head's id), then the caller's.
        self._fixed = {k: v for k, v in compiled.params.items() if v is not None}
        self._order: tuple[str, ...] | None = (
            None if compiled.positiontup is None else tuple(compiled.positiontup)
        )
        self._convert = {
            column.key: processor
            for column in table.columns
            if (processor := column.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }

    def parameters(self, values: Mapping[str, Any]) -> Any:
        merged = {**self._fixed, **values}
        for key, convert in self._convert.items():
            if key in merged and merged[key] is not None:
                merged[key] = convert(merged[key])
        return merged if self._order is None else tuple(merged[k] for k in self._order)


class PreparedAppend:
    """`append` for a hot path: the same rows, MACs and head update, in one transaction of
    its own on a pooled DBAPI connection, with the statements compiled once for the
    engine's dialect.

    Query's access log commits about once per read at a few hundred reads a second, and
    SQLAlchemy's connection wrapper, transaction object and per-call statement handling
    cost about 60 of the 155 µs of CPU a one-record commit took through `append`
    (synchronous=NORMAL, benchmark machine). The first append to an empty log, which must
    create the head, goes through `append` instead."""

    def __init__(self, engine: Engine, log: Any, head: Any, *, keys: AuditKeys) -> None:
        dialect = engine.dialect
        move, _, set_hash, generations = _statements(log, head)
        columns = [c.key for c in log.__table__.columns if generations or c.key != "subject_key_id"]
        self._engine = engine
        self._log = log
        self._head = head
        self._keys = keys
        self._generations = generations
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
        self._move = _Prepared(move, dialect, head.__table__, None)
        self._insert = _Prepared(sa.insert(log), dialect, log.__table__, columns)
        self._set_hash = _Prepared(set_hash, dialect, head.__table__, None)

    def __call__(self, records: Sequence[AuditRecord]) -> None:
        """Append and commit `records`; raises the driver's error (nothing committed)."""
        if not records:
            return
        _check_generations(self._log, records, self._generations)
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                # The head moves first, taking the write lock before anything is read.
                cursor.execute(self._move.sql, self._move.parameters({"n": len(records)}))
                moved = cursor.fetchone()
                if moved is None:
                    connection.rollback()
                else:
                    rows, last_hash = _chained_rows(
                        records, int(moved[0]), str(moved[1]), keys=self._keys, generations=self._generations
                    )
                    cursor.executemany(self._insert.sql, [self._insert.parameters(row) for row in rows])
                    cursor.execute(self._set_hash.sql, self._set_hash.parameters({"h": last_hash}))
                    connection.commit()
            finally:
                cursor.close()
        except self._dbapi_error as exc:
            # The connection may be broken: the pool opens a new one.
            connection.invalidate(exc)
            raise
        finally:
            # Back to the pool (rolled back there if the commit was not reached).
            connection.close()
        if moved is None:
            with self._engine.begin() as first:
                append(first, self._log, self._head, records, keys=self._keys)


def _has_generations(log: Any) -> bool:
    """Whether the log stores the generation of its subject keys (subject_key_id)."""
    return "subject_key_id" in log.__table__.c


@functools.cache
def _statements(log: Any, head: Any) -> tuple[Any, Any, Any, bool]:
    # Built once per table pair: reads append per call, and building statements costs
    # more than running them.
    move = (
        sa.update(head)
        .where(head.id == HEAD_ID)
        .values(seq=head.seq + sa.bindparam("n", type_=sa.Integer))
        .returning(head.seq, head.hash)
    )
    set_hash = sa.update(head).where(head.id == HEAD_ID).values(hash=sa.bindparam("h", type_=sa.String))
    return move, sa.insert(log), set_hash, _has_generations(log)


@dataclass(frozen=True)
class ChainReport:
    records: int
    problems: tuple[str, ...]
    # The last record walked: what to record outside the database as an anchor.
    last_seq: int = 0
    last_hash: str = GENESIS

    @property
    def intact(self) -> bool:
        return not self.problems


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def hash_of(row: Any, keys: AuditKeys = UNKEYED) -> str | None:
    """The MAC a stored record (anything with the log's columns) should carry; None when its
    key is not in `keys`."""
    return chain_hash(
        seq=row.seq,
        at=_as_utc(row.at),
        actor=row.actor,
        role=row.role,
        action=row.action,
        subject_key=row.subject_key,
        purpose=row.purpose,
        target=row.target,
        detail=row.detail,
        prev_hash=row.prev_hash,
        key_id=row.key_id or "",
        keys=keys,
        subject_key_id=getattr(row, "subject_key_id", None),
    )


def check_chain(
    rows: Iterable[Any],
    head: tuple[int, str] | None,
    *,
    keys: AuditKeys = UNKEYED,
    anchors: Iterable[tuple[int, str]] = (),
    max_problems: int = 100,
) -> ChainReport:
    """Walk `rows` (in seq order) and the head; report every break found.

    - altered record: its hash no longer matches its content;
    - inserted or deleted record: a gap or repeat in seq, or a prev_hash that does not
      match the record before;
    - deleted or appended tail: the head disagrees with the last record;
    - rewritten log: a record's hash differs from an anchor ((seq, hash) recorded outside
      the database; several for one seq are each checked), or an anchored record is gone;
    - re-chained without the key: an unkeyed record after a keyed one, or a MAC that does
      not match (an unknown key id is reported as uncheckable).
    """
    anchored: dict[int, set[str]] = {}
    for seq, digest in anchors:
        anchored.setdefault(seq, set()).add(digest)
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < max_problems:
            problems.append(text)

    expected_seq = 1
    prev = GENESIS
    count = 0
    keyed = False
    for row in rows:
        count += 1
        if row.seq != expected_seq:
            problem(f"seq {row.seq}: expected seq {expected_seq} (a record was deleted or inserted)")
        if row.prev_hash != prev:
            problem(f"seq {row.seq}: prev_hash does not match the record before (chain broken)")
        key_id = row.key_id or ""
        if keyed and not key_id:
            problem(
                f"seq {row.seq}: unkeyed record after keyed ones (the log was re-chained without the key)"
            )
        keyed = keyed or bool(key_id)
        expected = hash_of(row, keys)
        if expected is None:
            problem(f"seq {row.seq}: audit key id {key_id!r} is not configured, its MAC cannot be checked")
        elif expected != row.hash:
            problem(f"seq {row.seq}: content does not match its hash (the record was altered)")
        for digest in sorted(anchored.pop(row.seq, ())):
            if digest != row.hash:
                problem(f"seq {row.seq}: hash differs from its anchor (the log was rewritten up to here)")
        expected_seq = row.seq + 1
        prev = row.hash
    last_seq = expected_seq - 1
    head_seq, head_hash = head if head is not None else (0, GENESIS)
    if head_seq != last_seq or head_hash != prev:
        problem(
            f"head says seq {head_seq} but the log ends at seq {last_seq} "
            "(records at the end were deleted, or appended without the head)"
        )
    for seq in sorted(anchored):
        problem(f"anchored seq {seq} is missing (the log was truncated or rewritten)")
    return ChainReport(count, tuple(problems), last_seq, prev)


def parse_anchor(text: str) -> tuple[int, str]:
    """Parse an anchor as `verify-audit` prints it ("SEQ:HASH"); ValueError if malformed."""
    seq, sep, digest = text.strip().partition(":")
    if not sep or not seq.isdigit() or int(seq) < 1 or len(digest) != 64 or digest.strip(_HEX):
        raise ValueError(f"an anchor is SEQ:HASH (a positive number and 64 hex digits), not {text!r}")
    return int(seq), digest.lower()


_HEX = "0123456789abcdefABCDEF"


def read_head(session: Session | Connection, head: Any) -> tuple[int, str] | None:
    """The log's head (last seq, its MAC), or None before the first record."""
    row = session.execute(sa.select(head.seq, head.hash).where(head.id == HEAD_ID)).one_or_none()
    return None if row is None else (int(row[0]), str(row[1]))


def verify(
    session: Session,
    log: Any,
    head: Any,
    *,
    keys: AuditKeys = UNKEYED,
    anchors: Iterable[tuple[int, str]] = (),
    max_problems: int = 100,
) -> ChainReport:
    """Verify the whole chain of one audit log (streams the rows) under `keys`, and any anchors."""
    head_row = read_head(session, head)
    rows = session.execute(
        sa.select(
            log.seq,
            log.at,
            log.actor,
            log.role,
            log.action,
            log.subject_key,
            log.purpose,
            log.target,
            log.detail,
            log.prev_hash,
            log.hash,
            log.key_id,
            *([log.subject_key_id] if _has_generations(log) else []),
        )
        .order_by(log.seq)
        .execution_options(yield_per=5000)
    )
    return check_chain(
        rows,
        head_row,
        keys=keys,
        anchors=anchors,
        max_problems=max_problems,
    )
