"""Pseudonymous subject keys: a keyed HMAC of the canonical subject identifier.

Raw identifiers are turned into keys on arrival and never stored, logged or traced.
Every raw id (a submitted event, a subject token, a read by raw id) is brought to its
scheme's canonical form here, once, before it is hashed, so that one subject has one key
however its id was written (docs/security.md, "Subject identifiers"). The key id is
recorded next to every key so that a key can be rotated.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from operator import mul
from typing import TYPE_CHECKING

from kit.errors import Unavailable, Violation
from kit.vocabulary import SUBJECT_KINDS

if TYPE_CHECKING:
    from kit.settings import PseudonymSettings

# GB 11643-1999: weights of the first 17 digits of a resident identity number (ISO 7064
# MOD 11-2) and the check character for each remainder.
_RESIDENT_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_RESIDENT_CHECK = "10X98765432"
# GB 32100-2015: the unified social credit code's 31 characters (no I, O, Z, S, V) and the
# weights 3**i mod 31 of its first 17.
USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
# Written ids often carry spaces, dashes or dots between groups; no scheme here uses them.
_SEPARATORS = re.compile(r"[\s\-./]+")


def resident_id_check_character(body: str) -> str:
    """The check character of the first 17 digits of a resident identity number."""
    # map() rather than a generator expression: this runs for every submitted event.
    if len(body) != len(_RESIDENT_WEIGHTS):
        raise ValueError(f"a resident id's body has {len(_RESIDENT_WEIGHTS)} digits, not {len(body)}")
    return _RESIDENT_CHECK[sum(map(mul, map(int, body), _RESIDENT_WEIGHTS)) % 11]


def uscc_check_character(body: str) -> str:
    """The check character of the first 17 characters of a unified social credit code."""
    if len(body) != len(_USCC_WEIGHTS):
        raise ValueError(
            f"a unified social credit code's body has {len(_USCC_WEIGHTS)} characters, not {len(body)}"
        )
    base = len(USCC_ALPHABET)
    total = sum(map(mul, map(USCC_ALPHABET.index, body), _USCC_WEIGHTS))
    return USCC_ALPHABET[(base - total % base) % base]


class InvalidId(ValueError):
    """A raw id its scheme refuses; `reason` becomes the violation's code."""

    def __init__(self, description: str, reason: str = "INVALID") -> None:
        super().__init__(description)
        self.description = description
        self.reason = reason


_RESIDENT_ID = re.compile(r"^\d{17}[\dX]$")
_RESIDENT_ID_15 = re.compile(r"^\d{15}$")


def _resident_id(value: str) -> str:
    if _RESIDENT_ID_15.match(value):
        # A first-generation (1984) number: region, YYMMDD, sequence, no check character.
        # GB 11643-1999 widens it to the 18-character number the same person holds now.
        body = f"{value[:6]}19{value[6:]}"
        return body + resident_id_check_character(body)
    if not _RESIDENT_ID.match(value):
        raise InvalidId("must be 18 characters: 17 digits and a check digit or X")
    if resident_id_check_character(value[:17]) != value[17]:
        raise InvalidId("has a wrong check character", "BAD_CHECK_CHARACTER")
    return value


_USCC = re.compile(f"^[{USCC_ALPHABET}]{{18}}$")


def _uscc(value: str) -> str:
    if not _USCC.match(value):
        raise InvalidId("must be 18 characters of 0-9 and A-Y without I, O, S, V, Z")
    if uscc_check_character(value[:17]) != value[17]:
        raise InvalidId("has a wrong check character", "BAD_CHECK_CHARACTER")
    return value


_PASSPORT = re.compile(r"^[A-Z0-9]{5,20}$")


def _passport(value: str) -> str:
    # Passport numbers carry no check character of their own (ICAO 9303 puts it in the
    # machine-readable zone, not in the number).
    if not _PASSPORT.match(value):
        raise InvalidId("must be 5 to 20 letters or digits")
    return value


@dataclass(frozen=True)
class IdScheme:
    kinds: tuple[str, ...]
    canonical: Callable[[str], str]


