"""The event type catalogue and validation of incoming events against it (pure domain).

The catalogue says which departments exist, which event types each may submit, which
subject kinds an event type applies to, and the typed schema of its attributes.
Validation returns every violation of an event at once, with field paths relative to
the event, so a department can fix a whole record in one go.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from domain.documents import Problems, child, item
from kit.errors import Violation
from kit.pseudonym import CanonicalId, check_subject
from kit.safeyaml import YamlError, load_yaml
from kit.vocabulary import SUBJECT_KINDS

Scalar = str | int | float | bool | datetime

ATTRIBUTE_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "double": (float, int),
    "bool": (bool,),
    "timestamp": (datetime,),
}
_EVENT_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_PRINTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_ATTRIBUTE_FIELDS = frozenset({"type", "required", "enum", "min", "max", "max_length", "cohort"})


class CatalogueError(Exception):
    """The catalogue file is invalid; `problems` lists every problem with its path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid catalogue:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    type: str
    required: bool = True
    enum: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    max_length: int = 256
    # A cohort attribute splits backtest reports (e.g. by district); validation ignores it.
    cohort: bool = False

    def check(self, value: Scalar) -> Violation | None:
        path = f"attributes.{self.name}"
        accepted = ATTRIBUTE_TYPES[self.type]
        if isinstance(value, bool) and bool not in accepted:
            return Violation(path, f"must be of type {self.type}, got bool", "WRONG_TYPE")
        if not isinstance(value, accepted):
            return Violation(path, f"must be of type {self.type}, got {_type_name(value)}", "WRONG_TYPE")
        if isinstance(value, float) and not math.isfinite(value):
            return Violation(path, "must be a finite number", "OUT_OF_RANGE")
        if isinstance(value, str):
            if self.enum and value not in self.enum:
                return Violation(path, f"must be one of {', '.join(self.enum)}", "NOT_IN_ENUM")
            if len(value) > self.max_length:
                return Violation(path, f"must be at most {self.max_length} characters", "TOO_LONG")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                return Violation(path, f"must be at least {_num(self.minimum)}", "OUT_OF_RANGE")
            if self.maximum is not None and value > self.maximum:
                return Violation(path, f"must be at most {_num(self.maximum)}", "OUT_OF_RANGE")
        return None


@dataclass(frozen=True)
class EventType:
    name: str
    description: str
    subject_kinds: frozenset[str]
    departments: frozenset[str]
    attributes: Mapping[str, AttributeSpec]


@dataclass(frozen=True)
class IncomingEvent:
    """An event as submitted, before validation: the subject is still raw."""

    event_id: str
    event_type: str
    subject_kind: str | None
    id_scheme: str
    id_value: str
    occurred_at: datetime | None
    attributes: Mapping[str, Scalar | None]
    evidence_uri: str


@dataclass(frozen=True)
class Checked:
    """An event's violations and, when it has none, its subject's canonical id, which the
    caller hashes without canonicalising the raw id a second time."""

    violations: list[Violation]
    subject: CanonicalId | None


@dataclass(frozen=True)
class Catalogue:
    version: int
    departments: Mapping[str, str]
    event_types: Mapping[str, EventType] = field(default_factory=dict)

    def knows_source(self, source: str) -> bool:
        return source in self.departments

    def validate(
        self, source: str, event: IncomingEvent, *, now: datetime, max_skew: timedelta, max_age: timedelta
    ) -> list[Violation]:
        """Every violation of `event` submitted by `source`; empty when it is valid."""
        return self.check(source, event, now=now, max_skew=max_skew, max_age=max_age).violations

    def check(
        self, source: str, event: IncomingEvent, *, now: datetime, max_skew: timedelta, max_age: timedelta
    ) -> Checked:
        """`validate`, with the subject's canonical id when the event is valid."""
        problems: list[Violation] = []
        if not _PRINTABLE_ID.match(event.event_id):
            problems.append(
                Violation("event_id", "must be 1 to 128 printable ASCII characters", "INVALID_ID")
            )
        subject_problems, subject = check_subject(event.subject_kind, event.id_scheme, event.id_value)
        problems.extend(subject_problems)
        if event.occurred_at is None:
            problems.append(Violation("occurred_at", "is required", "REQUIRED"))
        elif event.occurred_at > now + max_skew:
            problems.append(Violation("occurred_at", "lies in the future", "IN_FUTURE"))
        elif event.occurred_at < now - max_age:
            problems.append(Violation("occurred_at", f"is older than {max_age.days} days", "TOO_OLD"))
        if len(event.evidence_uri) > 512:
            problems.append(Violation("evidence_uri", "must be at most 512 characters", "TOO_LONG"))

        event_type = self.event_types.get(event.event_type)
        if event_type is None:
            problems.append(
                Violation("event_type", f"unknown event type {event.event_type!r}", "UNKNOWN_EVENT_TYPE")
            )
            return Checked(problems, None)
        if source not in event_type.departments:
            problems.append(
                Violation(
                    "event_type", f"source {source!r} may not submit {event.event_type}", "NOT_PERMITTED"
                )
            )
        if event.subject_kind is not None and event.subject_kind not in event_type.subject_kinds:
            allowed = ", ".join(sorted(event_type.subject_kinds))
            problems.append(
                Violation("subject.kind", f"{event.event_type} applies to {allowed} only", "NOT_ALLOWED")
            )
        problems.extend(_check_attributes(event_type, event.attributes))
        return Checked(problems, None if problems else subject)


