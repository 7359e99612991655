"""The event type catalogue: loading, and validation of events against it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domain.catalogue import CatalogueError, IncomingEvent, load_catalogue, parse_catalogue
from kit.pseudonym import CanonicalId

NOW = datetime(2026, 11, 1, tzinfo=UTC)
CATALOGUE = load_catalogue(Path("config/catalogue.yaml"))


def incoming(**changes: object) -> IncomingEvent:
    fields: dict[str, object] = {
        "event_id": "lib-1",
        "event_type": "library.book_returned_late",
        "subject_kind": "person",
        "id_scheme": "resident-id",
        "id_value": "350200199001011230",
        "occurred_at": NOW - timedelta(days=1),
        "attributes": {"days_late": 31},
        "evidence_uri": "",
    }
    fields.update(changes)
    return IncomingEvent(**fields)  # type: ignore[arg-type]


def violations(event: IncomingEvent, source: str = "library") -> list[tuple[str, str]]:
    found = CATALOGUE.validate(
        source, event, now=NOW, max_skew=timedelta(minutes=5), max_age=timedelta(days=3650)
    )
    return [(v.field, v.reason) for v in found]


def test_sample_catalogue_holds_every_domain_event_type() -> None:
    assert len(CATALOGUE.event_types) == 19
    assert CATALOGUE.event_types["legal.judgment_defaulter"].subject_kinds == {"person", "organization"}


def test_a_valid_event_has_no_violations() -> None:
    assert violations(incoming()) == []


def test_every_problem_of_an_event_is_reported_at_once() -> None:
    event = incoming(
        event_id="",
        subject_kind=None,
        id_scheme="Resident ID",
        id_value="",
        occurred_at=None,
        attributes={"days_late": "many", "colour": "red"},
    )
    assert violations(event) == [
        ("event_id", "INVALID_ID"),
        ("subject.kind", "REQUIRED"),
        ("subject.id_scheme", "INVALID"),
        ("subject.id_value", "INVALID"),
        ("occurred_at", "REQUIRED"),
        ("attributes.colour", "UNKNOWN"),
        ("attributes.days_late", "WRONG_TYPE"),
    ]


def test_unknown_event_type_is_named() -> None:
    assert violations(incoming(event_type="library.book_eaten")) == [("event_type", "UNKNOWN_EVENT_TYPE")]


def test_a_department_may_submit_only_its_own_event_types() -> None:
    assert violations(incoming(), source="courts") == [("event_type", "NOT_PERMITTED")]


def test_subject_kind_must_be_allowed_by_the_event_type() -> None:
    event = incoming(subject_kind="organization", id_scheme="uscc", id_value="91350200MA2XY0123A")
    assert violations(event) == [("subject.kind", "NOT_ALLOWED")]


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, [("attributes.days_late", "REQUIRED")]),
        ({"days_late": 0}, [("attributes.days_late", "OUT_OF_RANGE")]),
        ({"days_late": 36501}, [("attributes.days_late", "OUT_OF_RANGE")]),
        ({"days_late": 1}, []),
        ({"days_late": True}, [("attributes.days_late", "WRONG_TYPE")]),
        ({"days_late": 3.0}, [("attributes.days_late", "WRONG_TYPE")]),
        ({"days_late": None}, [("attributes.days_late", "REQUIRED")]),
    ],
)
def test_attribute_types_and_ranges(attributes: dict[str, object], expected: list[tuple[str, str]]) -> None:
    assert violations(incoming(attributes=attributes)) == expected


def test_enum_and_double_attributes() -> None:
    food = incoming(
        event_type="commerce.food_safety_violation",
        subject_kind="organization",
        id_scheme="uscc",
        id_value="91350200MA2XY0123A",
        attributes={"level": "catastrophic"},
    )
    assert violations(food, source="market-regulator") == [("attributes.level", "NOT_IN_ENUM")]
    fare = incoming(event_type="transport.metro.fare_evasion", attributes={"station": "Lianban", "amount": 4})
    assert violations(fare, source="metro") == []  # a whole number is a valid double
    fare = incoming(
        event_type="transport.metro.fare_evasion", attributes={"station": "Lianban", "amount": float("nan")}
    )
    assert violations(fare, source="metro") == [("attributes.amount", "OUT_OF_RANGE")]


def test_event_time_must_not_be_in_the_future_or_too_old() -> None:
    assert violations(incoming(occurred_at=NOW + timedelta(minutes=4))) == []
    assert violations(incoming(occurred_at=NOW + timedelta(minutes=6))) == [("occurred_at", "IN_FUTURE")]
    assert violations(incoming(occurred_at=NOW - timedelta(days=3651))) == [("occurred_at", "TOO_OLD")]


def test_a_broken_catalogue_lists_every_problem_with_its_path() -> None:
    with pytest.raises(CatalogueError) as raised:
        parse_catalogue(
            {
                "version": 0,
                "departments": [{"id": "library"}],
                "event_types": [
                    {"name": "Bad Name"},
                    {
                        "name": "library.x",
                        "subject_kinds": ["alien"],
                        "departments": ["zoo"],
                        "attributes": {"n": {"type": "int", "enum": ["a"]}, "m": {"type": "float"}},
                    },
                ],
            }
        )
    assert raised.value.problems == [
        "event_types[0].name: must be a dotted lower-case name",
        "event_types[1] (library.x).subject_kinds: unknown subject kind 'alien'",
        "event_types[1] (library.x).departments: unknown department 'zoo'",
        "event_types[1] (library.x).attributes.n.enum: only string attributes take an enum of strings",
        "event_types[1] (library.x).attributes.m.type: must be one of string, int, double, bool, timestamp",
        "version: must be a whole number >= 1",
    ]


def test_a_valid_event_is_checked_with_its_subjects_canonical_id() -> None:
    checked = CATALOGUE.check(
        "library",
        incoming(id_scheme=" Resident-ID ", id_value="350200 19900101 1230"),
        now=NOW,
        max_skew=timedelta(minutes=5),
        max_age=timedelta(days=30),
    )
    assert checked.violations == []
    assert checked.subject == CanonicalId("person", "resident-id", "350200199001011230")


@pytest.mark.parametrize(
    "changes",
    [
        {"attributes": {"days_late": "x"}},
        {"event_type": "library.nope"},
        {"occurred_at": None},
        {"id_value": "350200199001011231"},
        {"subject_kind": "organization"},
    ],
)
def test_an_invalid_event_is_checked_without_a_subject(changes: dict[str, object]) -> None:
    limits = {"now": NOW, "max_skew": timedelta(minutes=5), "max_age": timedelta(days=30)}
    event = incoming(**changes)
    checked = CATALOGUE.check("library", event, **limits)  # type: ignore[arg-type]
    assert checked.violations
    assert checked.violations == CATALOGUE.validate("library", event, **limits)  # type: ignore[arg-type]
    # Nothing to hash: an event with any violation is rejected, never pseudonymised.
    assert checked.subject is None
