"""The bench meter's readings: CPU seconds of a process and bytes per table of a store."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from bench.meter import cpu_seconds, percentile, stored_bytes


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
