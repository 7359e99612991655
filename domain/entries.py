"""Ledger entries and their pauses: what an entry is, when it counts, and why not.

Due process (disputes, repairs, corrections) never edits an entry's facts: it adds
*pauses*, dated intervals in which the entry does not count (see `Pause`, `pauses_of`
and docs/due-process.md). Whether an entry counts at an instant, in a view, is decided
here for every service alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Final, Protocol

from domain.policy import SubjectPolicy


class EntryStatus(Enum):
    """What an entry shows on reads, stored in `score_ledger.status` (`status_of`):
    reversed > repaired > disputed (an open dispute) > active. Expired is not stored:
    readers derive it from visible_until. Whether an entry counts at an instant is decided
    by its pauses (`counts_at`), not by this status."""

    ACTIVE = "active"
    DISPUTED = "disputed"
    REVERSED = "reversed"
    REPAIRED = "repaired"
    EXPIRED = "expired"


# For scorable objects that carry no pauses (e.g. the rules backtest's lines): only
# active entries count.
COUNTING = frozenset({EntryStatus.ACTIVE})


class View(Enum):
    """Which timeline an instant is read on.

    AS_KNOWN (the default, what Egret served then): an entry counts from its recorded_at,
    and a reversal takes effect from the instant it was made. AS_CORRECTED: reversed
    (void) entries never counted, and entries count from their occurred_at, as if every
    event had been known when it happened.
    """

    AS_KNOWN = "as_known"
    AS_CORRECTED = "as_corrected"


# Kinds of pause, and the causes of history rows they produce.
DISPUTE = "dispute"
REPAIR = "repair"
CORRECTION = "correction"
OVERTURN = "overturn"


@dataclass(frozen=True)
class Pause:
    """An interval [start, end) in which an entry does not count (end None: for good).

    - `dispute`: a dispute undecided at its deadline, from the deadline to its decision;
    - `overturn`: a dispute overturned, from the decision on (void);
    - `repair`: an approved repair, from the decision on;
    - `correction`: a source retraction, from the instant score learned it on (void).

    A void pause makes the entry void: on the corrected timeline it never counted.
    `ref` names what caused it (a dispute or application id, "source/event_id").
    """

    start: datetime
    end: datetime | None = None
    void: bool = False
    kind: str = ""
    ref: str = ""

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)


OPEN = "open"
UPHELD = "upheld"
OVERTURNED = "overturned"
PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"


@dataclass(frozen=True)
class DisputeRecord:
    """A dispute of one entry (table score_disputes). `status` is open, upheld or
    overturned; `resolved_*` are set once decided."""

    dispute_id: int
    entry_id: str
    subject_key: str
    statement: str
    filed_by: str
    filed_by_role: str
    filed_at: datetime
    deadline: datetime
    status: str = OPEN
    resolution_reason: str = ""
    resolved_by: str = ""
    resolved_at: datetime | None = None
    # The reviewer holding it (principal id), "" while no one does.
    assignee: str = ""
    assigned_at: datetime | None = None

    def overdue(self, now: datetime) -> bool:
        """Open at or past its deadline: the entry does not count until it is decided."""
        return self.status == OPEN and now >= self.deadline


@dataclass(frozen=True)
class RepairRecord:
    """A credit repair application (table score_repairs). `status` is pending, approved
    or rejected; `decided_*` are set once decided."""

    application_id: int
    entry_id: str
    subject_key: str
    evidence: str
    evidence_uri: str
    applied_at: datetime
    decision_due: datetime
    status: str = PENDING
    decision_reason: str = ""
    decided_by: str = ""
    decided_at: datetime | None = None

    def overdue(self, now: datetime) -> bool:
        """Pending past its decision date (computed at read, never stored)."""
        return self.status == PENDING and now > self.decision_due


# Why rules reversed an outcome: a department retracted one of its events, or a late
# event regrouped the subject's events in event time (source/event_id name that event).
RETRACTION: Final = "retraction"
REGROUPED: Final = "regrouped"


@dataclass(frozen=True)
class ReversalRecord:
    """A reversal of an outcome by a source correction or a regrouping in event time (table
    score_reversals), keyed by outcome id. It may arrive before its outcome: it then waits
    (a tombstone) and the outcome is reversed from the moment it is recorded."""

    outcome_id: str
    subject_key: str
    source: str
    event_id: str
    reason: str
    retracted_at: datetime | None
    retracted_by: str
    reversed_at: datetime
    cause: str = RETRACTION

    @property
    def event(self) -> str:
        return f"{self.source}/{self.event_id}"

    def explanation(self) -> str:
        """Why the entry no longer counts, in a sentence."""
        if self.cause == REGROUPED:
            return f"event {self.event} arrived late and changed which events form this entry"
        return f"event {self.event} retracted: {self.reason}"


def pauses_of(
    disputes: Iterable[DisputeRecord], repairs: Iterable[RepairRecord], reversals: Iterable[ReversalRecord]
) -> tuple[Pause, ...]:
    """An entry's pauses, derived from its disputes, repair applications and reversals."""
    pauses: list[Pause] = []
    for d in disputes:
        if d.resolved_at is None or d.resolved_at > d.deadline:
            pauses.append(Pause(d.deadline, d.resolved_at, False, DISPUTE, str(d.dispute_id)))
        if d.status == OVERTURNED and d.resolved_at is not None:
            pauses.append(Pause(d.resolved_at, None, True, OVERTURN, str(d.dispute_id)))
    for r in repairs:
        if r.status == APPROVED and r.decided_at is not None:
            pauses.append(Pause(r.decided_at, None, False, REPAIR, str(r.application_id)))
    for v in reversals:
        pauses.append(Pause(v.reversed_at, None, True, CORRECTION, v.event))
    return tuple(sorted(pauses, key=lambda p: (p.start, p.kind, p.ref)))


