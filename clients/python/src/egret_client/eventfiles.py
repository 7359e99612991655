"""A department's event file, JSON Lines or CSV, read one record at a time into Event messages.

Each record comes with its line number and what is wrong with it *as a file*: not JSON, a
field of the wrong JSON type, a time that is not RFC 3339, no event_id. Whether the event
is valid for the catalogue (types, owners, attribute ranges, subject ids) is ingest's own
judgement (SubmitEvents with validate_only); nothing here second-guesses it.

JSON Lines: one object per line, the Event message as JSON (proto field names or their
lowerCamelCase JSON names). An attribute is either the AttributeValue as JSON
(`{"int_value": 3}`) or a plain JSON value (`3`, `true`, `"F-12"`), typed by its JSON type
or, given the catalogue, by the type the catalogue declares:

    {"event_id": "lib-1", "event_type": "library.book_returned_late",
     "subject": {"kind": "SUBJECT_KIND_PERSON", "id_scheme": "resident-id", "id_value": "…"},
     "occurred_at": "2026-06-01T12:00:00Z", "attributes": {"days_late": 3}}

CSV: a header, then one event per row. Columns event_id, event_type, subject_kind (person
or organization), id_scheme, id_value, occurred_at (RFC 3339) and optionally evidence_uri,
plus one `attr.<name>` column per attribute; an empty cell leaves the attribute out. A
cell is typed by the catalogue when it is given, else by its value (true/false, a whole
number, a decimal number, else a string).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from egret.common.v1 import event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2
from egret_client.errors import Violation

Event = ingest_service_pb2.Event
AttributeValue = event_pb2.AttributeValue
# event type → attribute name → the catalogue's type (string, int, double, bool, timestamp).
AttributeTypes = Mapping[str, Mapping[str, str]]


class FileFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


_BY_SUFFIX = {".jsonl": FileFormat.JSONL, ".ndjson": FileFormat.JSONL, ".csv": FileFormat.CSV}


class FileError(Exception):
    """The file as a whole cannot be read (missing, not UTF-8, a CSV header without the
    columns an event needs)."""


@dataclass(frozen=True)
class Record:
    """One record of the file: the event, and what kept it from being read fully."""

    # Where the record starts, from 1 (a CSV file's header is line 1).
    line: int
    # Its position among the file's records, from 0: what batches are cut by.
    index: int
    # The event as far as it could be read (None: not at all). With violations it is only
    # good for finding its other problems (validate_only), never for sending.
    event: Event | None
    violations: tuple[Violation, ...]
    # The record as the file holds it (a JSON value, a CSV row as a mapping, or the text),
    # for the rejects file.
    raw: Any

    @property
    def sendable(self) -> bool:
        return self.event is not None and not self.violations


def format_of(path: Path, explicit: FileFormat | None = None) -> FileFormat:
    """The explicit format, else the one the file's extension names."""
    if explicit is not None:
        return explicit
    found = _BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise FileError(f"{path}: cannot tell the format from the extension; say --format jsonl or csv")
    return found


