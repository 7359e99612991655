"""Pseudonymous subject keys: a keyed HMAC of the raw subject identifier.

Raw identifiers are turned into keys on arrival and never stored, logged or traced.
A read by raw identifier hashes it the same way. The key id is recorded next to every
key so that a key can be rotated.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Pseudonymiser:
    key: bytes
    key_id: str

    def subject_key(self, kind: str, id_scheme: str, id_value: str) -> str:
        """The subject key for (kind, scheme, value); scheme and value are normalised first."""
        message = "\x1f".join((kind, id_scheme.strip().lower(), id_value.strip())).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()