def status_of(
    disputes: Iterable[DisputeRecord], repairs: Iterable[RepairRecord], reversed_: bool
) -> EntryStatus:
    """What an entry shows: reversed > repaired > disputed (an open dispute) > active."""
    disputes = list(disputes)
    if reversed_ or any(d.status == OVERTURNED for d in disputes):
        return EntryStatus.REVERSED
    if any(r.status == APPROVED for r in repairs):
        return EntryStatus.REPAIRED
    if any(d.status == OPEN for d in disputes):
        return EntryStatus.DISPUTED
    return EntryStatus.ACTIVE


class Scorable(Protocol):
    """What the score needs of an entry."""

    @property
    def entry_id(self) -> str: ...
    @property
    def points(self) -> int: ...
    @property
    def category(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def status(self) -> EntryStatus: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def recorded_at(self) -> datetime: ...
    @property
    def black_list(self) -> bool: ...


@dataclass(frozen=True)
class ScoredEntry:
    """The part of a ledger entry the score depends on, with its pauses (`pauses_of`)."""

    entry_id: str
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    black_list: bool = False
    pauses: tuple[Pause, ...] = ()

    @property
    def void(self) -> bool:
        return any(p.void for p in self.pauses)


def visible_until(entry: Scorable, policy: SubjectPolicy) -> datetime:
    """The first instant at which `entry` no longer counts under `policy`."""
    return entry.occurred_at + policy.visibility(entry.severity)


def _pauses(entry: Scorable) -> tuple[Pause, ...] | None:
    # Scorables without pauses (the rules backtest's lines) fall back to their status.
    pauses: tuple[Pause, ...] | None = getattr(entry, "pauses", None)
    return pauses


def known_at(entry: Scorable, at: datetime, view: View = View.AS_KNOWN) -> bool:
    """Whether `entry` is part of the ledger at `at` on `view`'s timeline (whatever its
    expiry): this is what caps are computed over.

    AS_KNOWN: recorded by `at` and not voided (reversed) by `at`: a reversal frees the
    entry's share of the cap from the reversal on, never before. AS_CORRECTED: occurred by
    `at` and never voided.
    """
    pauses = _pauses(entry)
    if pauses is None:
        return entry.status in COUNTING and entry.recorded_at <= at
    if view is View.AS_CORRECTED:
        return entry.occurred_at <= at and not any(p.void for p in pauses)
    return entry.recorded_at <= at and not any(p.void and p.start <= at for p in pauses)


def counts_at(entry: Scorable, policy: SubjectPolicy, at: datetime, view: View = View.AS_KNOWN) -> bool:
    """Whether `entry` adds to the score at `at`: known (`known_at`), not expired, and in
    no pause."""
    if not (known_at(entry, at, view) and at < visible_until(entry, policy)):
        return False
    return not any(p.covers(at) for p in _pauses(entry) or ())


def _boundaries(entry: Scorable) -> Iterator[datetime]:
    for p in _pauses(entry) or ():
        yield p.start
        if p.end is not None:
            yield p.end


@dataclass(frozen=True)
class RuleRef:
    rule_id: str = ""
    rule_set: str = ""
    rule_set_version: int = 0
    title: str = ""
    description: str = ""
    legal_basis: str = ""


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: str
    subject_key: str
    subject_kind: str
    rule: RuleRef
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    visible_until: datetime
    reason: str
    black_list: bool
    snapshot: bytes


@dataclass(frozen=True)
class EntryFacts:
    """One entry with everything due process decides on: its disputes, repair
    applications and reversals (oldest first), and the sources of its evidence events."""

    entry: LedgerEntry
    disputes: tuple[DisputeRecord, ...] = ()
    repairs: tuple[RepairRecord, ...] = ()
    reversals: tuple[ReversalRecord, ...] = ()
    sources: frozenset[str] = frozenset()

    @property
    def status(self) -> EntryStatus:
        return status_of(self.disputes, self.repairs, bool(self.reversals))

    @property
    def scored(self) -> ScoredEntry:
        e = self.entry
        return ScoredEntry(
            e.entry_id,
            e.points,
            e.category,
            e.severity,
            self.status,
            e.occurred_at,
            e.recorded_at,
            e.black_list,
            pauses_of(self.disputes, self.repairs, self.reversals),
        )
