"""Requests are decoded without raising, range-checked in one walk, and a decode failure
names the field whose bytes are broken."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto

from egret.ingest.v1 import ingest_service_pb2 as pb
from kit.decoding import (
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MIN_SECONDS,
    Undecodable,
    range_violations,
    tolerant,
)

decode = tolerant(pb.SubmitEventsRequest.FromString, "/egret.ingest.v1.IngestService/SubmitEvents")


def _request() -> pb.SubmitEventsRequest:
    request = pb.SubmitEventsRequest(source="library")
    event = request.events.add(event_id="e1", event_type="book_returned_late")
    event.occurred_at.seconds = 1_700_000_000
    event.attributes["days_late"].int_value = 3
    return request


def test_a_valid_request_decodes_to_its_message() -> None:
    assert decode is not None
    assert decode(_request().SerializeToString()) == _request()


def test_out_of_range_timestamps_durations_and_numbers_are_named_by_path() -> None:
    request = _request()
    request.events.add(event_id="e2").occurred_at.seconds = TIMESTAMP_MAX_SECONDS + 1
    request.events.add(event_id="e3").occurred_at.seconds = TIMESTAMP_MIN_SECONDS - 1
    request.events.add(event_id="e4").occurred_at.nanos = -1
    request.events[0].attributes["due"].timestamp_value.nanos = 1_000_000_000
    request.events[0].attributes["ratio"].double_value = float("nan")
    assert {(v.field, v.reason) for v in range_violations(request)} == {
        ("events[1].occurred_at", "OUT_OF_RANGE"),
        ("events[2].occurred_at", "OUT_OF_RANGE"),
        ("events[3].occurred_at.nanos", "OUT_OF_RANGE"),
        ("events[0].attributes.due.timestamp_value.nanos", "OUT_OF_RANGE"),
        ("events[0].attributes.ratio.double_value", "OUT_OF_RANGE"),
    }
    assert decode is not None
    result = decode(request.SerializeToString())
    assert isinstance(result, Undecodable)
    assert len(result.error.violations) == 5


def test_the_range_limits_themselves_are_accepted() -> None:
    request = _request()
    request.events.add(event_id="e2").occurred_at.seconds = TIMESTAMP_MAX_SECONDS
    request.events[1].occurred_at.nanos = 999_999_999
    request.events.add(event_id="e3").occurred_at.seconds = TIMESTAMP_MIN_SECONDS
    assert range_violations(request) == []


def test_undecodable_bytes_become_a_marker_naming_the_broken_field() -> None:
    valid = _request().SerializeToString()
    # Bad UTF-8 in events[1].event_id: field 2 (events), then field 1 (event_id) inside.
    bad_event = b"\x0a\x02\xff\xfe"
    data = valid + b"\x12" + bytes([len(bad_event)]) + bad_event
    assert decode is not None
    result = decode(data)
    assert isinstance(result, Undecodable)
    assert [(v.field, v.reason) for v in result.error.violations] == [("events[1].event_id", "UNDECODABLE")]


def test_bytes_that_cannot_be_split_into_fields_are_refused_without_a_field() -> None:
    assert decode is not None
    for garbage in (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0f", b"\x12\x7f"):
        result = decode(garbage)
        assert isinstance(result, Undecodable)
        assert "SubmitEventsRequest" in result.error.message


def test_no_deserializer_means_raw_bytes() -> None:
    assert tolerant(None, "/egret.ingest.v1.IngestService/SubmitEvents") is None


def _probe_class() -> Any:
    """A message with every kind of field the walk checks, in a pool of its own."""
    pool = descriptor_pool.DescriptorPool()
    for dependency in (duration_pb2, timestamp_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="probe.proto",
        package="probe",
        syntax="proto3",
        dependency=["google/protobuf/duration.proto", "google/protobuf/timestamp.proto"],
    )
    probe = file.message_type.add(name="Probe")
    entry = probe.nested_type.add(name="RatiosEntry", options=descriptor_pb2.MessageOptions(map_entry=True))
    entry.field.add(name="key", number=1, type=FieldDescriptorProto.TYPE_STRING)
    entry.field.add(name="value", number=2, type=FieldDescriptorProto.TYPE_DOUBLE)
    optional, repeated = FieldDescriptorProto.LABEL_OPTIONAL, FieldDescriptorProto.LABEL_REPEATED
    message = FieldDescriptorProto.TYPE_MESSAGE
    for name, number, label, kind, type_name in [
        ("xs", 1, repeated, FieldDescriptorProto.TYPE_DOUBLE, ""),
        ("ratios", 2, repeated, message, ".probe.Probe.RatiosEntry"),
        ("wait", 3, optional, message, ".google.protobuf.Duration"),
        ("x", 4, optional, FieldDescriptorProto.TYPE_FLOAT, ""),
        ("at", 5, repeated, message, ".google.protobuf.Timestamp"),
        ("child", 6, optional, message, ".probe.Probe"),
        ("label", 7, optional, FieldDescriptorProto.TYPE_STRING, ""),
    ]:
        field = probe.field.add(name=name, number=number, label=label, type=kind)
        if type_name:
            field.type_name = type_name
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("probe.Probe"))


def test_every_kind_of_checked_field_is_named_in_field_order() -> None:
    probe = _probe_class()()
    probe.xs.extend([1.0, float("inf"), float("nan")])
    probe.ratios["ok"] = 0.5
    probe.ratios["bad"] = float("-inf")
    probe.wait.seconds, probe.wait.nanos = 1, -1
    probe.x = float("nan")
    probe.at.add(seconds=TIMESTAMP_MAX_SECONDS + 1)
    probe.at.add(seconds=0)
    probe.child.wait.seconds = -(10**12)
    probe.child.child.xs.append(float("nan"))
    probe.label = "not checked"
    assert [(v.field, v.reason) for v in range_violations(probe)] == [
        ("xs[1]", "OUT_OF_RANGE"),
        ("xs[2]", "OUT_OF_RANGE"),
        ("ratios.bad", "OUT_OF_RANGE"),
        ("wait.nanos", "OUT_OF_RANGE"),
        ("x", "OUT_OF_RANGE"),
        ("at[0]", "OUT_OF_RANGE"),
        ("child.wait", "OUT_OF_RANGE"),
        ("child.child.xs[0]", "OUT_OF_RANGE"),
    ]
