"""The bench meter's readings: CPU seconds of a process and of a run's database server, and
bytes per table of a store."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.meter import ServerMeter, cpu_seconds, percentile, stored_bytes
from tests.support.databases import POSTGRES_ADMIN_URL, create_postgres_database, drop_postgres_database


def test_cpu_seconds_grow_with_work_and_are_zero_for_a_gone_process() -> None:
    before = cpu_seconds(os.getpid())
    total = 0
    while cpu_seconds(os.getpid()) <= before:
        total += sum(range(10_000))
    assert cpu_seconds(os.getpid()) > before
    assert cpu_seconds(2**22 + 12_345) == 0.0


def test_stored_bytes_count_a_tables_indexes_with_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)")
        connection.execute("CREATE TABLE empty (id INTEGER PRIMARY KEY)")
        connection.executemany("INSERT INTO events (body) VALUES (?)", [("x" * 200,)] * 500)
    bare = stored_bytes(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE INDEX events_body ON events (body)")
    indexed = stored_bytes(f"sqlite:///{path}")

    assert bare["events"] >= 500 * 200
    assert indexed["events"] >= bare["events"] + 500 * 200  # the index holds every body again
    assert "events_body" not in indexed
    assert indexed["empty"] == bare["empty"]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    hundred = [float(n) for n in range(1, 101)]
    # 99 of the 100 are at or below the 99th: not one rank higher (round-half-even once gave 100).
    assert (percentile(hundred, 99), percentile(hundred, 98), percentile(hundred, 100)) == (99.0, 98.0, 100.0)
    assert percentile([5.0], 1) == 5.0


@pytest.mark.postgres
def test_the_server_meter_counts_the_runs_backends_and_not_another_databases() -> None:
    ours, theirs = create_postgres_database(), create_postgres_database()
    meter = ServerMeter(POSTGRES_ADMIN_URL, [sa.make_url(ours).database or ""])
    engines = [sa.create_engine(url, poolclass=sa.NullPool) for url in (ours, theirs)]
    try:
        with engines[0].connect() as mine, engines[1].connect() as other:
            meter.start()
            busy = sa.text("SELECT count(*) FROM generate_series(1, 3000000)")
            other.execute(busy)
            other.execute(busy)
            others_work = meter.seconds()
            mine.execute(busy)
            mine.execute(busy)
            assert meter.seconds() - others_work > 0.2
            assert others_work < 0.2
    finally:
        meter.close()
        for engine in engines:
            engine.dispose()
        drop_postgres_database(ours)
        drop_postgres_database(theirs)
