"""Reads of scores and ledger entries (pure domain).

A subject is named either by its raw identifier, hashed exactly as ingest hashes it
(the raw value goes no further than the hash), or by its subject key. Entries are
listed newest event time first with keyset pages: the page token carries the last
(occurred_at, entry_id) seen, so pages stay stable while new entries arrive.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from kit.errors import InvalidArgument, NotFound, Violation
from kit.pseudonym import Pseudonymiser, subject_violations
from services.score.domain import CategoryScore, LedgerEntry
from services.score.policy import ScorePolicy

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_SUBJECT_KEY = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RawSubject:
    kind: str | None
    id_scheme: str
    id_value: str


@dataclass(frozen=True)
class SubjectRef:
    """Exactly one of `subject` and `subject_key` is set in a valid ref."""

    subject: RawSubject | None = None
    subject_key: str | None = None


@dataclass(frozen=True)
class SubjectScore:
    subject_key: str
    subject_kind: str
    score: int
    tier: str
    categories: tuple[CategoryScore, ...]
    as_of: datetime
    policy_version: str
    entry_count: int


@dataclass(frozen=True)
class ScoreView:
    score: SubjectScore
    base_score: int


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last entry it returned."""

    occurred_at: datetime
    entry_id: str


@dataclass(frozen=True)
class EntryPage:
    entries: tuple[LedgerEntry, ...]
    next_page_token: str


class ScoreReadStore(Protocol):
    def score(self, subject_key: str) -> SubjectScore | None: ...

    def entries(self, subject_key: str, after: Cursor | None, limit: int) -> Sequence[LedgerEntry]:
        """Up to `limit` entries, newest occurred_at first then entry_id descending,
        strictly after `after` in that order."""
        ...

    def entry(self, entry_id: str) -> LedgerEntry | None: ...


def encode_page_token(cursor: Cursor) -> str:
    raw = json.dumps([cursor.occurred_at.astimezone(UTC).isoformat(), cursor.entry_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> Cursor:
    invalid = InvalidArgument(
        "invalid page token",
        [Violation("page_token", "is not a next_page_token returned by ListEntries", "INVALID_PAGE_TOKEN")],
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        occurred_at, entry_id = json.loads(raw)
        when = datetime.fromisoformat(occurred_at)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise invalid from exc
    if when.tzinfo is None or not isinstance(entry_id, str):
        raise invalid
    return Cursor(when.astimezone(UTC), entry_id)


def page_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            "invalid page size",
            [
                Violation(
                    "page_size",
                    f"must be 0 (default {DEFAULT_PAGE_SIZE}) or 1 to {MAX_PAGE_SIZE}",
                    "OUT_OF_RANGE",
                )
            ],
        )
    return requested


class Reader:
    """Answers reads of the score store on behalf of QueryService."""

    def __init__(self, *, store: ScoreReadStore, pseudonymiser: Pseudonymiser, policy: ScorePolicy) -> None:
        self._store = store
        self._pseudonymiser = pseudonymiser
        self._policy = policy

    def subject_key(self, ref: SubjectRef, field: str = "subject") -> str:
        """The subject key `ref` names; InvalidArgument listing every problem otherwise."""
        if ref.subject_key is not None:
            if not _SUBJECT_KEY.match(ref.subject_key):
                raise InvalidArgument(
                    "invalid subject",
                    [Violation(f"{field}.subject_key", "must be 64 lower-case hex digits", "INVALID")],
                )
            return ref.subject_key
        raw = ref.subject
        if raw is None:
            raise InvalidArgument(
                "invalid subject", [Violation(field, "needs a subject or a subject_key", "REQUIRED")]
            )
        problems = [v.prefixed(field) for v in subject_violations(raw.kind, raw.id_scheme, raw.id_value)]
        if problems:
            raise InvalidArgument("invalid subject", problems)
        assert raw.kind is not None
        return self._pseudonymiser.subject_key(raw.kind, raw.id_scheme, raw.id_value)

    def score(self, ref: SubjectRef) -> ScoreView:
        key = self.subject_key(ref)
        stored = self._store.score(key)
        if stored is None:
            raise NotFound("no score is held for this subject")
        return ScoreView(score=stored, base_score=self._policy.for_kind(stored.subject_kind).base)

    def entries(self, ref: SubjectRef, requested_page_size: int, page_token: str) -> EntryPage:
        key = self.subject_key(ref)
        size = page_size(requested_page_size)
        after = decode_page_token(page_token) if page_token else None
        # One extra row tells whether another page follows without a count query.
        rows = self._store.entries(key, after, size + 1)
        page = tuple(rows[:size])
        more = len(rows) > size
        token = encode_page_token(Cursor(page[-1].occurred_at, page[-1].entry_id)) if more else ""
        return EntryPage(entries=page, next_page_token=token)

    def entry(self, entry_id: str) -> LedgerEntry:
        if not entry_id:
            raise InvalidArgument("invalid request", [Violation("entry_id", "is required", "REQUIRED")])
        found = self._store.entry(entry_id)
        if found is None:
            raise NotFound(f"no ledger entry {entry_id!r}")
        return found
