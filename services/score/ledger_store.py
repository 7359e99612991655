"""What the ledger asks of its store (services/score/stores): a subject's stored row with
its ledger, what a rescore decided for it, and the protocols of the unit of work and of the
store, so that `services.score.ledger` decides and the store only stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from domain.entries import LedgerEntry, ReversalRecord, ScoredEntry
from domain.history import Change
from domain.policy import ActivatedPolicy, ScorePolicy
from domain.scoring import ScoreResult, ScoreState


@dataclass(frozen=True)
class SubjectLedger:
    """A subject's stored score row and its whole ledger, or only its live part (`partial`,
    services/score/live.py).

    `stored` is None when no score row exists yet; `computed_at` is the instant the stored
    row was computed for, `recorded_through` the latest recorded_at of the ledger it was
    computed from; `grants` the entries' stored grants (None: not stored).
    """

    subject_key: str
    subject_kind: str
    stored: ScoreState | None
    computed_at: datetime | None
    stored_policy_version: str
    entries: tuple[ScoredEntry, ...]
    recorded_through: datetime | None = None
    grants: Mapping[str, int | None] = field(default_factory=dict)
    partial: bool = False

    @property
    def stored_score(self) -> int | None:
        return None if self.stored is None else self.stored.score

    @property
    def stored_tier(self) -> str | None:
        return None if self.stored is None else self.stored.tier


@dataclass(frozen=True)
class Rescored:
    """What the store writes for one subject: the new score row, its history rows, the
    visible_until of entries whose period the policy changed, the grants that changed and
    the row's `recorded_through`."""

    result: ScoreResult
    changes: tuple[Change, ...]
    visible_until: Mapping[str, datetime]
    grants: Mapping[str, int] = field(default_factory=dict)
    recorded_through: datetime | None = None


Rescore = Callable[[SubjectLedger], Rescored]


class ConcurrentWrite(Exception):
    """A concurrent writer stored one of a batch's entries first (PostgreSQL with several
    replicas); the unit of work is rolled back and the batch may be tried again."""


class Rescoring(Protocol):
    """The part of a unit of work that rescores subjects: load them locked, then store what
    the domain decided."""

    def lock(self, subject_keys: Sequence[str]) -> list[SubjectLedger]:
        """The named subjects that have a score row, in key order, each locked until commit
        and with its whole ledger (in a unit of work that added entries, also their subjects
        with no row, as first scores)."""
        ...

    def save(self, results: Mapping[str, Rescored], recorded_at: datetime | None) -> None:
        """Store each subject's new score row, categories, history rows (recorded at
        `recorded_at`, or now), changed visible_until and grants, and the new entries."""
        ...


class LedgerUnitOfWork(Rescoring, Protocol):
    """One transaction of the ledger's store, committed when its block ends."""

    def add_entries(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        """Take each entry whose id is new (reversed at once if its reversal came first) into
        the unit of work; returns the new entries. `lock_live` gives them with their
        subjects' ledgers (a subject with no score row as a first score, `stored` None) and
        `save` stores them, with the grants the rescore computed, and the first scores'
        rows, so each row is written once; it raises ConcurrentWrite when another writer
        stored one of the entries or first scores meanwhile."""
        ...

    def add_reversals(self, reversals: Sequence[ReversalRecord]) -> list[ReversalRecord]:
        """Store each reversal whose outcome id is new, with its audit record, and mark
        reversed the entries that exist; returns the new reversals of existing entries, with
        the entry's subject key. A reversal of an outcome not yet recorded waits for it."""
        ...

    def lock_live(
        self, subject_keys: Sequence[str], now: datetime, added: Mapping[str, str], policy: ScorePolicy
    ) -> list[SubjectLedger]:
        """`lock` for a batch at `now` that adds the entries `added` (id: subject key):
        each subject with only the live part of its ledger (`partial`) where
        services/score/live.py proves it enough under `policy`, else its whole ledger."""
        ...


class LedgerStore(Protocol):
    def unit_of_work(self) -> AbstractContextManager[LedgerUnitOfWork]: ...

    def due_subjects(self, now: datetime, limit: int) -> list[str]:
        """Subjects whose stored score is due to change by `now` with no new entry."""
        ...

    def subjects_not_on(self, policy_version: str, after: str, limit: int) -> list[str]:
        """Subjects (key order, after `after`) whose stored score is from another policy."""
        ...

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        """Every subject that has ledger entries, in pages ordered by subject key."""
        ...


class PolicyStore(Protocol):
    def activations(self) -> list[ActivatedPolicy]:
        """Every policy activated so far, oldest first."""
        ...

    def save_activation(self, activation: ActivatedPolicy) -> None: ...
