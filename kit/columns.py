"""Column types for the two kinds of value every growing table repeats: digests and instants.

A subject key, a fingerprint or an outcome id is a lowercase hexadecimal string in code, on
the wire and in logs; `Hex` stores the bytes it spells, half its length (a subject key 32
bytes instead of 64). An instant is an aware UTC datetime in code; `Instant` stores it as
PostgreSQL's 8-byte timestamptz, and on SQLite, which has no date type and would otherwise
store 26 characters of text, as the integer count of microseconds since the Unix epoch.
Both keep order: bytes sort as their lowercase hex does, integers as the instants do, so a
range or a keyset page over either column reads the same rows as it did over text.

The migrations that move a column onto these types rewrite its stored values with the
helpers below (`store_as_bytes`, `store_as_integers` and their inverses).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from kit.db import as_utc

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class NotHex(ValueError):
    """A value for a `Hex` column that is not a lowercase hexadecimal string of whole bytes."""


def hex_bytes(value: str) -> bytes:
    """The bytes `value` spells; refuses anything `bytes.hex()` would not give back as it is
    (upper case, spaces, an odd length), so every stored value reads back unchanged."""
    try:
        stored = bytes.fromhex(value)
    except (ValueError, TypeError) as error:
        raise NotHex(f"not lowercase hexadecimal: {len(value)} characters") from error
    if stored.hex() != value:
        raise NotHex(f"not lowercase hexadecimal: {len(value)} characters")
    return stored


def microseconds(value: datetime) -> int:
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC (kit.db.as_utc)."""
    return (as_utc(value) - EPOCH) // _MICROSECOND


def instant(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def _bytes_of(value: str | None) -> bytes | None:
    return None if value is None else hex_bytes(value)


def _hex_of(value: Any) -> str | None:
    return None if value is None else bytes(value).hex()


def _instant_of(value: int | None) -> datetime | None:
    return None if value is None else EPOCH + timedelta(microseconds=value)


class Hex(sa.TypeDecorator[str]):
    """A lowercase hexadecimal string stored as its bytes (module docstring)."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> bytes | None:
        return None if value is None else hex_bytes(value)

    def bind_processor(self, dialect: sa.Dialect) -> Any:
        # hex_bytes, its bytes handed to the driver as they are (both drivers take bytes for
        # a binary column). The usual chain, process_bind_param then LargeBinary's processor
        # wrapping each value in the driver's Binary, cost ingest about 12,000 more
        # instructions per stored event than text keys; this about 1,300 (callgrind).
        # process_bind_param stays for literal rendering.
        return _bytes_of

    def result_processor(self, dialect: sa.Dialect, coltype: object) -> Any:
        # Not process_result_value: TypeDecorator's chain around it costs about as much as
        # the conversion, and reads of these columns run for every history row of a batch.
        return _hex_of


class Instant(sa.TypeDecorator[datetime]):
    """An aware UTC datetime: timestamptz on PostgreSQL, microseconds since the epoch on
    SQLite (module docstring). Reads are aware on both."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return microseconds(value)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if dialect.name != "sqlite":
            return as_utc(value)
        return instant(value)

    def result_processor(self, dialect: sa.Dialect, coltype: object) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        # As Hex.result_processor: the integer straight to its instant (PostgreSQL's reads
        # go through process_result_value).
        return _instant_of


# ---- migrations: rewrite stored values -------------------------------------------------------


def _sqlite_text_instant(value: Any) -> Any:
    """A datetime SQLAlchemy stored as SQLite text ("2026-12-07 21:24:24.123456", naive UTC)
    as microseconds since the epoch; other values (NULL, integers already) as they are."""
    if not isinstance(value, str):
        return value
    return microseconds(datetime.fromisoformat(value))


def _sqlite_integer_instant(value: Any) -> Any:
    """The inverse: microseconds as the text SQLAlchemy's SQLite DateTime writes and reads."""
    if not isinstance(value, int):
        return value
    return instant(value).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def _sqlite_from_hex(value: Any) -> Any:
    return hex_bytes(value) if isinstance(value, str) else value


def _sqlite_to_hex(value: Any) -> Any:
    return bytes(value).hex() if isinstance(value, bytes | bytearray | memoryview) else value


def _sqlite_rewrite(connection: sa.Connection, table: str, columns: tuple[str, ...], function: Any) -> None:
    """One UPDATE per table, each value passed through `function` (a Python function the
    statement calls: SQLite 3.40 has no unhex(), and a paged rewrite is far slower)."""
    name = f"egret_{function.__name__.strip('_')}"
    connection.connection.driver_connection.create_function(  # type: ignore[union-attr]
        name, 1, function, deterministic=True
    )
    assignments = ", ".join(f'"{column}" = {name}("{column}")' for column in columns)
    try:
        connection.exec_driver_sql(f'UPDATE "{table}" SET {assignments}')
    except sa.exc.OperationalError as error:
        # SQLite says only "user-defined function raised exception": say where.
        raise ValueError(
            f"{table}: a value of {', '.join(columns)} cannot be rewritten by {function.__name__} "
            f"(not lowercase hexadecimal, or not a datetime SQLAlchemy wrote)"
        ) from error


def store_as_bytes(connection: sa.Connection, table: str, columns: tuple[str, ...]) -> None:
    """Upgrade: the hexadecimal text of `table.columns` as the bytes it spells (a `Hex`
    column). On PostgreSQL the columns become bytea; on SQLite, whose declared types do not
    constrain values, the migration changes the declared type itself (batch_alter_table)."""
    if connection.dialect.name == "sqlite":
        _sqlite_rewrite(connection, table, columns, _sqlite_from_hex)
        return
    for column in columns:
        connection.exec_driver_sql(
            f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE bytea USING decode("{column}", \'hex\')'
        )


def store_as_hex(connection: sa.Connection, table: str, columns: dict[str, int]) -> None:
    """Downgrade of `store_as_bytes`: each column (mapped to its former VARCHAR length) back
    to lowercase hexadecimal text."""
    if connection.dialect.name == "sqlite":
        _sqlite_rewrite(connection, table, tuple(columns), _sqlite_to_hex)
        return
    for column, length in columns.items():
        connection.exec_driver_sql(
            f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE VARCHAR({length}) '
            f"USING encode(\"{column}\", 'hex')"
        )


def store_as_integers(connection: sa.Connection, table: str, columns: tuple[str, ...]) -> None:
    """Upgrade: SQLite's datetime text of `table.columns` as microseconds since the epoch
    (an `Instant` column). PostgreSQL's timestamptz is what `Instant` stores there: nothing
    to rewrite."""
    if connection.dialect.name == "sqlite":
        _sqlite_rewrite(connection, table, columns, _sqlite_text_instant)


def store_as_text(connection: sa.Connection, table: str, columns: tuple[str, ...]) -> None:
    """Downgrade of `store_as_integers`."""
    if connection.dialect.name == "sqlite":
        _sqlite_rewrite(connection, table, columns, _sqlite_integer_instant)
