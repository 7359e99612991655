"""How a read names its subject: a raw id, a subject key, or the subject caller itself, and
the keys query derives from them (of a known generation during a key rotation)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RawSubject:
    """A raw id as the request gave it, unchecked; it lives for that request only."""

    kind: str | None
    id_scheme: str
    # Never in a log line or a traceback.
    id_value: str = field(repr=False)


class SubjectKey(str):
    """A key query derived itself (from a raw id, or a subject's token), so of a known
    generation: the key to read score's store with, the previous generation's while score
    still holds the subject under it; `current` is the subject's key in the current
    generation, which its token names and its access records keep."""

    current: str

    def __new__(cls, key: str, current: str) -> SubjectKey:
        held = super().__new__(cls, key)
        held.current = current
        return held


def current_key(key: str) -> str:
    """The current generation's key of the subject `key` names when query derived it; a
    key given by a caller, or read from score's rows, as it is (its generation is unknown)."""
    return key.current if isinstance(key, SubjectKey) else key


@dataclass(frozen=True)
class SubjectRef:
    """Exactly one of `subject`, `subject_key` and `own` is set in a valid ref. `own` is a
    subject caller naming itself by its token: (key id, key) of every generation of its
    key, root first (kit.principal.Principal.generation_keys), found as a raw id's keys are."""

    subject: RawSubject | None = None
    subject_key: str | None = None
    own: tuple[tuple[str, str], ...] = ()
