"""An in-memory LedgerStore and PolicyStore with the SQL stores' contracts, for the Ledger's unit
tests; it is its own unit of work (nothing to roll back)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime

from domain.entries import LedgerEntry, ReversalRecord, ScoredEntry
from domain.history import Change
from domain.policy import ActivatedPolicy, ScorePolicy
from domain.scoring import ScoreState
from services.score.ledger_store import Rescored, SubjectLedger


@dataclass
class Row:
    kind: str
    state: ScoreState
    computed_at: datetime
    version: str
    next_change_at: datetime | None


class FakeStore:
    def __init__(self) -> None:
        self.entries: dict[str, LedgerEntry] = {}
        self.rows: dict[str, Row] = {}
        self.history: list[tuple[str, Change]] = []
        self.saved: list[ActivatedPolicy] = []
        self.record_calls = 0

    @property
    def scores(self) -> dict[str, tuple[int, str]]:
        return {k: (r.state.score, r.state.tier) for k, r in self.rows.items()}

    def _ledger(self, key: str, kind: str) -> SubjectLedger:
        row = self.rows.get(key)
        mine = [e for e in self.entries.values() if e.subject_key == key]
        return SubjectLedger(
            subject_key=key,
            subject_kind=kind,
            stored=row.state if row else None,
            computed_at=row.computed_at if row else None,
            stored_policy_version=row.version if row else "",
            entries=tuple(
                ScoredEntry(
                    e.entry_id,
                    e.points,
                    e.category,
                    e.severity,
                    e.status,
                    e.occurred_at,
                    e.recorded_at,
                    e.black_list,
                )
                for e in mine
            ),
        )

    @contextmanager
    def unit_of_work(self) -> Iterator[FakeStore]:
        yield self

    def add_entries(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        self.record_calls += 1
        fresh = [e for e in entries if e.entry_id not in self.entries]
        self.entries.update((e.entry_id, e) for e in fresh)
        return fresh

    def add_reversals(self, reversals: Sequence[ReversalRecord]) -> list[ReversalRecord]:
        raise NotImplementedError("reversals are tested through the SQL store")

    def lock(self, subject_keys: Sequence[str]) -> list[SubjectLedger]:
        known = set(self.rows) | {e.subject_key for e in self.entries.values()}
        return [self._ledger(k, self._kind(k)) for k in sorted(subject_keys) if k in known]

    def lock_live(
        self, subject_keys: Sequence[str], now: datetime, added: Mapping[str, str], policy: ScorePolicy
    ) -> list[SubjectLedger]:
        return self.lock(subject_keys)

    def save(self, results: Mapping[str, Rescored], recorded_at: datetime | None) -> None:
        for key, rescored in results.items():
            r = rescored.result
            assert r.as_of is not None
            kind = self._kind(key)
            self.rows[key] = Row(kind, r.state, r.as_of, r.policy_version, r.next_change_at)
            self.history += [(key, c) for c in rescored.changes]
            for entry_id, until in rescored.visible_until.items():
                self.entries[entry_id] = replace(self.entries[entry_id], visible_until=until)

    def _kind(self, key: str) -> str:
        row = self.rows.get(key)
        if row is not None:
            return row.kind
        return next(e.subject_kind for e in self.entries.values() if e.subject_key == key)

    def due_subjects(self, now: datetime, limit: int) -> list[str]:
        due = [k for k, r in self.rows.items() if r.next_change_at is not None and r.next_change_at <= now]
        return sorted(due)[:limit]

    def subjects_not_on(self, policy_version: str, after: str, limit: int) -> list[str]:
        return sorted(k for k, r in self.rows.items() if r.version != policy_version and k > after)[:limit]

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        kinds = {e.subject_key: e.subject_kind for e in self.entries.values()}
        keys = sorted(kinds)
        for start in range(0, len(keys), page_size):
            yield [self._ledger(k, kinds[k]) for k in keys[start : start + page_size]]

    def activations(self) -> list[ActivatedPolicy]:
        return list(self.saved)

    def save_activation(self, activation: ActivatedPolicy) -> None:
        self.saved.append(activation)
