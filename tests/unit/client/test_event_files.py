"""The client library's reading of event files (egret_client.eventfiles) and the checkpoint of a
resumable submission (egret_client.checkpoint), without any service."""

from __future__ import annotations

from pathlib import Path

import pytest

from egret.common.v1 import subject_pb2
from egret_client.checkpoint import Checkpoint, CheckpointMismatch, Counts, Identity, file_sha256
from egret_client.eventfiles import (
    FileError,
    FileFormat,
    Record,
    catalogue_types,
    event_from_json,
    format_of,
    read_records,
)

SUBJECT = "11010519491231002X"
TYPES = catalogue_types(Path("config/catalogue.yaml"))


def problems(records: list[Record]) -> list[tuple[int, list[tuple[str, str]]]]:
    return [(r.line, [(v.field, v.reason) for v in r.violations]) for r in records if r.violations]


def test_json_lines_read_proto_json_and_plain_values_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"event_id": "a", "eventType": "library.book_returned_late", "subject": {"kind": "person", '
        f'"idScheme": "resident-id", "id_value": "{SUBJECT}"}}, "occurred_at": "2026-06-01T20:00:00+08:00", '
        '"attributes": {"days_late": 3, "ratio": {"double_value": "0.5"}, "when": {"timestampValue": '
        '"2026-06-01T12:00:00.25Z"}}}\n'
        "\n"
        "not json\n"
        '{"event_type": "x", "subject": {"kind": "alien", "colour": 1}, "occurred_at": "yesterday", '
        '"attributes": {"a": null, "b": [1], "c": {"int_value": 1.5}}, "zzz": 1}\n'
        "[1]\n",
        encoding="utf-8",
    )
    records = list(read_records(path, FileFormat.JSONL))
    assert [(r.line, r.index, r.sendable) for r in records] == [
        (1, 0, True),
        (3, 1, False),
        (4, 2, False),
        (5, 3, False),
    ]
    event = records[0].event
    assert event is not None
    assert event.subject.kind == subject_pb2.SUBJECT_KIND_PERSON
    assert event.occurred_at.seconds == 1780315200
    assert event.attributes["days_late"].int_value == 3
    assert event.attributes["ratio"].double_value == 0.5
    assert event.attributes["when"].timestamp_value.nanos == 250_000_000
    assert problems(records) == [
        (3, [("", "NOT_JSON")]),
        (
            4,
            [
                ("zzz", "UNKNOWN"),
                ("event_id", "REQUIRED"),
                ("subject.kind", "INVALID"),
                ("subject.colour", "UNKNOWN"),
                ("occurred_at", "INVALID_TIME"),
                ("attributes.a", "REQUIRED"),
                ("attributes.b", "WRONG_TYPE"),
                ("attributes.c", "WRONG_TYPE"),
            ],
        ),
        (5, [("", "WRONG_TYPE")]),
    ]
    # What could be read of a bad record is kept, so ingest's validator can find the rest.
    assert records[2].event is not None
    assert records[2].event.event_type == "x"


def test_csv_cells_are_typed_by_the_catalogue_or_by_their_value(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "\ufeffevent_id,event_type,subject_kind,id_scheme,id_value,occurred_at,attr.fence_id,attr.minutes\n"
        f"p1,transport.bike.parked_outside_fence,person,resident-id,{SUBJECT},2026-06-01T12:00:00Z,0042,15\n"
        f'p2,transport.bike.parked_outside_fence,person,resident-id,"{SUBJECT}",2026-06-01T12:00:00Z,,x\n'
        "\n"
        ",transport.bike.parked_outside_fence,robot,resident-id,1,2026-06-01,F-1,2.5\n"
        "p4,too,few\n",
        encoding="utf-8",
    )
    typed = list(read_records(path, FileFormat.CSV, TYPES))
    first = typed[0].event
    assert first is not None
    assert first.attributes["fence_id"].string_value == "0042"
    assert first.attributes["minutes"].int_value == 15
    assert "fence_id" not in typed[1].event.attributes  # type: ignore[union-attr]
    assert problems(typed) == [
        (3, [("attributes.minutes", "WRONG_TYPE")]),
        (5, [("event_id", "REQUIRED"), ("subject.kind", "INVALID"), ("occurred_at", "INVALID_TIME"),
             ("attributes.minutes", "WRONG_TYPE")]),
        (6, [("", "WRONG_SHAPE")]),
    ]  # fmt: skip
    # Without the catalogue a cell is typed by its value: digits are a whole number.
    untyped = next(read_records(path, FileFormat.CSV)).event
    assert untyped is not None
    assert untyped.attributes["fence_id"].int_value == 42
    assert untyped.attributes["minutes"].int_value == 15


