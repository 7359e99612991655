"""Stored messages, packed: zstandard with a dictionary Egret ships.

The serialized messages the services keep (ingest's and rules' recorded events, rules'
and score's outcomes) are a few hundred bytes each, mostly the same field tags, event
types, rule texts and legal bases again and again. Compressed one by one without help
they barely shrink (220 → 205 bytes); with a shared dictionary trained on such messages
they halve, and outcomes (evidence events inside) drop to about two fifths, at 2 to 4 µs
of CPU to pack and about 1 µs to unpack (docs/benchmarks.md, "stored messages packed").

`Packed` is the column type: what is bound is packed, what is read is unpacked, so every
reader through the mapped tables (ORM, Core, kit.rekey) sees the exact bytes that were
stored. A packed value is a zero byte, then a zstandard frame (its magic number, then a header
naming its dictionary). A serialized protobuf message never starts with a zero byte (tag 0
is not a field), so values stored before packing read as they were: no migration rewrites
old rows.

Dictionaries live in kit/dictionaries/, named `stored-messages-NNNN.zdict`; the highest
number packs, and every one stays to unpack what it packed. One that is gone leaves its
rows unreadable: a dictionary is never deleted (a test holds each shipped one to its
frames). `python -m devtools.pack_dictionary` trains a new one from a bench run's
databases; trained on live data it would hold fragments of it, so it is trained on
synthetic data (bench.pipeline's stream) and reviewed like code.
"""

from __future__ import annotations

import threading
from functools import cache
from importlib import resources
from typing import Any

import sqlalchemy as sa
import zstandard

# A zero byte, then the zstandard frame's own magic number: what a packed value starts with.
MARK = b"\x00\x28\xb5\x2f\xfd"
LEVEL = 3
_DIRECTORY = "dictionaries"
_PREFIX = "stored-messages-"
_PAGE = 1000


class UnknownDictionary(LookupError):
    """A packed value names a dictionary this build does not ship."""


@cache
def dictionaries() -> dict[int, zstandard.ZstdCompressionDict]:
    """Every shipped dictionary by its id, in file order (the last one packs)."""
    found: dict[int, zstandard.ZstdCompressionDict] = {}
    files = sorted(
        (entry for entry in resources.files("kit").joinpath(_DIRECTORY).iterdir()),
        key=lambda entry: entry.name,
    )
    for entry in files:
        if entry.name.startswith(_PREFIX) and entry.name.endswith(".zdict"):
            dictionary = zstandard.ZstdCompressionDict(entry.read_bytes())
            found[dictionary.dict_id()] = dictionary
    if not found:
        raise RuntimeError(f"no {_PREFIX}*.zdict in kit/{_DIRECTORY}: the package is incomplete")
    return found


@cache
def _current() -> zstandard.ZstdCompressionDict:
    dictionary = list(dictionaries().values())[-1]
    dictionary.precompute_compress(level=LEVEL)
    return dictionary


class _PerThread(threading.local):
    """zstandard's compressors and decompressors are not to be shared between threads."""

    def __init__(self) -> None:
        self.packer: zstandard.ZstdCompressor | None = None
        self.unpackers: dict[int, zstandard.ZstdDecompressor] = {}


_local = _PerThread()


def pack(message: bytes) -> bytes:
    """`message` packed, or as it is when packing would not make it smaller."""
    packer = _local.packer
    if packer is None:
        packer = _local.packer = zstandard.ZstdCompressor(
            level=LEVEL, dict_data=_current(), write_checksum=False, write_content_size=True
        )
    packed = MARK[:1] + packer.compress(message)
    return packed if len(packed) < len(message) else message


def unpack(stored: bytes) -> bytes:
    """The message `stored` holds, packed or not."""
    if not stored.startswith(MARK):
        return stored
    frame = stored[1:]  # the frame, its magic number included
    dict_id = zstandard.get_frame_parameters(frame).dict_id
    unpacker = _local.unpackers.get(dict_id)
    if unpacker is None:
        dictionary = dictionaries().get(dict_id)
        if dictionary is None:
            raise UnknownDictionary(
                f"a stored message was packed with dictionary {dict_id}, not shipped here"
            )
        unpacker = _local.unpackers[dict_id] = zstandard.ZstdDecompressor(dict_data=dictionary)
    return unpacker.decompress(frame)


class Packed(sa.TypeDecorator[bytes]):
    """A column of serialized messages, stored packed (module docstring)."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value: bytes | None, dialect: Any) -> bytes | None:
        return None if value is None else pack(value)

    def process_result_value(self, value: bytes | None, dialect: Any) -> bytes | None:
        return None if value is None else unpack(bytes(value))


def unpack_column(connection: sa.Connection, table: str, keys: tuple[str, ...], column: str) -> int:
    """Rewrite every packed value of `table.column` as the message it holds (a migration's
    downgrade below the revision that started packing, so earlier revisions read the
    bytes they wrote); `keys` is the table's primary key. Returns the rows rewritten."""
    stored = sa.table(table, *(sa.column(key) for key in keys), sa.column(column, sa.LargeBinary()))
    value, key_columns = stored.c[column], [stored.c[key] for key in keys]
    page = sa.select(*key_columns, value).where(sa.func.substr(value, 1, len(MARK)) == MARK).limit(_PAGE)
    rewritten = 0
    while packed := connection.execute(page).all():
        for row in packed:
            where = sa.and_(*(stored.c[key] == row[i] for i, key in enumerate(keys)))
            connection.execute(sa.update(stored).where(where).values({column: unpack(bytes(row[-1]))}))
        rewritten += len(packed)
    return rewritten


def unpack_columns(connection: sa.Connection, columns: tuple[tuple[str, tuple[str, ...], str], ...]) -> None:
    """unpack_column for each (table, primary key, column): the packing migrations' downgrade."""
    for table, keys, column in columns:
        unpack_column(connection, table, keys, column)
