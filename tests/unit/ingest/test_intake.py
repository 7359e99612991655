"""Intake: one bad event never rejects its batch; duplicates and conflicts by fingerprint."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from domain.catalogue import IncomingEvent
from kit import pseudonym
from kit.pseudonym import Pseudonymiser
from services.ingest.domain import (
    EventStatus,
)
from tests.support.intake import NOW, MemoryStore, late, make_intake


def statuses(results: Sequence[object]) -> list[EventStatus]:
    return [r.status for r in results]  # type: ignore[attr-defined]


def test_a_bad_event_is_rejected_and_the_rest_of_its_batch_lands() -> None:
    store = MemoryStore()
    results = make_intake(store).submit("library", [late("a", 40), late("b", 0), late("c", 2)])
    assert statuses(results) == [EventStatus.ACCEPTED, EventStatus.REJECTED, EventStatus.ACCEPTED]
    assert results[1].violations[0].field == "attributes.days_late"
    assert set(store.events) == {("library", "a"), ("library", "c")}


def test_resending_the_same_event_is_a_duplicate_and_a_changed_payload_a_conflict() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    intake.submit("library", [late("a", 40)])
    results = intake.submit("library", [late("a", 40), late("a", 41)])
    assert statuses(results) == [EventStatus.DUPLICATE, EventStatus.CONFLICT]
    assert "different payload" in results[1].message
    assert len(store.events) == 1


def test_repeats_inside_one_batch_are_recognised_before_storing() -> None:
    store = MemoryStore()
    results = make_intake(store).submit("library", [late("a", 40), late("a", 40), late("a", 50)])
    assert statuses(results) == [EventStatus.ACCEPTED, EventStatus.DUPLICATE, EventStatus.CONFLICT]
    assert store.calls == 1


def test_validate_only_answers_as_a_submission_would_and_stores_nothing() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    intake.submit("library", [late("a", 40)])
    batch = [late("a", 40), late("a", 41), late("b", 0), late("c", 2)]
    checked = intake.submit("library", batch, validate_only=True)
    assert statuses(checked) == [
        EventStatus.DUPLICATE,
        EventStatus.CONFLICT,
        EventStatus.REJECTED,
        EventStatus.ACCEPTED,
    ]
    assert set(store.events) == {("library", "a")}
    assert store.calls == 1
    assert intake.submit("library", batch) == checked


def test_the_same_event_id_from_another_source_is_another_event() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    intake.submit("library", [late("a", 40)])
    fare = IncomingEvent(
        "a",
        "transport.metro.fare_evasion",
        "person",
        "resident-id",
        "350200199001011230",
        NOW,
        {"station": "X", "amount": 3.0},
        "",
    )
    assert statuses(intake.submit("metro", [fare])) == [EventStatus.ACCEPTED]


def test_stored_events_carry_only_the_pseudonym() -> None:
    store = MemoryStore()
    make_intake(store).submit("library", [late("a", 40, subject=" 350200199001011230 ")])
    (stored,) = store.events.values()
    assert stored.subject_key == Pseudonymiser(b"k" * 32, "k1").subject_key(
        "person", "resident-id", "350200199001011230"
    )
    assert "350200199001011230" not in repr(stored)


def test_a_whole_number_double_and_its_float_form_are_the_same_event() -> None:
    store = MemoryStore()
    intake = make_intake(store)

    def fare(amount: float) -> IncomingEvent:
        return IncomingEvent(
            "f",
            "transport.metro.fare_evasion",
            "person",
            "resident-id",
            "350200199001011230",
            NOW,
            {"station": "X", "amount": amount},
            "",
        )

    intake.submit("metro", [fare(3)])
    assert statuses(intake.submit("metro", [fare(3.0)])) == [EventStatus.DUPLICATE]


def test_request_checks_name_source_and_batch_size() -> None:
    intake = make_intake(MemoryStore())
    assert [v.reason for v in intake.check_request("zoo", 4)] == ["UNKNOWN_SOURCE", "BATCH_TOO_LARGE"]
    assert [v.reason for v in intake.check_request("library", 0)] == ["REQUIRED"]
    assert intake.check_request("library", 3) == []


def test_each_event_is_canonicalised_once_and_hashed_as_validation_saw_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    canonical_in = pseudonym._canonical_in

    def counting(scheme: pseudonym.IdScheme, id_value: str) -> str:
        seen.append(id_value)
        return canonical_in(scheme, id_value)

    monkeypatch.setattr(pseudonym, "_canonical_in", counting)
    store = MemoryStore()
    written = ["350200 19900101 1230", "350200900101123", "350200199001011231"]
    results = make_intake(store).submit(
        "library", [late(f"e{i}", 40, subject=w) for i, w in enumerate(written)]
    )
    assert statuses(results) == [EventStatus.ACCEPTED, EventStatus.ACCEPTED, EventStatus.REJECTED]
    assert seen == written
    expected = Pseudonymiser(b"k" * 32, "k1").subject_key("person", "resident-id", "350200199001011230")
    assert [e.subject_key for e in store.events.values()] == [expected, expected]
