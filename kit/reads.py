"""Reads of subject data that serve something else: rules' backtests and dead letters,
score's verification.

These calls answer without subject data unless the caller states a purpose (an optional
purpose, unlike query's reads); with one, checked by kit.purposes exactly as query checks
it, they return the subjects and the read is appended to the service's own audit log
before the answer leaves: `read:<Method>`, with who, role, purpose code and note. One
record per subject named up to `PER_SUBJECT_BOUND` subjects, beyond it a single record
with their count and a digest of their keys (docs/security.md, "Purposes").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from kit import audit
from kit.db import run_blocking
from kit.principal import current_principal
from kit.purposes import Purposes, StatedPurpose

READ_PREFIX: Final = "read:"
# Subjects named in one answer that get a record each: a backtest lists up to 10,000,
# which one summary record covers, so a call writes at most this many records.
PER_SUBJECT_BOUND: Final = 1000


def optional_purpose(purposes: Purposes, code: str, note: str) -> StatedPurpose | None:
    """None when the request states neither a purpose nor a note (answer without subject
    data); else the purpose as kit.purposes checks it (INVALID_ARGUMENT naming the field)."""
    if not code.strip() and not note:
        return None
    return purposes.check(current_principal(), code, note)


def keys_digest(subject_keys: Iterable[str]) -> str:
    """SHA-256 of the distinct keys, sorted, one per line: checks a list kept elsewhere."""
    return hashlib.sha256("\n".join(sorted(set(subject_keys))).encode()).hexdigest()


def read_records(
    method: str,
    at: datetime,
    subject_keys: Iterable[str],
    purpose: StatedPurpose,
    *,
    target: str,
    detail: Mapping[str, Any] | None = None,
) -> list[audit.AuditRecord]:
    """The records of a read by the principal of the call being handled: one per distinct
    subject, or one with the count and digest when there are more than PER_SUBJECT_BOUND
    (or none, so that a stated purpose is recorded even when nothing matched)."""
    keys = sorted(set(subject_keys))
    facts = {**purpose.detail(), **(detail or {}), "subjects": len(keys)}
    if 0 < len(keys) <= PER_SUBJECT_BOUND:
        return [
            audit.record(
                READ_PREFIX + method, at, subject_key=key, purpose=purpose.code, target=target, detail=facts
            )
            for key in keys
        ]
    facts["subjects_sha256"] = keys_digest(keys)
    return [audit.record(READ_PREFIX + method, at, purpose=purpose.code, target=target, detail=facts)]


class ReadLog:
    """A service's reads of subject data: checks their optional purpose, and appends their
    records to the service's audit log (each read in its own transaction)."""

    def __init__(
        self,
        purposes: Purposes,
        sessions: sessionmaker[Session],
        log: Any,
        head: Any,
        *,
        keys: audit.AuditKeys,
        clock: Callable[[], datetime],
    ) -> None:
        self._purposes = purposes
        self._sessions = sessions
        self._log = log
        self._head = head
        self._keys = keys
        self._clock = clock

    def purpose(self, request: Any) -> StatedPurpose | None:
        """The request's optional purpose (its `purpose` and `purpose_note` fields)."""
        return optional_purpose(self._purposes, request.purpose, request.purpose_note)

    async def record(
        self,
        method: str,
        subject_keys: Iterable[str],
        purpose: StatedPurpose,
        *,
        target: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit the read's records; call it before the answer leaves, so that an answer
        whose record cannot be written is never sent."""
        records = read_records(method, self._clock(), subject_keys, purpose, target=target, detail=detail)
        await run_blocking(None, self._append, records)

    def _append(self, records: list[audit.AuditRecord]) -> None:
        with self._sessions() as session, session.begin():
            audit.append(session, self._log, self._head, records, keys=self._keys)