def _check_attributes(event_type: EventType, attributes: Mapping[str, Scalar | None]) -> list[Violation]:
    problems = []
    for name, value in sorted(attributes.items()):
        spec = event_type.attributes.get(name)
        if spec is None:
            problems.append(
                Violation(f"attributes.{name}", "is not an attribute of this event type", "UNKNOWN")
            )
        elif value is None:
            problems.append(Violation(f"attributes.{name}", "has no value set", "REQUIRED"))
        elif (violation := spec.check(value)) is not None:
            problems.append(violation)
    for name, spec in sorted(event_type.attributes.items()):
        if spec.required and name not in attributes:
            problems.append(Violation(f"attributes.{name}", "is required", "REQUIRED"))
    return problems


def _type_name(value: object) -> str:
    for name, kinds in ATTRIBUTE_TYPES.items():
        if type(value) in kinds:
            return name
    return type(value).__name__


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def load_catalogue(path: Path) -> Catalogue:
    """Load and check a catalogue file; raises CatalogueError listing every problem."""
    try:
        document, _ = load_yaml(path.read_bytes())
    except (OSError, YamlError) as exc:
        raise CatalogueError([f"{path}: {exc}"]) from exc
    return parse_catalogue(document)


def parse_catalogue(document: Any) -> Catalogue:
    problems = Problems()
    if not isinstance(document, dict):
        raise CatalogueError(["the catalogue must be a mapping"])
    departments: dict[str, str] = {}
    for i, dept in enumerate(_list(document, "departments", problems)):
        if not isinstance(dept, dict) or not isinstance(dept.get("id"), str):
            problems.add(item("departments", i), "needs an id")
            continue
        departments[dept["id"]] = str(dept.get("name", dept["id"]))
    event_types: dict[str, EventType] = {}
    for i, raw in enumerate(_list(document, "event_types", problems)):
        parsed = _parse_event_type(item("event_types", i), raw, departments, problems)
        if parsed is not None:
            if parsed.name in event_types:
                problems.add(child(item("event_types", i), "name"), f"duplicate event type {parsed.name!r}")
            event_types[parsed.name] = parsed
    version = document.get("version", 1)
    if not isinstance(version, int) or version < 1:
        problems.add("version", "must be a whole number >= 1")
    if problems:
        raise CatalogueError(problems.messages)
    return Catalogue(version=version, departments=departments, event_types=event_types)


def _list(document: dict[str, Any], key: str, problems: Problems) -> Sequence[Any]:
    value = document.get(key)
    if not isinstance(value, list) or not value:
        problems.add(key, "must be a non-empty list")
        return []
    return value


def _parse_event_type(
    path: str, raw: Any, departments: Mapping[str, str], problems: Problems
) -> EventType | None:
    if not isinstance(raw, dict):
        problems.add(path, "must be a mapping")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not _EVENT_TYPE_NAME.match(name):
        problems.add(child(path, "name"), "must be a dotted lower-case name")
        return None
    path = f"{path} ({name})"
    kinds = raw.get("subject_kinds") or []
    for kind in kinds:
        if kind not in SUBJECT_KINDS:
            problems.add(child(path, "subject_kinds"), f"unknown subject kind {kind!r}")
    if not kinds:
        problems.add(child(path, "subject_kinds"), "must name at least one subject kind")
    owners = raw.get("departments") or []
    for owner in owners:
        if owner not in departments:
            problems.add(child(path, "departments"), f"unknown department {owner!r}")
    if not owners:
        problems.add(child(path, "departments"), "must name at least one department")
    attributes: dict[str, AttributeSpec] = {}
    for attr_name, spec in (raw.get("attributes") or {}).items():
        attributes[attr_name] = _parse_attribute(
            child(path, f"attributes.{attr_name}"), attr_name, spec, problems
        )
    return EventType(
        name=name,
        description=str(raw.get("description", "")),
        subject_kinds=frozenset(kinds),
        departments=frozenset(owners),
        attributes=attributes,
    )


def _parse_attribute(path: str, name: str, spec: Any, problems: Problems) -> AttributeSpec:
    if not isinstance(spec, dict) or spec.get("type") not in ATTRIBUTE_TYPES:
        problems.add(child(path, "type"), f"must be one of {', '.join(ATTRIBUTE_TYPES)}")
        return AttributeSpec(name=name, type="string")
    problems.unknown_keys(spec, _ATTRIBUTE_FIELDS, path)
    enum = spec.get("enum") or []
    if enum and (spec["type"] != "string" or not all(isinstance(e, str) for e in enum)):
        problems.add(child(path, "enum"), "only string attributes take an enum of strings")
    for bound in ("min", "max"):
        if bound in spec and (
            spec["type"] not in ("int", "double") or not isinstance(spec[bound], int | float)
        ):
            problems.add(child(path, bound), f"only numeric attributes take a numeric {bound}")
    cohort = problems.flag(spec.get("cohort", False), child(path, "cohort"))
    if cohort and spec["type"] not in ("string", "int", "bool"):
        # A cohort is a group of subjects; continuous values would make one per subject.
        problems.add(child(path, "cohort"), "only string, int and bool attributes can be cohorts")
    return AttributeSpec(
        name=name,
        type=spec["type"],
        required=bool(spec.get("required", True)),
        enum=tuple(enum),
        minimum=spec.get("min"),
        maximum=spec.get("max"),
        max_length=int(spec.get("max_length", 256)),
        cohort=cohort is True,
    )
