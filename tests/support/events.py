"""Building sample events for tests: the same shapes a department sends."""

from __future__ import annotations

from datetime import UTC, datetime

from egret.common.v1 import subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from kit.protoconv import Scalar, to_attribute_value, to_timestamp
from kit.pseudonym import resident_id_check_character

TEST_SUBJECT_KEY = b"test-subject-key-0123456789abcdef0123"
PERSON = subject_pb2.SUBJECT_KIND_PERSON
ORGANIZATION = subject_pb2.SUBJECT_KIND_ORGANIZATION


def resident_id(number: int, region: str = "350200") -> str:
    """A well-formed resident id (valid check character), one for each number below 10**11."""
    body = f"{region}{number:011d}"
    return body + resident_id_check_character(body)


def full_width(text: str) -> str:
    """`text` in full-width forms (as typed with a CJK input method); NFKC undoes it."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


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
