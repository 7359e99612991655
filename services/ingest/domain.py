"""Intake of events (pure domain): validate, pseudonymise, deduplicate, record; and the
departments' retractions and corrections of events they sent.

(source, event_id) is the idempotency key. The payload's fingerprint, a hash over
everything the department sent (with the subject already pseudonymised), decides
whether a repeated key is a harmless duplicate or a conflicting reuse. It is taken with
the root generation's subject key and carried along the key chain like a subject key, so
a rotation moves it with the keys and a leaked root key alone does not reach it
(docs/security.md, "Rotating the subject key"). It hashes the event's canonical bytes,
the very bytes stored and relayed (services.ingest.wire); events stored before that
carry a hash over JSON, and a resend of one is compared with that hash.

A retraction never deletes: the event stays (so a resend of it is still a duplicate,
never a new event) and the retraction is stored beside it and relayed to rules after
the event, which reverses what the event caused. A correction is a retraction and the
replacement event, committed together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum
from functools import cached_property
from typing import Final, Protocol

from domain.catalogue import Catalogue, IncomingEvent, Scalar
from kit.errors import AlreadyExists, InvalidArgument, Violation
from kit.pseudonym import CanonicalId, Pseudonymiser
from services.ingest import wire


class EventStatus(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class EventResult:
    index: int
    event_id: str
    status: EventStatus
    violations: tuple[Violation, ...] = ()
    message: str = ""


@dataclass(frozen=True)
class NewEvent:
    """A valid event ready to store: the raw subject id is gone."""

    source: str
    event_id: str
    event_type: str
    subject_key: str
    subject_key_id: str
    subject_kind: str
    occurred_at: datetime
    attributes: Mapping[str, Scalar]
    evidence_uri: str
    fingerprint: str
    # The canonical bytes (services.ingest.wire.body), serialized once: hashed for the
    # fingerprint, then stored and relayed as they are.
    body: bytes
    # The fingerprint over JSON that events stored before FINGERPRINT_CANONICAL carry;
    # taken only when such an event is compared (`same_payload`).
    json_fingerprint: str | None = None

    # Read several times per event along a batch's way; the instance is frozen.
    @cached_property
    def key(self) -> tuple[str, str]:
        return (self.source, self.event_id)


# How a stored fingerprint was taken: SHA-256 over JSON (events stored before the
# canonical bytes; NULL in the database), or over the canonical bytes (`fingerprint`).
FINGERPRINT_JSON: Final = 1
FINGERPRINT_CANONICAL: Final = 2


@dataclass(frozen=True)
class StoredFingerprint:
    value: str
    version: int = FINGERPRINT_CANONICAL


def same_payload(stored: StoredFingerprint, new: NewEvent) -> bool:
    """Whether `new` is the event stored under its key: compared with the fingerprint of
    the stored one's version."""
    if stored.version == FINGERPRINT_CANONICAL:
        return stored.value == new.fingerprint
    if new.json_fingerprint is None:
        raise ValueError(f"the JSON fingerprint of event {new.event_id!r} was not taken")
    return stored.value == new.json_fingerprint


# A retraction's reason is shown to the subject and to reviewers: long enough to explain.
MAX_REASON_LENGTH: Final = 1000


@dataclass(frozen=True)
class Retraction:
    """A department's withdrawal of an event it sent, as stored."""

    source: str
    event_id: str
    subject_key: str
    reason: str
    retracted_at: datetime
    retracted_by: str
    # For a correction: the replacement's (source, event_id).
    replaced_by: tuple[str, str] | None = None
    # The generation of subject_key, the stored event's ("" for one from before generations).
    subject_key_id: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.event_id)


@dataclass(frozen=True)
class Retracted:
    """The answer to a retraction: the stored retraction, and whether it existed before."""

    retraction: Retraction
    already_retracted: bool


@dataclass(frozen=True)
class Corrected:
    retraction: Retraction
    replacement: EventResult


@dataclass(frozen=True)
class RetractionRequest:
    """What a department asks for; the store decides against what is stored."""

    source: str
    event_id: str
    reason: str
    actor: str
    at: datetime


class EventStore(Protocol):
    def record(
        self, events: Sequence[NewEvent], recorded_at: datetime
    ) -> Mapping[tuple[str, str], StoredFingerprint]:
        """In one transaction, store every event whose key is new, with its outbox row.

        Returns the stored fingerprint of each key that already existed (those events
        are not stored again).
        """
        ...

    def fingerprints(self, keys: Sequence[tuple[str, str]]) -> Mapping[tuple[str, str], StoredFingerprint]:
        """The stored fingerprint of each of these keys that exists; reads only."""
        ...

    def retract(self, request: RetractionRequest) -> Retracted:
        """In one transaction: the retraction, its outbox row (after the event's) and its
        audit record. NotFound if the source never sent the event; an existing
        retraction is returned as it is (already_retracted)."""
        ...

    def correct(
        self, request: RetractionRequest, replacement: NewEvent
    ) -> tuple[Retracted, StoredFingerprint | None]:
        """In one transaction: retract the original (replaced_by the replacement) and store
        the replacement with its outbox row, and the audit record.

        Returns the retraction (already_retracted when this very correction was made
        before) and the stored fingerprint of the replacement if its key existed. Raises
        NotFound for an unknown original, FailedPrecondition if it was retracted otherwise.
        """
        ...


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_future_skew: timedelta
    max_event_age: timedelta


