"""What the staff console reads from the services, as plain data (services.portal.records
holds the resident's; these add what only staff see). Subject keys are kept where a later
call needs them, never shown, logged or put in a URL (their repr hides them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.portal import records as r


@dataclass(frozen=True)
class Case:
    """An entry read for review, with its latest dispute and repair application, and the key
    of its subject (to read the subject's history and score with the same purpose)."""

    entry: r.Entry
    subject_key: str = field(repr=False)


@dataclass(frozen=True)
class Queued:
    """A dispute or repair application of a queue, with its entry (None if the entry could
    not be read: the row still shows, with the reason)."""

    item: r.Dispute | r.Repair
    entry: r.Entry | None
    problem: str = ""  # the gRPC code of a failed entry read


@dataclass(frozen=True)
class Score:
    score: int
    tier: str
    as_of: datetime | None
    policy_version: str


@dataclass(frozen=True)
class ChainState:
    """A service's audit chain as its VerifyAuditChain answered."""

    service: str
    intact: bool
    records: int
    last_seq: int
    last_hash: str
    problems: tuple[str, ...]
    anchors_checked: int
    verified_at: datetime | None
