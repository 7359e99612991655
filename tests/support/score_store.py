"""An in-memory LedgerStore with the SQL store's contract, for the Ledger's unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from services.score.domain import (
    Change,
    LedgerEntry,
    Recorded,
    Rescore,
    ReversalRecord,
    Reversed,
    ScoredEntry,
    ScoreState,
    SubjectLedger,
)
from services.score.policy import ActivatedPolicy


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

    def _rescore(self, key: str, kind: str, rescore: Rescore) -> None:
        rescored = rescore(self._ledger(key, kind))
        r = rescored.result
        assert r.as_of is not None
        self.rows[key] = Row(kind, r.state, r.as_of, r.policy_version, r.next_change_at)
        self.history += [(key, c) for c in rescored.changes]
        for entry_id, until in rescored.visible_until.items():
            self.entries[entry_id] = replace(self.entries[entry_id], visible_until=until)

    def record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        self.record_calls += 1
        fresh = [e for e in entries if e.entry_id not in self.entries]
        self.entries.update((e.entry_id, e) for e in fresh)
        subjects = {e.subject_key: e.subject_kind for e in fresh}
        for key, kind in sorted(subjects.items()):
            self._rescore(key, kind, rescore)
        return Recorded(applied=len(fresh), subjects_updated=len(subjects))

    def recompute(self, subject_keys: Sequence[str], rescore: Rescore) -> int:
        keys = [k for k in sorted(subject_keys) if k in self.rows]
        for key in keys:
            self._rescore(key, self.rows[key].kind, rescore)
        return len(keys)

    def reverse(
        self, reversals: Sequence[ReversalRecord], rescore: Callable[[Sequence[ReversalRecord]], Rescore]
    ) -> Reversed:
        raise NotImplementedError("reversals are tested through the SQL store")

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
