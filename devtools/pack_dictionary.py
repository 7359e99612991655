"""Train the next dictionary for stored messages (kit.packing) from a bench run's databases.

    python -m bench.pipeline --events 10000 --skip-raw --data-dir /tmp/pack-data
    python -m devtools.pack_dictionary /tmp/pack-data

reads every recorded event and outcome the run stored (ingest, rules and score, SQLite),
trains a zstandard dictionary on them and writes it as the next
kit/dictionaries/stored-messages-NNNN.zdict, which then packs every new value; the earlier
ones stay, to unpack what they packed. Train on synthetic data only: a dictionary holds
fragments of what it was trained on, and it ships in the image.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import zstandard

from kit import packing

# (database file, table, column) of every stored message the services pack.
SOURCES = (
    ("ingest.db", "ingest_events", "record"),
    ("rules.db", "rules_evaluated_events", "record"),
    ("rules.db", "rules_outcomes", "outcome"),
    ("score.db", "score_ledger", "outcome"),
)
DICTIONARY_BYTES = 8192


def samples(directory: Path) -> Iterator[bytes]:
    for database, table, column in SOURCES:
        uri = f"file:{directory / database}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            for (stored,) in connection.execute(f"SELECT {column} FROM {table}"):
                yield packing.unpack(bytes(stored))


def next_path(directory: Path) -> Path:
    numbers = [int(path.stem.rsplit("-", 1)[1]) for path in directory.glob("stored-messages-*.zdict")]
    return directory / f"stored-messages-{max(numbers, default=0) + 1:04d}.zdict"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.pack_dictionary", description=__doc__.split("\n")[0]
    )
    parser.add_argument("data_dir", type=Path, help="a bench.pipeline --data-dir after its run")
    parser.add_argument("--size", type=int, default=DICTIONARY_BYTES, help="dictionary bytes (default 8192)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(packing.__file__).parent / "dictionaries",
        help="where dictionaries live",
    )
    args = parser.parse_args(argv)
    stored: list[bytes | bytearray | memoryview] = list(samples(args.data_dir))
    dictionary = zstandard.train_dictionary(args.size, stored)
    path = next_path(args.out)
    path.write_bytes(dictionary.as_bytes())
    print(
        f"{path}: {len(dictionary.as_bytes())} bytes, id {dictionary.dict_id()}, from {len(stored)} messages"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
