"""Recorded events (protobuf, as ingest delivers and rules stores them) ⇄ engine events.

Shared by the servicer (events arriving on the wire) and storage (events read back
from the inbox and the dead letters as evaluation history), so both see one shape.
"""

from __future__ import annotations

from domain.ruleset.model import EngineEvent
from egret.common.v1 import event_pb2
from kit.protoconv import SUBJECT_KIND_NAMES, attributes_dict, to_datetime


def engine_event(event: event_pb2.RecordedEvent) -> EngineEvent:
    return EngineEvent(
        key=f"{event.ref.source}/{event.ref.event_id}",
        subject_key=event.subject_key,
        subject_kind=SUBJECT_KIND_NAMES[event.subject_kind],
        event_type=event.event_type,
        occurred_at=to_datetime(event.occurred_at),
        attributes=attributes_dict(event.attributes),
    )


def engine_event_from_record(record: bytes) -> EngineEvent:
    return engine_event(event_pb2.RecordedEvent.FromString(record))
