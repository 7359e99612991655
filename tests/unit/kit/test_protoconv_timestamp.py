"""kit.protoconv's Timestamp conversion, computed by hand for speed, equals protobuf's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from kit.protoconv import to_timestamp


def reference(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 10, 1, 8, 30, 15, 250000, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 10, 30, 0, 1, tzinfo=timezone(timedelta(hours=8))),
        datetime(2026, 3, 29, 10, 30, 0, 1),  # naive: local time, as astimezone reads it
    ],
)
def test_to_timestamp_equals_protobufs_from_datetime(value: datetime) -> None:
    assert to_timestamp(value) == reference(value)