def test_a_csv_header_without_the_event_columns_is_refused_whole(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("event_id,colour\n1,red\n", encoding="utf-8")
    with pytest.raises(FileError, match=r"unknown column\(s\) 'colour'"):
        list(read_records(path, FileFormat.CSV))
    path.write_text("event_id,event_type\n1,x\n", encoding="utf-8")
    with pytest.raises(FileError, match="lacks the column"):
        list(read_records(path, FileFormat.CSV))
    assert format_of(Path("a.NDJSON")) is FileFormat.JSONL
    with pytest.raises(FileError, match="--format"):
        format_of(Path("a.txt"))


def test_skipped_records_are_counted_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(f'{{"event_id": "e{i}"}}\n' for i in range(5)) + "garbage\n", encoding="utf-8")
    kept = list(read_records(path, FileFormat.JSONL, wanted=lambda index: index in (1, 5)))
    assert [(r.index, r.line) for r in kept] == [(1, 2), (5, 6)]


def test_a_single_event_is_read_with_its_problems_and_typed_by_the_catalogue() -> None:
    document = {"event_id": "", "event_type": "library.book_returned_late", "attributes": {"days_late": "3"}}
    event, found = event_from_json(document, TYPES)
    assert event is not None
    assert event.attributes["days_late"].int_value == 3
    assert [(v.field, v.reason) for v in found] == [("event_id", "REQUIRED")]
    none, found = event_from_json([1])
    assert none is None
    assert [(v.field, v.reason) for v in found] == [("", "WRONG_TYPE")]


def test_a_checkpoint_resumes_its_own_file_only_and_survives_a_torn_line(tmp_path: Path) -> None:
    data = tmp_path / "events.jsonl"
    data.write_text('{"event_id": "a"}\n', encoding="utf-8")
    identity = Identity(file_sha256(data), "library", 100)
    path = tmp_path / "events.jsonl.checkpoint"
    checkpoint = Checkpoint.open(path, identity)
    assert not checkpoint.resumed
    assert not path.exists()
    checkpoint.record(0, Counts(accepted=99, duplicate=1))
    checkpoint.record(2, Counts(accepted=50, invalid=50))
    checkpoint.close()
    # A run killed while writing leaves half a line.
    with path.open("a", encoding="utf-8") as stream:
        stream.write('{"batch": 3, "accep')

    resumed = Checkpoint.open(path, Identity(identity.sha256, "library", 500))
    assert resumed.identity.batch_size == 100
    assert sorted(resumed.acked) == [0, 2]
    assert resumed.totals() == Counts(accepted=149, duplicate=1, invalid=50)
    assert resumed.totals().records == 200
    assert resumed.batch_id(2) == f"{identity.sha256[:16]}-00000002"
    resumed.record(1, Counts(accepted=100))
    resumed.close()
    assert len(path.read_text().splitlines()) == 4

    with pytest.raises(CheckpointMismatch, match="changed since the checkpoint"):
        Checkpoint.open(path, Identity("0" * 64, "library", 100), file_name="events.jsonl")
    with pytest.raises(CheckpointMismatch, match="not 'metro'"):
        Checkpoint.open(path, Identity(identity.sha256, "metro", 100))
    Checkpoint.open(path, identity).remove()
    assert not path.exists()
