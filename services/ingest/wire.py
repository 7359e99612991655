"""A recorded event's bytes, serialized once: the canonical body, then fields appended to it.

Protobuf's wire format lets a message be written in pieces: fields may come in any order,
and bytes appended to a serialized message parse as those fields of it
(https://protobuf.dev/programming-guides/encoding/). Ingest serializes each event's
canonical body once (deterministically: attributes sorted by name), hashes it for the
event's fingerprint (services.ingest.domain), stores it with the subject key and the
recording time appended, and relays those same bytes with the sequence appended, framed
as one item of a repeated field; no copy is built or serialized again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from domain.catalogue import Scalar
from egret.common.v1 import event_pb2
from kit.protoconv import SUBJECT_KIND_VALUES, to_attribute_value

_LEN = 2  # wire type of strings, bytes and messages
_VARINT = 0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Event = event_pb2.RecordedEvent


def timestamp(value: datetime) -> Timestamp:
    """kit.protoconv.to_timestamp for an aware datetime, in a quarter of its time (the
    Timestamp's FromDatetime is Python code): seconds rounded down, nanos in [0, 1e9)."""
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def varint(value: int) -> bytes:
    """A non-negative integer in protobuf's base-128 varint encoding."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload` (a string, bytes or a serialized message)."""
    return varint(number << 3 | _LEN) + varint(len(payload)) + payload


def body(
    *,
    source: str,
    event_id: str,
    event_type: str,
    subject_kind: str,
    occurred_at: datetime,
    attributes: Mapping[str, Scalar],
    evidence_uri: str,
) -> bytes:
    """The RecordedEvent fields a department decides, deterministically serialized: the
    same event always gives the same bytes. The subject key, its generation, the
    recording time and the sequence are not in it (see `subject`, `recorded_at`,
    `sequence`)."""
    return Event(
        ref=event_pb2.EventRef(source=source, event_id=event_id),
        event_type=event_type,
        subject_kind=SUBJECT_KIND_VALUES[subject_kind],
        occurred_at=timestamp(occurred_at),
        attributes={name: to_attribute_value(value) for name, value in attributes.items()},
        evidence_uri=evidence_uri,
    ).SerializeToString(deterministic=True)


def subject(subject_key: str, subject_key_id: str) -> bytes:
    """The subject key and its generation, as RecordedEvent fields."""
    return length_delimited(Event.SUBJECT_KEY_FIELD_NUMBER, subject_key.encode()) + length_delimited(
        Event.SUBJECT_KEY_ID_FIELD_NUMBER, subject_key_id.encode()
    )


def recorded_at(value: datetime) -> bytes:
    """The recording time as a RecordedEvent field (one per batch: every event shares it)."""
    return length_delimited(Event.RECORDED_AT_FIELD_NUMBER, timestamp(value).SerializeToString())


def sequence(value: int) -> bytes:
    """The sequence as a RecordedEvent field."""
    return varint(Event.SEQUENCE_FIELD_NUMBER << 3 | _VARINT) + varint(value)
