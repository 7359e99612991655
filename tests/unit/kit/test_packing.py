"""Stored messages packed with a shipped dictionary (kit.packing): what goes in comes out,
values stored before packing read as they were, and no shipped dictionary may change."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import sqlalchemy as sa
import zstandard

from kit import packing
from tests.support.outcomes import outcome

FROZEN = Path(__file__).parent / "packed"


def message(events: int = 2) -> bytes:
    return outcome("o-1", "cd" * 32, -10, "library", events=events).SerializeToString(deterministic=True)


def test_a_message_packs_smaller_and_unpacks_to_the_same_bytes() -> None:
    original = message()
    packed = packing.pack(original)
    assert packed.startswith(packing.MARK)
    assert len(packed) < len(original) / 2
    assert packing.unpack(packed) == original


def test_a_value_packing_would_not_shrink_is_stored_as_it_is() -> None:
    tiny = b"\x0a\x01x"
    assert packing.pack(tiny) == tiny
    assert packing.unpack(tiny) == tiny


@pytest.mark.parametrize("stored", [message(), b"", b"\x00" * 10, b"\x00\x28\xb5"])
def test_values_stored_before_packing_read_as_they_were(stored: bytes) -> None:
    assert packing.unpack(stored) == stored


def test_each_shipped_dictionary_still_unpacks_what_it_packed() -> None:
    """A dictionary that changed or went would leave its rows unreadable: each one shipped
    has a frozen value packed with it here, and a new one needs its own."""
    shipped = sorted(
        entry.name.removesuffix(".zdict")
        for entry in resources.files("kit").joinpath("dictionaries").iterdir()
        if entry.name.endswith(".zdict")
    )
    assert shipped, "no dictionary shipped"
    original = (FROZEN / "outcome.bin").read_bytes()
    for name in shipped:
        frozen = FROZEN / f"outcome.{name}.bin"
        assert frozen.exists(), f"{name} has no frozen value: pack tests/unit/kit/packed/outcome.bin with it"
        assert packing.unpack(frozen.read_bytes()) == original


def test_a_value_packed_with_a_dictionary_not_shipped_is_refused() -> None:
    other = zstandard.train_dictionary(
        1024, [message(events=n % 5 + 1) + n.to_bytes(2, "big") for n in range(400)]
    )
    frame = zstandard.ZstdCompressor(dict_data=other, write_content_size=True).compress(message())
    with pytest.raises(packing.UnknownDictionary):
        packing.unpack(b"\x00" + frame)


def table() -> sa.Table:
    return sa.Table(
        "messages",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", packing.Packed),
    )


def test_a_packed_column_stores_packed_and_reads_the_message(tmp_path: Path) -> None:
    messages = table()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'packed.db'}")
    messages.create(engine)
    original = message()
    with engine.begin() as connection:
        connection.execute(sa.insert(messages), [{"id": 1, "body": original}, {"id": 2, "body": None}])
    with engine.connect() as connection:
        raw = connection.scalar(
            sa.select(sa.type_coerce(messages.c.body, sa.LargeBinary)).where(messages.c.id == 1)
        )
        assert raw is not None
        assert bytes(raw).startswith(packing.MARK)
        assert connection.execute(
            sa.select(messages.c.id, messages.c.body).order_by(messages.c.id)
        ).all() == [
            (1, original),
            (2, None),
        ]


def test_unpack_column_rewrites_packed_values_only(tmp_path: Path) -> None:
    messages = table()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'downgrade.db'}")
    messages.create(engine)
    rows = [{"id": i, "body": message(events=i % 3 + 1)} for i in range(1, 2500)]
    raw = sa.table("messages", sa.column("id"), sa.column("body", sa.LargeBinary()))
    with engine.begin() as connection:
        connection.execute(sa.insert(messages), rows)  # packed
        connection.execute(sa.insert(raw), [{"id": 5000, "body": b"\x00" * 10}])  # stored as it is
        assert packing.unpack_column(connection, "messages", ("id",), "body") == len(rows)
    with engine.connect() as connection:
        stored = {row[0]: row[1] for row in connection.execute(sa.select(raw.c.id, raw.c.body))}
    assert stored == {**{row["id"]: row["body"] for row in rows}, 5000: b"\x00" * 10}
