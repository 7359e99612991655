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
from datetime import datetime

from domain.catalogue import Scalar
from egret.common.v1 import event_pb2
from kit.protoconv import SUBJECT_KIND_VALUES, to_attribute_value, to_timestamp

_LEN = 2  # wire type of strings, bytes and messages

Event = event_pb2.RecordedEvent


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload` (a serialized message) in a message of its own: the
    framing of a record as one item of a repeated field, without parsing it again."""
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    # A non-negative int in protobuf's base-128 varint encoding: the one piece of the wire
    # format the generated classes do not expose for bytes that are already serialized.
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


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
        occurred_at=to_timestamp(occurred_at),
        attributes={name: to_attribute_value(value) for name, value in attributes.items()},
        evidence_uri=evidence_uri,
    ).SerializeToString(deterministic=True)


def subject(subject_key: str, subject_key_id: str) -> bytes:
    """The subject key and its generation, as RecordedEvent fields."""
    return Event(subject_key=subject_key, subject_key_id=subject_key_id).SerializeToString()


def recorded_at(value: datetime) -> bytes:
    """The recording time as a RecordedEvent field (one per batch: every event shares it)."""
    return Event(recorded_at=to_timestamp(value)).SerializeToString()


def sequence(value: int) -> bytes:
    """The sequence as a RecordedEvent field."""
    return Event(sequence=value).SerializeToString()
