"""Decoding requests without ever raising: the one place a request's bytes become a message.

grpc-aio decodes a request before any of our code runs and answers UNKNOWN (logging a
traceback) when the deserializer raises, before the caller is even authenticated. So the
server interceptor (kit/interceptors.py) gives every handler a `tolerant` deserializer that
returns an `Undecodable` marker instead, authenticates the call first and only then answers
INVALID_ARGUMENT for the marker (docs/security.md, "Input limits").

Decoding includes the range checks protobuf itself does not make, done here once for every
message of every service by walking its descriptor: Timestamps and Durations within the
ranges their definitions allow (what `datetime` and `timedelta` can hold), and finite
floating-point numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kit.errors import InvalidArgument, Violation

# google/protobuf/timestamp.proto: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
# google/protobuf/duration.proto: about ±10,000 years.
DURATION_MAX_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999

_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
# A decode failure is located by re-reading the wire format; never deeper than this.
_MAX_LOCATE_DEPTH = 32


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that could not be decoded or is out of range."""

    error: InvalidArgument


Deserializer = Callable[[bytes], Any]


def tolerant(deserializer: Deserializer | None, method: str) -> Deserializer | None:
    """`deserializer` of `method`'s requests ("/package.Service/Method"), returning
    `Undecodable` instead of raising, and checking ranges."""
    if deserializer is None:
        return None
    request_type = _request_type(method)

    def decode(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception:
            return Undecodable(undecodable_error(request_type, data))
        if isinstance(message, Message):
            violations = range_violations(message)
            if violations:
                return Undecodable(InvalidArgument("the request has values out of range", violations))
        return message

    return decode


def _request_type(method: str) -> Descriptor | None:
    """The request message of a method, from the descriptors every generated module
    registers (the deserializer itself may be wrapped by another interceptor)."""
    service, _, name = method.lstrip("/").partition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return None
    return found.input_type if found is not None else None


def undecodable_error(descriptor: Descriptor | None, data: bytes) -> InvalidArgument:
    """INVALID_ARGUMENT for bytes that are not a message of type `descriptor`, naming the
    field whose bytes fail to decode when one can be found."""
    if descriptor is None:
        return InvalidArgument("the request could not be decoded")
    path = _locate(descriptor, data, "", 0)
    message = f"the request is not a valid {descriptor.full_name}"
    if not path:
        return InvalidArgument(message)
    return InvalidArgument(message, [Violation(path, "cannot be decoded", "UNDECODABLE")])


def range_violations(message: Message) -> list[Violation]:
    """Every Timestamp, Duration and floating-point value of `message` (at any depth) that
    lies outside its range, by field path (`events[2].occurred_at`)."""
    found: list[Violation] = []
    _walk(message, "", found)
    return found


# How `_walk` treats a field, decided once per field of the schema (this runs for every
# request of every service): skipped when it cannot hold a checked value, which is most
# fields of most requests.
_SKIP, _FLOAT, _FLOATS_REPEATED, _MAP_OF_MESSAGES, _MAP_OF_FLOATS, _REPEATED, _MESSAGE = range(7)
_PLANS: dict[FieldDescriptor, int] = {}


def _plan(field: FieldDescriptor) -> int:
    plan = _PLANS.get(field)
    if plan is not None:
        return plan
    if not _may_hold_checked_values(field):
        plan = _SKIP
    elif field.type in _FLOATS:
        plan = _FLOATS_REPEATED if _is_repeated(field) else _FLOAT
    elif _is_map(field):
        # Map entries are named as the catalogue names attributes: `attributes.due_on`.
        value_field = cast(Descriptor, field.message_type).fields_by_name["value"]
        if value_field.message_type is not None:
            plan = _MAP_OF_MESSAGES
        elif value_field.type in _FLOATS:
            plan = _MAP_OF_FLOATS
        else:
            plan = _SKIP
    elif _is_repeated(field):
        plan = _REPEATED
    else:
        plan = _MESSAGE
    _PLANS[field] = plan
    return plan


def _walk(message: Message, prefix: str, found: list[Violation]) -> None:
    name = message.DESCRIPTOR.full_name
    if name == _TIMESTAMP:
        _timestamp(message, prefix, found)
        return
    if name == _DURATION:
        _duration(message, prefix, found)
        return
    for field, value in message.ListFields():
        plan = _PLANS.get(field)
        if plan is None:
            plan = _plan(field)
        if plan == _SKIP:
            continue
        path = f"{prefix}.{field.name}" if prefix else field.name
        if plan == _MESSAGE:
            _walk(value, path, found)
        elif plan == _REPEATED:
            for index, item in enumerate(value):
                _walk(item, f"{path}[{index}]", found)
        elif plan == _MAP_OF_MESSAGES:
            for key, item in value.items():
                _walk(item, f"{path}.{key}", found)
        elif plan == _MAP_OF_FLOATS:
            for key, item in value.items():
                if not math.isfinite(item):
                    found.append(Violation(f"{path}.{key}", "must be a finite number", "OUT_OF_RANGE"))
        elif plan == _FLOAT:
            if not math.isfinite(value):
                found.append(Violation(path, "must be a finite number", "OUT_OF_RANGE"))
        else:  # _FLOATS_REPEATED
            for index, number in enumerate(value):
                if not math.isfinite(number):
                    found.append(Violation(f"{path}[{index}]", "must be a finite number", "OUT_OF_RANGE"))


def _timestamp(message: Any, path: str, found: list[Violation]) -> None:
    if not TIMESTAMP_MIN_SECONDS <= message.seconds <= TIMESTAMP_MAX_SECONDS:
        found.append(Violation(path, "must lie between 0001-01-01 and 9999-12-31 (UTC)", "OUT_OF_RANGE"))
    if not 0 <= message.nanos <= MAX_NANOS:
        found.append(Violation(f"{path}.nanos", f"must lie in [0, {MAX_NANOS}]", "OUT_OF_RANGE"))


def _duration(message: Any, path: str, found: list[Violation]) -> None:
    seconds, nanos = message.seconds, message.nanos
    if not -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS:
        found.append(Violation(path, f"must lie within ±{DURATION_MAX_SECONDS} seconds", "OUT_OF_RANGE"))
    if not -MAX_NANOS <= nanos <= MAX_NANOS or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        found.append(
            Violation(
                f"{path}.nanos",
                f"must lie in [-{MAX_NANOS}, {MAX_NANOS}] with the sign of seconds",
                "OUT_OF_RANGE",
            )
        )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


_HOLDS: dict[str, bool] = {}


def _may_hold_checked_values(field: FieldDescriptor) -> bool:
    if field.type in _FLOATS:
        return True
    if field.message_type is None:
        return False
    return _holds(field.message_type, set())


def _holds(descriptor: Descriptor, visiting: set[str]) -> bool:
    """Whether a message of this type can contain a value `_walk` checks (memoised: the
    walk then skips every subtree that cannot, which is most of most requests)."""
    name = descriptor.full_name
    known = _HOLDS.get(name)
    if known is not None:
        return known
    if name in (_TIMESTAMP, _DURATION):
        return True
    if name in visiting:
        return False  # a recursive type holds a checked value only through its other fields
    visiting.add(name)
    result = any(
        f.type in _FLOATS or (f.message_type is not None and _holds(f.message_type, visiting))
        for f in descriptor.fields
    )
    visiting.discard(name)
    _HOLDS[name] = result
    return result


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _decodes(message_class: Any, data: bytes) -> bool:
    try:
        message_class().MergeFromString(data)
    except Exception:
        return False
    return True


def _locate(descriptor: Descriptor, data: bytes, prefix: str, depth: int) -> str:
    """The path of the first field whose bytes do not decode, or `prefix` when the bytes
    cannot be split into fields at all (a broken tag or length)."""
    message_class = message_factory.GetMessageClass(descriptor)
    counts: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        start = payload = pos
        try:
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, payload = _varint(data, pos)
                pos = payload + length
            else:
                raise ValueError("groups and unknown wire types are not accepted")
        except ValueError:
            return prefix
        field = descriptor.fields_by_number.get(number)
        if field is None:
            if pos > len(data):
                return prefix
            continue
        index = counts.get(number, 0)
        counts[number] = index + 1
        path = f"{prefix}.{field.name}" if prefix else field.name
        if _is_repeated(field) and not _is_map(field):
            path = f"{path}[{index}]"
        if pos > len(data):
            return path  # the field's length runs past the end of the message
        if _decodes(message_class, data[start:pos]):
            continue
        if wire_type == 2 and field.message_type is not None and depth < _MAX_LOCATE_DEPTH:
            return _locate(field.message_type, data[payload:pos], path, depth + 1)
        return path
    return prefix
