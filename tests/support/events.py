"""Building sample events for tests: the same shapes a department sends."""

from __future__ import annotations

from datetime import UTC, datetime

from egret.common.v1 import subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from kit.protoconv import Scalar, to_attribute_value, to_timestamp

TEST_SUBJECT_KEY = b"test-subject-key-0123456789abcdef0123"
PERSON = subject_pb2.SUBJECT_KIND_PERSON
ORGANIZATION = subject_pb2.SUBJECT_KIND_ORGANIZATION


def event(
    event_id: str,
    event_type: str,
    subject_id: str,
    attributes: dict[str, Scalar],
    *,
    occurred_at: datetime = datetime(2026, 6, 1, 12, 0, tzinfo=UTC),
    kind: int = PERSON,
    scheme: str | None = None,
) -> ingest_pb.Event:
    scheme = scheme or ("resident-id" if kind == PERSON else "uscc")
    return ingest_pb.Event(
        event_id=event_id,
        event_type=event_type,
        subject=subject_pb2.Subject(kind=kind, id_scheme=scheme, id_value=subject_id),  # type: ignore[arg-type]
        occurred_at=to_timestamp(occurred_at),
        attributes={name: to_attribute_value(value) for name, value in attributes.items()},
        evidence_uri=f"https://records.example.gov/{event_id}",
    )
