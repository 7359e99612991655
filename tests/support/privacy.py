"""Searches everything Egret wrote (logs, exported spans, every table of every database)
for raw subject identifiers. Used by the privacy proof (tests/e2e/test_privacy.py)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from kit.db import create_engine, is_sqlite


@dataclass(frozen=True)
class Finding:
    where: str
    raw_id: str


def find_in(data: bytes, raw_ids: Collection[bytes], where: str) -> list[Finding]:
    return [Finding(where, r.decode()) for r in raw_ids if r in data]


def scan_files(paths: Iterable[Path], raw_ids: Collection[bytes]) -> list[Finding]:
    """Every byte of each file (log files; SQLite's main file, WAL and journal, so rows
    that were deleted or rewritten but still sit in free pages are searched too)."""
    findings = []
    for path in paths:
        if path.exists():
            findings += find_in(path.read_bytes(), raw_ids, str(path))
    return findings


def sqlite_files(url: str) -> list[Path]:
    database = Path(str(sa.make_url(url).database))
    return [database, Path(f"{database}-wal"), Path(f"{database}-journal")]


def _cell_bytes(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def scan_database(url: str, raw_ids: Collection[bytes]) -> tuple[list[Finding], int]:
    """Every cell of every table (text, numbers, blobs such as serialized protobufs).
    Returns the findings and the number of tables scanned."""
    engine = create_engine(url, read_only=True)
    findings: list[Finding] = []
    try:
        metadata = sa.MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                for row in connection.execute(sa.select(table)):
                    data = b"\x00".join(_cell_bytes(v) for v in row)
                    findings += find_in(data, raw_ids, f"{url} table {table.name}")
        tables = len(metadata.sorted_tables)
    finally:
        engine.dispose()
    if is_sqlite(url):
        findings += scan_files(sqlite_files(url), raw_ids)
    return findings, tables