# The identifier schemes Egret accepts, by name (DOMAIN.md, "Subject"). A new scheme
# needs its canonical form here first: ids of an unknown scheme could not be matched.
ID_SCHEMES: dict[str, IdScheme] = {
    "resident-id": IdScheme(("person",), _resident_id),
    "passport": IdScheme(("person",), _passport),
    "uscc": IdScheme(("organization",), _uscc),
}


def canonical_scheme(id_scheme: str) -> str:
    return unicodedata.normalize("NFKC", id_scheme).strip().lower()


def canonical_value(id_scheme: str, id_value: str) -> str:
    """`id_value` in the canonical form of its scheme: NFKC, upper case, no separators,
    its check character verified. InvalidId when the scheme is unknown or refuses it."""
    scheme = ID_SCHEMES.get(canonical_scheme(id_scheme))
    if scheme is None:
        raise InvalidId(f"must be one of {', '.join(sorted(ID_SCHEMES))}")
    return _canonical_in(scheme, id_value)


def _canonical_in(scheme: IdScheme, id_value: str) -> str:
    return scheme.canonical(_SEPARATORS.sub("", unicodedata.normalize("NFKC", id_value)).upper())


@dataclass(frozen=True, slots=True)
class CanonicalId:
    """A checked subject id in canonical form: what its keys are hashed from
    (`Pseudonymiser.canonical_generation_keys`). It holds a raw id: it lives for the request
    that carried it and is never stored or kept across requests."""

    kind: str
    scheme: str
    value: str

    def __repr__(self) -> str:
        # Never a raw id in a log line or a traceback.
        return f"CanonicalId({self.kind!r}, {self.scheme!r}, <redacted>)"


def check_subject(
    kind: str | None, id_scheme: str, id_value: str
) -> tuple[list[Violation], CanonicalId | None]:
    """`subject_violations`, and the canonical id when there are none: an event is checked
    and then hashed from the same canonical value, canonicalised once."""
    problems = []
    if kind not in SUBJECT_KINDS:
        problems.append(Violation("subject.kind", "is required", "REQUIRED"))
    scheme_name = canonical_scheme(id_scheme)
    scheme = ID_SCHEMES.get(scheme_name)
    if scheme is None:
        problems.append(
            Violation("subject.id_scheme", f"must be one of {', '.join(sorted(ID_SCHEMES))}", "INVALID")
        )
    elif kind in SUBJECT_KINDS and kind not in scheme.kinds:
        problems.append(Violation("subject.id_scheme", f"does not name a {kind}", "WRONG_KIND"))
    value = None
    if not 1 <= len(id_value.strip()) <= 128:
        problems.append(Violation("subject.id_value", "must be 1 to 128 characters", "INVALID"))
    elif scheme is not None:
        try:
            value = _canonical_in(scheme, id_value)
        except InvalidId as exc:
            problems.append(Violation("subject.id_value", exc.description, exc.reason))
    if problems or kind is None or value is None:
        return problems, None
    return problems, CanonicalId(kind, scheme_name, value)


def subject_violations(kind: str | None, id_scheme: str, id_value: str) -> list[Violation]:
    """Every problem of a raw subject id, with paths under "subject."; empty when valid.

    Ingest, query and the token verifier check raw ids the same way, so a subject one
    accepts the others find.
    """
    return check_subject(kind, id_scheme, id_value)[0]


@dataclass(frozen=True)
class KeyLink:
    """One key rotation: a key of the generation before is re-keyed as HMAC(secret, key)."""

    key_id: str
    secret: bytes


class UnknownKeyGeneration(Unavailable):
    """A subject key of a generation this instance is not configured for (yet): the sender
    retries (UNAVAILABLE) until the rotation reaches this instance's settings."""


