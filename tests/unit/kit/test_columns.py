"""Digests stored as bytes and instants as integers on SQLite (kit.columns): what goes in
comes out, order is kept, and the migration helpers rewrite stored values both ways."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from kit import columns
from kit.db import as_utc, create_engine

KEYS = ["00" * 32, "ab" * 32, "ff" * 32, "0f1e" * 8]
TIMES = [
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 12, 7, 21, 24, 24, 123456, tzinfo=UTC),
    datetime(2026, 12, 7, 22, 0, tzinfo=timezone(timedelta(hours=8))),
    datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=UTC),
]


def table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "t",
        metadata,
        sa.Column("n", sa.Integer, primary_key=True),
        sa.Column("key", columns.Hex()),
        sa.Column("at", columns.Instant()),
    )


def test_values_read_back_as_written_and_order_is_kept(database_url: str) -> None:
    engine = create_engine(database_url)
    metadata = sa.MetaData()
    t = table(metadata)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            t.insert(),
            [{"n": n, "key": k, "at": a} for n, (k, a) in enumerate(zip(KEYS, TIMES, strict=True))],
        )
        connection.execute(t.insert(), [{"n": 99, "key": None, "at": None}])
    with engine.connect() as connection:
        rows = connection.execute(sa.select(t.c.key, t.c.at).where(t.c.n < 99).order_by(t.c.n)).all()
        assert [r.key for r in rows] == KEYS
        assert [r.at for r in rows] == TIMES
        assert all(r.at.tzinfo is not None for r in rows)
        assert connection.execute(sa.select(t.c.key, t.c.at).where(t.c.n == 99)).one() == (None, None)
        by_key = connection.execute(sa.select(t.c.key).where(t.c.n < 99).order_by(t.c.key)).scalars().all()
        assert by_key == sorted(KEYS)
        by_time = connection.execute(sa.select(t.c.at).where(t.c.n < 99).order_by(t.c.at)).scalars().all()
        assert by_time == sorted(TIMES)
        later = connection.execute(sa.select(t.c.n).where(t.c.at > TIMES[1]).order_by(t.c.n)).scalars().all()
        assert later == [3]  # 22:00 at +08:00 is 14:00 UTC
        found = (
            connection.execute(sa.select(t.c.n).where(t.c.key.in_(["ab" * 32, "ff" * 32]))).scalars().all()
        )
        assert sorted(found) == [1, 2]
    engine.dispose()


def test_sqlite_stores_half_the_key_and_an_integer_instant(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    metadata = sa.MetaData()
    t = table(metadata)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(t.insert().values(n=1, key="ab" * 32, at=TIMES[1]))
        raw = connection.exec_driver_sql("SELECT typeof(key), length(key), typeof(at), at FROM t").one()
    assert raw == ("blob", 32, "integer", 1796678664123456)
    engine.dispose()


@pytest.mark.parametrize("value", ["AB" * 32, "abc", "a b", "zz", "ab\n"])
def test_a_value_that_would_not_read_back_the_same_is_refused(value: str) -> None:
    with pytest.raises(columns.NotHex):
        columns.hex_bytes(value)


def test_a_naive_datetime_is_taken_as_utc() -> None:
    naive = datetime(2026, 12, 7, 21, 24, 24, 123456)
    assert columns.microseconds(naive) == columns.microseconds(naive.replace(tzinfo=UTC))
    assert columns.instant(columns.microseconds(naive)) == naive.replace(tzinfo=UTC)


def test_the_migration_helpers_rewrite_stored_values_both_ways(database_url: str) -> None:
    """Rows written as before (hex text, SQLAlchemy's datetimes) read the same through the new
    types after the upgrade's rewrite, and as before again after the downgrade's."""
    engine = create_engine(database_url)
    before = sa.MetaData()
    old = sa.Table(
        "t",
        before,
        sa.Column("n", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(64)),
        sa.Column("at", sa.DateTime(timezone=True)),
    )
    before.create_all(engine)
    # Services store UTC (SQLAlchemy's SQLite DateTime drops any other offset unconverted).
    utc = [a.astimezone(UTC) for a in TIMES]
    rows = [{"n": n, "key": k, "at": a} for n, (k, a) in enumerate(zip(KEYS, utc, strict=True))] + [
        {"n": 9, "key": None, "at": None}
    ]
    with engine.begin() as connection:
        connection.execute(old.insert(), rows)
    with engine.begin() as connection:
        columns.store_as_bytes(connection, "t", ("key",))
        columns.store_as_integers(connection, "t", ("at",))
    new = table(sa.MetaData())
    with engine.connect() as connection:
        assert [tuple(r) for r in connection.execute(sa.select(new).order_by(new.c.n))] == [
            (r["n"], r["key"], r["at"]) for r in rows
        ]
    with engine.begin() as connection:
        columns.store_as_hex(connection, "t", {"key": 64})
        columns.store_as_text(connection, "t", ("at",))
    with engine.connect() as connection:
        back = connection.execute(sa.select(old).order_by(old.c.n)).all()
    assert [(r.n, r.key, r.at and as_utc(r.at)) for r in back] == [(r["n"], r["key"], r["at"]) for r in rows]
    engine.dispose()


def test_a_value_the_upgrade_cannot_rewrite_is_named_by_table_and_column(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (n INTEGER PRIMARY KEY, key VARCHAR(64))")
        connection.exec_driver_sql("INSERT INTO t VALUES (1, 'not-hex')")
    with (
        pytest.raises(ValueError, match=r"^t: a value of key cannot be rewritten"),
        engine.begin() as connection,
    ):
        columns.store_as_bytes(connection, "t", ("key",))
    engine.dispose()
