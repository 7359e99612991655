"""An event is serialized once: the stored record and the relayed outbox row are its
canonical bytes with fields appended, and parse as the messages built whole."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from egret.common.v1 import event_pb2, subject_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from kit.protoconv import Scalar, to_attribute_value, to_timestamp
from services.ingest import wire
from services.ingest.stores.events import event_payload

OCCURRED = datetime(2026, 10, 1, 8, 30, 15, 250000, tzinfo=UTC)
RECORDED = datetime(2026, 10, 2, 9, 0, tzinfo=UTC)
ATTRIBUTES: dict[str, Scalar] = {
    "station": "西湖",
    "amount": 3.5,
    "count": 2,
    "night": True,
    "seen_at": OCCURRED,
}


def whole(sequence: int = 0) -> event_pb2.RecordedEvent:
    """The event as one message, the way it was built before it was serialized once."""
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source="metro", event_id="e1"),
        event_type="transport.metro.fare_evasion",
        subject_key="ab" * 32,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=to_timestamp(OCCURRED),
        recorded_at=to_timestamp(RECORDED),
        attributes={name: to_attribute_value(value) for name, value in ATTRIBUTES.items()},
        evidence_uri="https://metro.example/r/1",
        subject_key_id="k2",
        sequence=sequence,
    )


def record() -> bytes:
    body = wire.body(
        source="metro",
        event_id="e1",
        event_type="transport.metro.fare_evasion",
        subject_kind="person",
        occurred_at=OCCURRED,
        attributes=ATTRIBUTES,
        evidence_uri="https://metro.example/r/1",
    )
    return body + wire.subject("ab" * 32, "k2") + wire.recorded_at(RECORDED)


def test_the_stored_record_is_the_recorded_event() -> None:
    assert event_pb2.RecordedEvent.FromString(record()) == whole()


@pytest.mark.parametrize("sequence", [1, 127, 128, 300, 2**35, 2**62])
def test_the_relayed_row_is_the_stored_record_with_its_sequence(sequence: int) -> None:
    payload = event_payload(record(), sequence)
    assert rules_pb.EvaluateEventsRequest.FromString(payload) == rules_pb.EvaluateEventsRequest(
        events=[whole(sequence)]
    )
    assert record() in payload


def test_the_canonical_body_does_not_depend_on_attribute_order() -> None:
    kwargs = {
        "source": "metro",
        "event_id": "e1",
        "event_type": "transport.metro.fare_evasion",
        "subject_kind": "person",
        "occurred_at": OCCURRED,
        "evidence_uri": "",
    }
    forward = wire.body(attributes=ATTRIBUTES, **kwargs)  # type: ignore[arg-type]
    backward = wire.body(attributes=dict(reversed(ATTRIBUTES.items())), **kwargs)  # type: ignore[arg-type]
    assert forward == backward