def _link(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Pseudonymiser:
    """The root key (`key`, `key_id`), applied to canonical raw ids, and the rotations after it.

    Rotation is a keyed chain (docs/security.md, "Rotating the subject key"): the key of
    generation n is HMAC(secret_n, key of generation n-1), so stored keys move to a new
    generation without their raw ids, and a raw id reaches a stored key only through
    every secret of the chain: a leaked root key alone links no raw id to a stored key.
    A service that never hashes raw ids (rules) holds the rotations without the root key
    (`key` empty): it can move keys forward but not make them.
    """

    key: bytes
    key_id: str
    rotations: tuple[KeyLink, ...] = ()

    @classmethod
    def from_settings(cls, settings: PseudonymSettings) -> Pseudonymiser:
        return cls(settings.key, settings.key_id, tuple(KeyLink(i, s) for i, s in settings.rotations))

    # Cached: the instance is frozen, and these are read for every event. cached_property
    # writes the instance's __dict__ directly, which a frozen dataclass allows.
    @cached_property
    def generations(self) -> tuple[str, ...]:
        """Every key id of the chain, root first, current last."""
        return (self.key_id, *(link.key_id for link in self.rotations))

    @cached_property
    def current_key_id(self) -> str:
        return self.generations[-1]

    @property
    def previous_key_id(self) -> str | None:
        """The generation before the current one, whose keys are still accepted."""
        ids = self.generations
        return ids[-2] if len(ids) > 1 else None

    def subject_key(self, kind: str, id_scheme: str, id_value: str) -> str:
        """The current subject key for (kind, scheme, value), hashed in their canonical form.

        InvalidId for an id `subject_violations` refuses: callers check first.
        """
        return self.generation_keys(kind, id_scheme, id_value)[-1][1]

    def subject_keys(self, kind: str, id_scheme: str, id_value: str) -> tuple[str, ...]:
        """The current key, then the previous generation's (during a rotation): a read by
        raw id looks for both until the re-keying job has moved every stored key."""
        return tuple(key for _, key in reversed(self.generation_keys(kind, id_scheme, id_value)[-2:]))

    def generation_keys(self, kind: str, id_scheme: str, id_value: str) -> tuple[tuple[str, str], ...]:
        """(key id, key) of every generation, root first: records that keep the key they
        were written with (hash-chained logs) are found by raw id under any of them."""
        if not self.key:
            raise RuntimeError("this instance holds no root subject key: it cannot hash raw ids")
        scheme = canonical_scheme(id_scheme)
        value = canonical_value(scheme, id_value)
        if kind not in ID_SCHEMES[scheme].kinds:
            raise InvalidId(f"{scheme} does not name a {kind}", "WRONG_KIND")
        return self.canonical_generation_keys(CanonicalId(kind, scheme, value))

    def canonical_generation_keys(self, subject: CanonicalId) -> tuple[tuple[str, str], ...]:
        """`generation_keys` of an id `check_subject` has already canonicalised."""
        if not self.key:
            raise RuntimeError("this instance holds no root subject key: it cannot hash raw ids")
        message = "\x1f".join((subject.kind, subject.scheme, subject.value))
        keys = [(self.key_id, hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest())]
        for link in self.rotations:
            keys.append((link.key_id, _link(link.secret, keys[-1][1])))
        return tuple(keys)

    def rekey(self, key: str, key_id: str) -> str:
        """`key`, stored under generation `key_id`, moved to the current generation. Needs
        only the secrets of the rotations after `key_id`, never the root key or a raw id.
        KeyError for a generation this chain does not know."""
        ids = self.generations
        if key_id not in ids:
            raise KeyError(f"unknown subject key id {key_id!r}")
        for link in self.rotations[ids.index(key_id) :]:
            key = _link(link.secret, key)
        return key

    def forward(self, key: str, key_id: str) -> str:
        """A key that arrived from another service, in the current generation: `key_id`
        names its generation ("" for a sender that predates rotation: the current one).
        UnknownKeyGeneration when this instance does not know `key_id` yet."""
        if not key_id or key_id == self.current_key_id:
            return key
        try:
            return self.rekey(key, key_id)
        except KeyError:
            raise UnknownKeyGeneration(
                f"subject key generation {key_id!r} is not configured here "
                f"(this instance knows {', '.join(self.generations)}); retry after the rotation reaches it"
            ) from None
