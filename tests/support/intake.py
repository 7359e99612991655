"""The ingest intake over an in-memory store, and sample events for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from domain.catalogue import IncomingEvent, load_catalogue
from kit.errors import NotFound
from kit.pseudonym import Pseudonymiser
from services.ingest.domain import (
    EventStore,
    Intake,
    Limits,
    NewEvent,
    Retracted,
    Retraction,
    RetractionRequest,
    StoredFingerprint,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)


class MemoryStore:
    def __init__(self) -> None:
        self.events: dict[tuple[str, str], NewEvent] = {}
        self.retractions: dict[tuple[str, str], Retraction] = {}
        self.calls = 0
        # Fingerprints as an earlier version stored them, by key (e.g. over JSON).
        self.stored_fingerprints: dict[tuple[str, str], StoredFingerprint] = {}

    def stored(self, key: tuple[str, str]) -> StoredFingerprint:
        return self.stored_fingerprints.get(key) or StoredFingerprint(self.events[key].fingerprint)

    def record(
        self, events: Sequence[NewEvent], recorded_at: datetime
    ) -> Mapping[tuple[str, str], StoredFingerprint]:
        self.calls += 1
        existing = {e.key: self.stored(e.key) for e in events if e.key in self.events}
        for e in events:
            self.events.setdefault(e.key, e)
        return existing

    def fingerprints(self, keys: Sequence[tuple[str, str]]) -> Mapping[tuple[str, str], StoredFingerprint]:
        return {key: self.stored(key) for key in keys if key in self.events}

    def retract(self, request: RetractionRequest) -> Retracted:
        key = (request.source, request.event_id)
        if key not in self.events:
            raise NotFound("no such event")
        if key in self.retractions:
            return Retracted(self.retractions[key], already_retracted=True)
        retraction = Retraction(
            request.source,
            request.event_id,
            self.events[key].subject_key,
            request.reason,
            request.at,
            request.actor,
        )
        self.retractions[key] = retraction
        return Retracted(retraction, already_retracted=False)

    def correct(
        self, request: RetractionRequest, replacement: NewEvent
    ) -> tuple[Retracted, StoredFingerprint | None]:
        stored = self.stored(replacement.key) if replacement.key in self.events else None
        retracted = self.retract(request)
        self.retractions[retracted.retraction.key] = replace(
            retracted.retraction, replaced_by=replacement.key
        )
        self.events.setdefault(replacement.key, replacement)
        return Retracted(self.retractions[retracted.retraction.key], False), stored


def make_intake(store: EventStore, pseudonymiser: Pseudonymiser | None = None) -> Intake:
    return Intake(
        catalogue=load_catalogue(Path("config/catalogue.yaml")),
        pseudonymiser=pseudonymiser or Pseudonymiser(b"k" * 32, "k1"),
        store=store,
        limits=Limits(
            max_batch_size=3, max_future_skew=timedelta(minutes=5), max_event_age=timedelta(days=3650)
        ),
        clock=lambda: NOW,
    )


def late(event_id: str, days: int, subject: str = "350200199001011230") -> IncomingEvent:
    return IncomingEvent(
        event_id,
        "library.book_returned_late",
        "person",
        "resident-id",
        subject,
        NOW - timedelta(days=2),
        {"days_late": days},
        "",
    )