def fingerprint(body: bytes, subject_key: str) -> str:
    """SHA-256 over the root generation's subject key and the event's canonical bytes."""
    return hashlib.sha256(subject_key.encode() + b"\x1f" + body).hexdigest()


def json_fingerprint(event: IncomingEvent, subject_key: str) -> str:
    """The fingerprint of events stored before FINGERPRINT_CANONICAL, kept as it was
    for their resends."""
    attributes = {
        name: [type(value).__name__, value.isoformat() if isinstance(value, datetime) else value]
        for name, value in sorted(event.attributes.items())
    }
    assert event.occurred_at is not None
    canonical = json.dumps(
        [
            event.event_type,
            event.subject_kind,
            subject_key,
            event.occurred_at.isoformat(),
            attributes,
            event.evidence_uri,
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Intake:
    """Turns submitted batches into stored events and a result per event."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        pseudonymiser: Pseudonymiser,
        store: EventStore,
        limits: Limits,
        clock: Callable[[], datetime],
    ) -> None:
        self._catalogue = catalogue
        self._pseudonymiser = pseudonymiser
        self._store = store
        self._limits = limits
        self._clock = clock

    @property
    def max_batch_size(self) -> int:
        return self._limits.max_batch_size

    @property
    def catalogue(self) -> Catalogue:
        return self._catalogue

    def check_request(self, source: str, count: int) -> list[Violation]:
        """Violations of the request as a whole (source, batch size)."""
        problems = []
        if not self._catalogue.knows_source(source):
            problems.append(Violation("source", f"unknown source {source!r}", "UNKNOWN_SOURCE"))
        if count == 0:
            problems.append(Violation("events", "must hold at least one event", "REQUIRED"))
        elif count > self._limits.max_batch_size:
            problems.append(
                Violation(
                    "events",
                    f"holds {count} events; the maximum is {self._limits.max_batch_size}",
                    "BATCH_TOO_LARGE",
                )
            )
        return problems

    def submit(
        self, source: str, events: Sequence[IncomingEvent], *, validate_only: bool = False
    ) -> list[EventResult]:
        """Validate and record a batch; one bad event never rejects the others.

        With `validate_only` nothing is recorded: the results are what recording would
        answer now (accepted meaning "would be accepted")."""
        now = self._clock()
        results: dict[int, EventResult] = {}
        candidates: dict[tuple[str, str], tuple[int, NewEvent]] = {}
        pending: list[tuple[int, NewEvent, IncomingEvent, CanonicalId]] = []
        for index, event in enumerate(events):
            violations, ready = self._ready(source, event, now)
            if ready is None:
                results[index] = EventResult(
                    index,
                    event.event_id,
                    EventStatus.REJECTED,
                    tuple(violations),
                    f"{len(violations)} invalid field(s): " + ", ".join(v.field for v in violations),
                )
                continue
            new, subject = ready
            earlier = candidates.get(new.key)
            if earlier is not None:
                in_batch = StoredFingerprint(earlier[1].fingerprint)
                results[index] = self._repeat(index, new, in_batch, "earlier in this batch")
                continue
            candidates[new.key] = (index, new)
            pending.append((index, new, event, subject))

        if not pending:
            existing: Mapping[tuple[str, str], StoredFingerprint] = {}
        elif validate_only:
            existing = self._store.fingerprints([new.key for _, new, _, _ in pending])
        else:
            existing = self._store.record([new for _, new, _, _ in pending], now)
        for index, new, event, subject in pending:
            found = existing.get(new.key)
            if found is None:
                results[index] = EventResult(index, new.event_id, EventStatus.ACCEPTED)
                continue
            # Stored before canonical fingerprints: compared with the JSON one (rare, so taken here).
            compared = (
                new
                if found.version == FINGERPRINT_CANONICAL
                else self._pseudonymise(source, event, subject, with_json_fingerprint=True)
            )
            results[index] = self._repeat(index, compared, found, "earlier")
        return [results[i] for i in range(len(events))]

    def retract(self, source: str, event_id: str, reason: str, actor: str) -> Retracted:
        """Retract an event the department sent; a repeated retraction returns the first."""
        problems = check_reason(reason) + check_ref(source, event_id)
        if problems:
            raise InvalidArgument("invalid retraction", problems)
        return self._store.retract(RetractionRequest(source, event_id, reason, actor, self._clock()))

    def correct(
        self, source: str, event_id: str, reason: str, replacement: IncomingEvent, actor: str
    ) -> Corrected:
        """Retract an event and store its replacement together.

        The replacement is validated exactly as a submitted event (violations under
        "replacement."), must come from the same source and needs its own event_id. A
        resend of the same correction answers as the first did, the replacement being
        a duplicate.
        """
        now = self._clock()
        problems = check_reason(reason) + check_ref(source, event_id)
        # The store compares it with a stored event of either fingerprint version.
        violations, ready = self._ready(source, replacement, now, with_json_fingerprint=True)
        problems += [v.prefixed("replacement") for v in violations]
        if replacement.event_id == event_id:
            problems.append(
                Violation(
                    "replacement.event_id",
                    "must differ from the corrected event's: its id stays taken by the retracted event",
                    "SAME_EVENT_ID",
                )
            )
        if problems:
            raise InvalidArgument("invalid correction", problems)
        assert ready is not None
        new = ready[0]
        retracted, stored = self._store.correct(RetractionRequest(source, event_id, reason, actor, now), new)
        result = (
            EventResult(0, new.event_id, EventStatus.ACCEPTED)
            if stored is None
            else self._repeat(0, new, stored, "earlier")
        )
        if result.status is EventStatus.CONFLICT:
            # The store refuses before committing anything; this is the belt to its braces.
            raise AlreadyExists(result.message, reason="EVENT_ID_CONFLICT")
        return Corrected(retracted.retraction, result)

    @staticmethod
    def _repeat(index: int, new: NewEvent, stored: StoredFingerprint, when: str) -> EventResult:
        if same_payload(stored, new):
            return EventResult(index, new.event_id, EventStatus.DUPLICATE)
        return EventResult(
            index,
            new.event_id,
            EventStatus.CONFLICT,
            message=f"event_id {new.event_id!r} was submitted {when} with a different payload",
        )

    def _ready(
        self, source: str, event: IncomingEvent, now: datetime, *, with_json_fingerprint: bool = False
    ) -> tuple[list[Violation], tuple[NewEvent, CanonicalId] | None]:
        """`event` checked against the catalogue at `now`: its violations, or none and the
        event ready to store with its subject's canonical id."""
        checked = self._catalogue.check(
            source,
            event,
            now=now,
            max_skew=self._limits.max_future_skew,
            max_age=self._limits.max_event_age,
        )
        if checked.violations:
            return checked.violations, None
        assert checked.subject is not None  # a valid event's subject is valid
        new = self._pseudonymise(source, event, checked.subject, with_json_fingerprint=with_json_fingerprint)
        return [], (new, checked.subject)

    def _pseudonymise(
        self,
        source: str,
        event: IncomingEvent,
        subject: CanonicalId,
        *,
        with_json_fingerprint: bool = False,
    ) -> NewEvent:
        """`event` ready to store; `subject` is its id as validation canonicalised it."""
        assert event.subject_kind is not None
        assert event.occurred_at is not None
        chain = self._pseudonymiser
        keys = chain.canonical_generation_keys(subject)
        subject_key = keys[-1][1]
        attributes = {k: v for k, v in event.attributes.items() if v is not None}
        spec = self._catalogue.event_types[event.event_type].attributes
        # A double attribute sent as a whole number is stored as a double, so that a
        # resend with 3 or 3.0 is the same event.
        for name, value in attributes.items():
            if spec[name].type == "double" and isinstance(value, int):
                attributes[name] = float(value)
        body = wire.body(
            source=source,
            event_id=event.event_id,
            event_type=event.event_type,
            subject_kind=event.subject_kind,
            occurred_at=event.occurred_at,
            attributes=attributes,
            evidence_uri=event.evidence_uri,
        )
        new = NewEvent(
            source=source,
            event_id=event.event_id,
            event_type=event.event_type,
            subject_key=subject_key,
            subject_key_id=chain.current_key_id,
            subject_kind=event.subject_kind,
            occurred_at=event.occurred_at,
            attributes=attributes,
            evidence_uri=event.evidence_uri,
            # Of the same generation as the key: the store keeps both in one generation.
            fingerprint=chain.rekey(fingerprint(body, keys[0][1]), chain.key_id),
            body=body,
        )
        if not with_json_fingerprint:
            return new
        normalised = IncomingEvent(
            event.event_id,
            event.event_type,
            event.subject_kind,
            event.id_scheme,
            event.id_value,
            event.occurred_at,
            attributes,
            event.evidence_uri,
        )
        return replace(
            new, json_fingerprint=chain.rekey(json_fingerprint(normalised, keys[0][1]), chain.key_id)
        )


def check_reason(reason: str) -> list[Violation]:
    if not reason.strip():
        return [Violation("reason", "is required", "REQUIRED")]
    if len(reason) > MAX_REASON_LENGTH:
        return [
            Violation("reason", f"holds {len(reason)} characters; at most {MAX_REASON_LENGTH}", "TOO_LONG")
        ]
    return []


def check_ref(source: str, event_id: str) -> list[Violation]:
    problems = []
    if not source:
        problems.append(Violation("ref.source", "is required", "REQUIRED"))
    if not event_id:
        problems.append(Violation("ref.event_id", "is required", "REQUIRED"))
    return problems
