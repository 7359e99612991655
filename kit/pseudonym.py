"""Pseudonymous subject keys: a keyed HMAC of the raw subject identifier.

Raw identifiers are turned into keys on arrival and never stored, logged or traced.
A read by raw identifier hashes it the same way. The key id is recorded next to every
key so that a key can be rotated.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from kit.errors import Violation
from kit.vocabulary import SUBJECT_KINDS


@dataclass(frozen=True)
class Pseudonymiser:
    key: bytes
    key_id: str

    def subject_key(self, kind: str, id_scheme: str, id_value: str) -> str:
        """The subject key for (kind, scheme, value); scheme and value are normalised first."""
        message = "\x1f".join((kind, id_scheme.strip().lower(), id_value.strip())).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()


_ID_SCHEME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def subject_violations(kind: str | None, id_scheme: str, id_value: str) -> list[Violation]:
    """Every problem of a raw subject id, with paths under "subject."; empty when valid.

    Ingest and query check raw ids the same way, so a subject one accepts the other finds.
    """
    problems = []
    if kind not in SUBJECT_KINDS:
        problems.append(Violation("subject.kind", "is required", "REQUIRED"))
    if not _ID_SCHEME.match(id_scheme):
        problems.append(
            Violation("subject.id_scheme", "must be 1 to 32 lower-case letters, digits or dashes", "INVALID")
        )
    if not 1 <= len(id_value.strip()) <= 128:
        problems.append(Violation("subject.id_value", "must be 1 to 128 characters", "INVALID"))
    return problems