def catalogue_types(path: Path) -> dict[str, dict[str, str]]:
    """The attribute types a catalogue file (config/catalogue.yaml's shape) declares."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FileError(f"cannot read the catalogue {path}: {exc}") from None
    types: dict[str, dict[str, str]] = {}
    entries = document.get("event_types") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise FileError(f"{path}: not a catalogue (no event_types list)")
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            attributes = entry.get("attributes") or {}
            types[entry["name"]] = {
                str(name): str(spec.get("type", ""))
                for name, spec in attributes.items()
                if isinstance(spec, dict)
            }
    return types


def read_records(
    path: Path,
    fmt: FileFormat,
    types: AttributeTypes | None = None,
    *,
    wanted: Callable[[int], bool] | None = None,
) -> Iterator[Record]:
    """Every record of the file in order. A record whose index `wanted` refuses is counted
    but not parsed or yielded (a resumed run skips what was acknowledged)."""
    reader = _read_csv if fmt is FileFormat.CSV else _read_jsonl
    return reader(path, types or {}, wanted)


def event_from_json(value: Any, types: AttributeTypes | None = None) -> tuple[Event | None, list[Violation]]:
    """An Event from its JSON form (one JSON Lines record, or `egret events correct`'s file)
    and every problem found. The event is as much of it as could be read (None when the
    value is no object); with problems, it must not be sent."""
    if not isinstance(value, dict):
        return None, [Violation("", "must be a JSON object (one event)", "WRONG_TYPE")]
    problems: list[Violation] = []
    fields: dict[str, Any] = {}
    for key, item in value.items():
        name = _JSON_NAMES.get(key)
        if name is None:
            problems.append(Violation(str(key), "is not a field of Event", "UNKNOWN"))
        else:
            fields[name] = item
    for name in ("event_id", "event_type", "evidence_uri"):
        if name in fields and not isinstance(fields[name], str):
            problems.append(Violation(name, "must be a string", "WRONG_TYPE"))
            del fields[name]
    event = Event(
        event_id=fields.get("event_id", ""),
        event_type=fields.get("event_type", ""),
        evidence_uri=fields.get("evidence_uri", ""),
    )
    if not event.event_id:
        problems.append(_NO_EVENT_ID)
    if "subject" in fields:
        _json_subject(fields["subject"], event.subject, problems)
    if "occurred_at" in fields:
        _timestamp("occurred_at", fields["occurred_at"], event.occurred_at, problems)
    attributes = fields.get("attributes", {})
    if not isinstance(attributes, dict):
        problems.append(Violation("attributes", "must be an object of attribute values", "WRONG_TYPE"))
    else:
        declared = types.get(event.event_type, {}) if types else {}
        for name, item in attributes.items():
            attribute = _json_attribute(f"attributes.{name}", item, declared.get(name), problems)
            if attribute is not None:
                event.attributes[name].CopyFrom(attribute)
    return event, problems


# Without an event_id an event cannot be idempotent: a resend would store it twice.
_NO_EVENT_ID = Violation("event_id", "is required: ingest tells a resend from a new event by it", "REQUIRED")


def _field_names(descriptor: Any) -> dict[str, str]:
    """Proto field names and their lowerCamelCase JSON names → the proto name."""
    names = {}
    for field in descriptor.fields:
        names[field.name] = field.name
        names[field.json_name] = field.name
    return names


_JSON_NAMES = _field_names(Event.DESCRIPTOR)
_SUBJECT_NAMES = _field_names(subject_pb2.Subject.DESCRIPTOR)
_MEMBER_NAMES = _field_names(AttributeValue.DESCRIPTOR)
_KINDS: dict[Any, int] = {
    "person": subject_pb2.SUBJECT_KIND_PERSON,
    "organization": subject_pb2.SUBJECT_KIND_ORGANIZATION,
    **dict(subject_pb2.SubjectKind.items()),
    **{value: value for value in subject_pb2.SubjectKind.values()},
}
_INT64 = range(-(2**63), 2**63)
_WHOLE = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)")
_TIME_HINT = "must be an RFC 3339 time with its offset, e.g. 2026-06-01T12:00:00Z"


def _json_subject(value: Any, subject: subject_pb2.Subject, problems: list[Violation]) -> None:
    if not isinstance(value, dict):
        problems.append(Violation("subject", "must be an object (kind, id_scheme, id_value)", "WRONG_TYPE"))
        return
    for key, item in value.items():
        name = _SUBJECT_NAMES.get(key)
        if name is None:
            problems.append(Violation(f"subject.{key}", "is not a field of Subject", "UNKNOWN"))
        elif name == "kind":
            _kind(item, subject, problems)
        elif not isinstance(item, str):
            problems.append(Violation(f"subject.{name}", "must be a string", "WRONG_TYPE"))
        else:
            setattr(subject, name, item)


def _kind(value: Any, subject: subject_pb2.Subject, problems: list[Violation]) -> None:
    kind = _KINDS.get(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
    if kind is None:
        problems.append(Violation("subject.kind", "must be person or organization", "INVALID"))
    else:
        subject.kind = kind  # type: ignore[assignment]


def _timestamp(path: str, value: Any, target: Timestamp, problems: list[Violation]) -> None:
    if not isinstance(value, str):
        problems.append(Violation(path, _TIME_HINT, "WRONG_TYPE"))
        return
    text = value.strip()
    match = _RFC3339.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        # fromisoformat is many times faster than the protobuf's strptime, which counts in a
        # backfill of millions; the pattern keeps it to RFC 3339.
        moment = datetime.fromisoformat(text.upper().replace(" ", "T", 1))
    except ValueError:
        problems.append(Violation(path, _TIME_HINT, "INVALID_TIME"))
        return
    fraction = match.group(1) or ""
    target.seconds = int(moment.replace(microsecond=0).timestamp())
    target.nanos = int(fraction[1:10].ljust(9, "0")) if fraction else 0


def _json_attribute(
    path: str, value: Any, declared: str | None, problems: list[Violation]
) -> AttributeValue | None:
    if isinstance(value, dict):
        return _member(path, value, problems)
    if isinstance(value, str):
        return _from_text(path, value, declared, problems)
    if isinstance(value, bool):
        return AttributeValue(bool_value=value)
    if isinstance(value, int):
        if declared == "double":
            return _double(path, value, problems)
        return _int(path, value, problems)
    if isinstance(value, float):
        return _double(path, value, problems)
    if value is None:
        problems.append(Violation(path, "has no value (leave the attribute out instead)", "REQUIRED"))
        return None
    problems.append(Violation(path, "must be a string, number, true/false or a typed value", "WRONG_TYPE"))
    return None


def _member(path: str, value: dict[Any, Any], problems: list[Violation]) -> AttributeValue | None:
    """The AttributeValue as proto JSON: one member, e.g. {"int_value": "3"}."""
    if len(value) != 1 or next(iter(value)) not in _MEMBER_NAMES:
        members = ", ".join(field.name for field in AttributeValue.DESCRIPTOR.fields)
        problems.append(Violation(path, f"must hold exactly one of {members}", "WRONG_TYPE"))
        return None
    ((key, item),) = value.items()
    member = _MEMBER_NAMES[key]
    if member == "string_value" and isinstance(item, str):
        return AttributeValue(string_value=item)
    if member == "bool_value" and isinstance(item, bool):
        return AttributeValue(bool_value=item)
    if member == "int_value" and not isinstance(item, bool | float):
        if isinstance(item, int):
            return _int(path, item, problems)
        if isinstance(item, str) and _WHOLE.fullmatch(item.strip()):
            return _int(path, int(item), problems)
    if member == "double_value" and not isinstance(item, bool):
        if isinstance(item, int | float):
            return _double(path, item, problems)
        if isinstance(item, str) and _DECIMAL.fullmatch(item.strip()):
            return _double(path, float(item), problems)
    if member == "timestamp_value":
        attribute = AttributeValue()
        _timestamp(path, item, attribute.timestamp_value, problems)
        return attribute
    problems.append(Violation(path, f"{member} does not take {json.dumps(item)}", "WRONG_TYPE"))
    return None


def _int(path: str, value: int, problems: list[Violation]) -> AttributeValue | None:
    if value not in _INT64:
        problems.append(Violation(path, "is beyond a 64-bit whole number", "OUT_OF_RANGE"))
        return None
    return AttributeValue(int_value=value)


def _double(path: str, value: float, problems: list[Violation]) -> AttributeValue | None:
    number = float(value)
    if not math.isfinite(number):
        problems.append(Violation(path, "must be a finite number", "OUT_OF_RANGE"))
        return None
    return AttributeValue(double_value=number)


def _from_text(
    path: str, text: str, declared: str | None, problems: list[Violation]
) -> AttributeValue | None:
    """A value written as text (a CSV cell, a JSON string): typed as the catalogue declares,
    else by what it looks like."""
    plain = text.strip()
    if declared == "string":
        return AttributeValue(string_value=text)
    if declared == "timestamp":
        attribute = AttributeValue()
        _timestamp(path, plain, attribute.timestamp_value, problems)
        return attribute
    if declared == "int":
        if _WHOLE.fullmatch(plain):
            return _int(path, int(plain), problems)
        problems.append(Violation(path, f"must be a whole number, got {text!r}", "WRONG_TYPE"))
        return None
    if declared == "double":
        if _DECIMAL.fullmatch(plain):
            return _double(path, float(plain), problems)
        problems.append(Violation(path, f"must be a number, got {text!r}", "WRONG_TYPE"))
        return None
    if declared == "bool":
        if plain.lower() in _TRUE | _FALSE:
            return AttributeValue(bool_value=plain.lower() in _TRUE)
        problems.append(Violation(path, f"must be true or false, got {text!r}", "WRONG_TYPE"))
        return None
    # Not declared (no catalogue given, or an attribute the catalogue does not know).
    if plain.lower() in ("true", "false"):
        return AttributeValue(bool_value=plain.lower() == "true")
    if _WHOLE.fullmatch(plain):
        return _int(path, int(plain), problems)
    if _DECIMAL.fullmatch(plain):
        return _double(path, float(plain), problems)
    return AttributeValue(string_value=text)


def _read_jsonl(path: Path, types: AttributeTypes, wanted: Callable[[int], bool] | None) -> Iterator[Record]:
    index = -1
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise FileError(f"cannot read {path}: {exc.strerror}") from None
    with stream:
        for line, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            index += 1
            if wanted is not None and not wanted(index):
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                yield Record(line, index, None, (Violation("", "is not UTF-8 text", "ENCODING"),), text)
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                problem = Violation("", f"is not JSON: {exc.msg} at column {exc.colno}", "NOT_JSON")
                yield Record(line, index, None, (problem,), text.rstrip("\r\n"))
                continue
            event, problems = event_from_json(value, types)
            yield Record(line, index, event, tuple(problems), value)


_CSV_REQUIRED = ("event_id", "event_type", "subject_kind", "id_scheme", "id_value", "occurred_at")
_CSV_OPTIONAL = ("evidence_uri",)
_ATTRIBUTE_COLUMN = "attr."


def _csv_header(path: Path, header: list[str]) -> list[str]:
    columns = [name.strip() for name in header]
    known = set(_CSV_REQUIRED) | set(_CSV_OPTIONAL)
    unknown = [c for c in columns if c not in known and not (c.startswith(_ATTRIBUTE_COLUMN) and len(c) > 5)]
    if unknown:
        raise FileError(
            f"{path}: line 1: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
            f"{', '.join(_CSV_REQUIRED + _CSV_OPTIONAL)} and attr.<name> for each attribute"
        )
    missing = [c for c in _CSV_REQUIRED if c not in columns]
    if missing:
        raise FileError(f"{path}: line 1: the header lacks the column(s) {', '.join(missing)}")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise FileError(f"{path}: line 1: column(s) {', '.join(repeated)} appear more than once")
    return columns


def _read_csv(path: Path, types: AttributeTypes, wanted: Callable[[int], bool] | None) -> Iterator[Record]:
    try:
        stream = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise FileError(f"cannot read {path}: {exc.strerror}") from None
    with stream:
        reader = csv.reader(stream)
        try:
            header = next(reader, None)
            if header is None:
                raise FileError(f"{path}: empty; a CSV file starts with its header")
            columns = _csv_header(path, header)
            index = -1
            ended = reader.line_num
            for row in reader:
                line, ended = ended + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                index += 1
                if wanted is not None and not wanted(index):
                    continue
                yield _csv_record(line, index, columns, row, types)
        except UnicodeDecodeError:
            raise FileError(f"{path}: not UTF-8 text (near line {reader.line_num + 1})") from None
        except csv.Error as exc:
            raise FileError(f"{path}: line {reader.line_num}: {exc}") from None


def _csv_record(line: int, index: int, columns: list[str], row: list[str], types: AttributeTypes) -> Record:
    raw = dict(zip(columns, row, strict=False))
    if len(row) != len(columns):
        problem = Violation("", f"has {len(row)} cells; the header has {len(columns)}", "WRONG_SHAPE")
        return Record(line, index, None, (problem,), raw)
    problems: list[Violation] = []
    event = Event(
        event_id=raw["event_id"].strip(),
        event_type=raw["event_type"].strip(),
        evidence_uri=raw.get("evidence_uri", "").strip(),
    )
    if not event.event_id:
        problems.append(_NO_EVENT_ID)
    event.subject.id_scheme = raw["id_scheme"].strip()
    event.subject.id_value = raw["id_value"].strip()
    if kind := raw["subject_kind"].strip():
        _kind(kind, event.subject, problems)
    if occurred_at := raw["occurred_at"].strip():
        _timestamp("occurred_at", occurred_at, event.occurred_at, problems)
    declared = types.get(event.event_type, {})
    for column, cell in raw.items():
        if column.startswith(_ATTRIBUTE_COLUMN) and cell.strip():
            name = column[len(_ATTRIBUTE_COLUMN) :]
            attribute = _from_text(f"attributes.{name}", cell, declared.get(name), problems)
            if attribute is not None:
                event.attributes[name].CopyFrom(attribute)
    return Record(line, index, event, tuple(problems), raw)
