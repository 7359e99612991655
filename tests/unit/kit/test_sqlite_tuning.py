"""SQLite engines run as their SqliteTuning says, and the settings read it from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from kit.db import create_engine
from kit.env import SettingsError
from kit.settings import SqliteTuning
from services.ingest.settings import IngestSettings


def _pragmas(engine: sa.Engine) -> dict[str, object]:
    with engine.connect() as connection:
        return {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("synchronous", "cache_size", "wal_autocheckpoint", "journal_mode", "query_only")
        }


def test_a_writer_gets_its_cache_and_checkpoint_interval(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = create_engine(
        url, sqlite=SqliteTuning(synchronous="NORMAL", cache_mib=24, checkpoint_pages=2500)
    )
    try:
        # synchronous: 1 is NORMAL; cache_size in KiB when negative.
        assert _pragmas(engine) == {
            "synchronous": 1,
            "cache_size": -24 * 1024,
            "wal_autocheckpoint": 2500,
            "journal_mode": "wal",
            "query_only": 0,
        }
    finally:
        engine.dispose()


def test_the_defaults_and_a_reader(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    create_engine(url).dispose()  # creates the file, in WAL mode
    writer = create_engine(url)
    reader = create_engine(url, read_only=True)
    try:
        assert _pragmas(writer) == {
            "synchronous": 2,  # FULL
            "cache_size": -16 * 1024,
            "wal_autocheckpoint": 10_000,
            "journal_mode": "wal",
            "query_only": 0,
        }
        read = _pragmas(reader)
        assert read["cache_size"] == -16 * 1024
        assert read["query_only"] == 1
    finally:
        writer.dispose()
        reader.dispose()


def test_settings_read_the_tuning_and_bound_it() -> None:
    base = {"EGRET_SUBJECT_KEY": "x" * 32, "EGRET_INSECURE": "true"}
    assert IngestSettings.from_env(base).common.sqlite == SqliteTuning()
    tuned = IngestSettings.from_env(
        base
        | {
            "EGRET_SQLITE_SYNCHRONOUS": "NORMAL",
            "EGRET_SQLITE_CACHE_MIB": "64",
            "EGRET_SQLITE_CHECKPOINT_PAGES": "1000",
        }
    )
    assert tuned.common.sqlite == SqliteTuning(synchronous="NORMAL", cache_mib=64, checkpoint_pages=1000)
    with pytest.raises(SettingsError) as raised:
        IngestSettings.from_env(base | {"EGRET_SQLITE_CACHE_MIB": "0", "EGRET_SQLITE_CHECKPOINT_PAGES": "10"})
    assert raised.value.problems == [
        "EGRET_SQLITE_CACHE_MIB=0 is below the minimum 1",
        "EGRET_SQLITE_CHECKPOINT_PAGES=10 is below the minimum 100",
    ]
