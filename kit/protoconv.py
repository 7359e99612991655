"""Conversions between protobuf messages and plain Python values, shared by servicers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import event_pb2, outcome_pb2, subject_pb2

Scalar = str | int | float | bool | datetime

SUBJECT_KIND_NAMES = {
    subject_pb2.SUBJECT_KIND_PERSON: "person",
    subject_pb2.SUBJECT_KIND_ORGANIZATION: "organization",
}
SUBJECT_KIND_VALUES = {name: value for value, name in SUBJECT_KIND_NAMES.items()}

SEVERITY_NAMES = {
    outcome_pb2.SEVERITY_POSITIVE: "positive",
    outcome_pb2.SEVERITY_MINOR: "minor",
    outcome_pb2.SEVERITY_GENERAL: "general",
    outcome_pb2.SEVERITY_SERIOUS: "serious",
}
SEVERITY_VALUES = {name: value for value, name in SEVERITY_NAMES.items()}


def to_datetime(ts: Timestamp) -> datetime:
    """A timezone-aware UTC datetime, microsecond precision."""
    return datetime.fromtimestamp(ts.seconds, UTC).replace(microsecond=ts.nanos // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(value: datetime) -> Timestamp:
    """A Timestamp of `value` (a naive one read as local time, as astimezone does): seconds
    rounded down, nanos in [0, 1e9). Computed here, as Timestamp.FromDatetime is Python code
    four times as slow and this runs for every event."""
    if value.tzinfo is None:
        value = value.astimezone(UTC)
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def attribute_value(value: event_pb2.AttributeValue) -> Scalar | None:
    """The Python value of an AttributeValue, or None when no member is set."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "timestamp_value":
        return to_datetime(value.timestamp_value)
    result: Scalar = getattr(value, which)
    return result


def to_attribute_value(value: Scalar) -> event_pb2.AttributeValue:
    if isinstance(value, bool):
        return event_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return event_pb2.AttributeValue(int_value=value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("attribute values must be finite")
        return event_pb2.AttributeValue(double_value=value)
    if isinstance(value, datetime):
        return event_pb2.AttributeValue(timestamp_value=to_timestamp(value))
    return event_pb2.AttributeValue(string_value=value)


def attributes_dict(attributes: Mapping[str, event_pb2.AttributeValue]) -> dict[str, Scalar]:
    result: dict[str, Scalar] = {}
    for name, value in attributes.items():
        plain = attribute_value(value)
        if plain is not None:
            result[name] = plain
    return result
