"""Fingerprints over the canonical bytes, and events stored before them: a resend of an
event stored with the JSON fingerprint is still a duplicate after the upgrade."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from domain.catalogue import IncomingEvent
from kit.pseudonym import KeyLink, Pseudonymiser
from services.ingest import wire
from services.ingest.domain import (
    FINGERPRINT_JSON,
    EventStatus,
    StoredFingerprint,
    fingerprint,
    json_fingerprint,
)
from tests.support.intake import NOW, MemoryStore, late, make_intake

ROOT = Pseudonymiser(b"k" * 32, "k1")
ROTATED = Pseudonymiser(b"k" * 32, "k1", (KeyLink("k2", b"s" * 32),))


def test_the_json_fingerprint_is_the_one_events_were_stored_with() -> None:
    # Pinned from the code before canonical fingerprints: stored rows carry this value.
    event = IncomingEvent(
        "e1",
        "transport.metro.fare_evasion",
        "person",
        "resident-id",
        "x",
        datetime(2026, 10, 1, 8, 30, 15, 250000, tzinfo=UTC),
        {"station": "西湖", "amount": 3.0},
        "https://metro.example/r/1",
    )
    assert (
        json_fingerprint(event, "ab" * 32)
        == "283fda20d81b27034e44549a635c03450efe12c5fcb9abc807b06d3869541892"
    )


def test_the_canonical_fingerprint_is_stable() -> None:
    # Stored fingerprints must compare equal for as long as they are stored: a protobuf
    # release that serialized these fields otherwise would need a FINGERPRINT version 3.
    body = wire.body(
        source="metro",
        event_id="e1",
        event_type="transport.metro.fare_evasion",
        subject_kind="person",
        occurred_at=datetime(2026, 10, 1, 8, 30, 15, 250000, tzinfo=UTC),
        attributes={"station": "西湖", "amount": 3.0},
        evidence_uri="https://metro.example/r/1",
    )
    pinned = "2e82d8b9b8fc219c076f26bc89c81d838a0dd57ae622cea389638ec8a2180375"
    assert fingerprint(body, "ab" * 32) == pinned


def stored_before_the_upgrade(event: IncomingEvent, chain: Pseudonymiser) -> StoredFingerprint:
    """The fingerprint the code before canonical fingerprints stored for `event`: over
    JSON, with the root generation's key, moved along the chain to the current one."""
    assert event.subject_kind is not None
    root_key = chain.generation_keys(event.subject_kind, event.id_scheme, event.id_value)[0][1]
    return StoredFingerprint(chain.rekey(json_fingerprint(event, root_key), chain.key_id), FINGERPRINT_JSON)


@pytest.mark.parametrize("chain", [ROOT, ROTATED], ids=["root", "rotated"])
def test_an_event_stored_with_the_json_fingerprint_is_a_duplicate_when_resent_and_a_changed_one_a_conflict(
    chain: Pseudonymiser,
) -> None:
    store = MemoryStore()
    intake = make_intake(store, chain)
    assert [r.status for r in intake.submit("library", [late("a", 40), late("b", 7)])] == [
        EventStatus.ACCEPTED
    ] * 2
    # As the upgrade leaves them: both stored with the JSON fingerprint.
    for event in (late("a", 40), late("b", 7)):
        store.stored_fingerprints[("library", event.event_id)] = stored_before_the_upgrade(event, chain)
    resent = [late("a", 40), late("b", 8), late("c", 1)]
    expected = [EventStatus.DUPLICATE, EventStatus.CONFLICT, EventStatus.ACCEPTED]
    assert [r.status for r in intake.submit("library", resent, validate_only=True)] == expected
    assert [r.status for r in intake.submit("library", resent)] == expected
    # They were compared with the JSON fingerprint, not the canonical one they would get now.
    assert store.events[("library", "a")].fingerprint != store.stored(("library", "a")).value


def test_a_correction_resent_after_the_upgrade_is_idempotent() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    intake.submit("library", [late("a", 40)])
    first = intake.correct("library", "a", "typo", late("b", 4), "library")
    assert first.replacement.status is EventStatus.ACCEPTED
    store.stored_fingerprints[("library", "b")] = stored_before_the_upgrade(late("b", 4), ROOT)
    again = intake.correct("library", "a", "typo", late("b", 4), "library")
    assert again.replacement.status is EventStatus.DUPLICATE


def test_the_canonical_fingerprint_ignores_attribute_order_and_sees_every_change() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    fare = IncomingEvent(
        "f",
        "transport.metro.fare_evasion",
        "person",
        "resident-id",
        "350200199001011230",
        NOW - timedelta(days=1),
        {"station": "X", "amount": 3},
        "",
    )
    intake.submit("metro", [fare])
    reordered = replace(fare, attributes={"amount": 3.0, "station": "X"})
    changes = [
        replace(fare, attributes={"station": "X", "amount": 3.5}),
        replace(fare, attributes={"station": "Y", "amount": 3}),
        replace(fare, evidence_uri="https://metro.example/r/1"),
        replace(fare, occurred_at=NOW - timedelta(days=1, microseconds=1)),
        replace(fare, id_value="11010519491231002X"),
    ]
    results = intake.submit("metro", [reordered])
    assert [r.status for r in results] == [EventStatus.DUPLICATE]
    for changed in changes:
        assert [r.status for r in intake.submit("metro", [changed])] == [EventStatus.CONFLICT], changed
