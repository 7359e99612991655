"""PreparedAppend (the access log's hot path) writes exactly what `append` writes: the same
rows, MACs and head, one verifiable chain whichever of the two appended each record, on
SQLite and PostgreSQL; a failed append commits nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from kit.audit import AuditHeadMixin, AuditKeys, AuditMixin, AuditRecord, PreparedAppend, append, verify
from kit.db import create_engine, make_metadata

KEYS = AuditKeys("k1", {"k1": b"k" * 32})
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = make_metadata()


class Log(Base, AuditMixin):
    __tablename__ = "t_prepared_audit_log"
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))


class Head(Base, AuditHeadMixin):
    __tablename__ = "t_prepared_audit_head"


class PlainLog(Base, AuditMixin):
    __tablename__ = "t_prepared_plain_log"


class PlainHead(Base, AuditHeadMixin):
    __tablename__ = "t_prepared_plain_head"


def _record(i: int, *, generation: str | None = "g2") -> AuditRecord:
    return AuditRecord(
        action="read:GetScore",
        actor=f"reviewer-{i % 2}",
        role="reviewer",
        at=T0 + timedelta(seconds=i, microseconds=i),
        subject_key=None if i % 5 == 4 else f"{i:064x}",
        purpose="subject-request",
        target=f"{i:064x}",
        detail={"purpose": "subject-request", "purpose_note": "ünïcode ok", "i": i},
        subject_key_id=None if i % 3 == 0 else generation,
    )


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _rows(engine: Engine, log: type[AuditMixin]) -> list[tuple[object, ...]]:
    table = log.__table__  # type: ignore[attr-defined]
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.select(table).order_by(table.c.seq))]


def _verified(
    engine: Engine, log: type[AuditMixin], head: type[AuditHeadMixin]
) -> tuple[int, tuple[str, ...]]:
    with Session(engine) as session:
        report = verify(session, log, head, keys=KEYS)
    return report.records, report.problems


def test_prepared_and_plain_appends_write_the_same_rows(engine: Engine, database_url: str) -> None:
    batches = [
        [_record(0)],
        [_record(1), _record(2), _record(3)],
        [_record(4)],
        [_record(i) for i in range(5, 9)],
    ]
    prepared = PreparedAppend(engine, Log, Head, keys=KEYS)
    for batch in batches:
        prepared(batch)
    written = _rows(engine, Log)
    with engine.begin() as connection:
        connection.execute(sa.delete(Log))
        connection.execute(sa.delete(Head))
    for batch in batches:
        with engine.begin() as connection:
            append(connection, Log, Head, batch, keys=KEYS)
    assert written == _rows(engine, Log)
    assert _verified(engine, Log, Head) == (9, ())


def test_prepared_and_plain_appends_continue_one_chain(engine: Engine) -> None:
    prepared = PreparedAppend(engine, Log, Head, keys=KEYS)
    for i in range(12):
        if i % 2:
            prepared([_record(i)])
        else:
            with engine.begin() as connection:
                append(connection, Log, Head, [_record(i)], keys=KEYS)
    assert _verified(engine, Log, Head) == (12, ())
    with engine.connect() as connection:
        seqs = connection.execute(sa.select(Log.seq).order_by(Log.seq)).scalars().all()
    assert seqs == list(range(1, 13))


def test_a_time_in_another_zone_is_stored_as_append_stores_it(engine: Engine) -> None:
    elsewhere = replace(_record(1), at=_record(1).at.astimezone(timezone(timedelta(hours=8))))
    PreparedAppend(engine, Log, Head, keys=KEYS)([_record(0)])
    PreparedAppend(engine, Log, Head, keys=KEYS)([elsewhere])
    prepared = _rows(engine, Log)
    with engine.begin() as connection:
        connection.execute(sa.delete(Log))
        connection.execute(sa.delete(Head))
        append(connection, Log, Head, [_record(0)], keys=KEYS)
    with engine.begin() as connection:
        append(connection, Log, Head, [elsewhere], keys=KEYS)
    assert prepared == _rows(engine, Log)


def test_a_log_without_generations_is_appended_without_them(engine: Engine) -> None:
    prepared = PreparedAppend(engine, PlainLog, PlainHead, keys=KEYS)
    prepared([_record(i, generation=None) for i in range(3)])
    with pytest.raises(ValueError, match="subject_key_id"):
        prepared([_record(1)])
    assert _verified(engine, PlainLog, PlainHead) == (3, ())


def test_a_failed_append_commits_nothing(engine: Engine) -> None:
    prepared = PreparedAppend(engine, Log, Head, keys=KEYS)
    prepared([_record(0)])
    too_long = replace(_record(1), actor="x" * 300)
    if engine.dialect.name == "sqlite":
        # SQLite does not enforce lengths: make the insert fail on the primary key instead.
        with engine.begin() as connection:
            connection.execute(sa.update(Head).values(seq=0))
        failing = [_record(1)]
    else:
        failing = [too_long]
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error
        prepared(failing)
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(Log)).scalar_one() == 1
    if engine.dialect.name != "sqlite":
        prepared([_record(2)])
        assert _verified(engine, Log, Head) == (2, ())
