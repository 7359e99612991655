"""The ledger: outcomes in, entries and scores out, through a `LedgerStore`.

Each outcome of a rule firing becomes exactly one ledger entry, keyed by its outcome id,
so redelivery by the rules outbox has no effect. A subject's score is a pure function of
its ledger (domain.scoring.compute_score): the store keeps the result, with the instant
it next changes with no new event, only so that reads are cheap; `Ledger.sweep`
recomputes subjects whose entries expired or paused and `Ledger.verify` proves the
stored results still match.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from domain.entries import EntryStatus, LedgerEntry, ReversalRecord, visible_until
from domain.history import ENTRIES, EXPIRY, POLICY, Event, corrections, replay
from domain.intake import IncomingOutcome, IncomingReversal, outcome_violations, reversal_violations
from domain.policy import ActivatedPolicy, PolicyBook, ScorePolicy
from domain.scoring import BLACK, RED, compute_score, list_names
from kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Violation
from services.score.ledger_store import (
    ConcurrentWrite,
    LedgerStore,
    PolicyStore,
    Rescore,
    Rescored,
    SubjectLedger,
)
from services.score.live import grants_to_store

# Tries of a batch that meets concurrent writers (PostgreSQL with several replicas).
_RECORD_ATTEMPTS = 3


@dataclass(frozen=True)
class Rejected:
    outcome_id: str
    violations: tuple[Violation, ...]


@dataclass(frozen=True)
class ApplyResult:
    applied: int
    duplicate: int
    subjects_updated: int
    rejected: tuple[Rejected, ...] = ()
    # Entries reversed by this batch's reversals.
    reversed: int = 0


@dataclass(frozen=True)
class Reversed:
    reversed: int
    subjects_updated: int


@dataclass(frozen=True)
class Recorded:
    applied: int
    subjects_updated: int


@dataclass(frozen=True)
class Mismatch:
    subject_key: str
    stored_score: int
    recomputed_score: int
    stored_tier: str
    recomputed_tier: str
    stored_lists: tuple[str, ...] = ()
    recomputed_lists: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    subjects_checked: int
    mismatch_count: int
    mismatches: tuple[Mismatch, ...] = ()
    swept: int = 0


@dataclass(frozen=True)
class Migration:
    """How many subjects of one kind move from one tier to another under a new policy."""

    subject_kind: str
    from_tier: str
    to_tier: str
    subjects: int


@dataclass(frozen=True)
class ListMove:
    subject_kind: str
    list_name: str
    entering: int
    leaving: int


@dataclass(frozen=True)
class PolicyReport:
    """A backtest of a policy over every stored subject, as of one instant."""

    current_version: str
    proposed_version: str
    as_of: datetime
    subjects: int
    score_changed: int
    tier_changed: int
    migrations: tuple[Migration, ...]
    list_moves: tuple[ListMove, ...]


class Ledger:
    """Applies outcomes to the ledger, sweeps expiry, changes the policy, and checks stored
    scores against recomputes."""

    def __init__(
        self,
        *,
        policies: PolicyBook,
        store: LedgerStore,
        policy_store: PolicyStore,
        clock: Callable[[], datetime],
        page_size: int = 1000,
    ) -> None:
        self._book = policies
        self._store = store
        self._policy_store = policy_store
        self._clock = clock
        self._page_size = page_size

    @property
    def policy(self) -> ScorePolicy:
        return self._book.active

    @property
    def policies(self) -> PolicyBook:
        return self._book

    def _rescore(
        self,
        now: datetime,
        *,
        added: Collection[str] = (),
        cause: str = ENTRIES,
        previous: ScorePolicy | None = None,
        events: Mapping[str, Event] | None = None,
    ) -> Rescore:
        """The rescore of one subject at `now`: catch up on expiry and lapses since its
        stored row, then apply the event at `now` (new entries, `events[subject]` for a
        due-process act, or a policy change)."""
        chosen = self._book.active

        def rescore(subject: SubjectLedger) -> Rescored:
            kind_policy = chosen.for_kind(subject.subject_kind)
            mine = [e.entry_id for e in subject.entries if e.entry_id in added]
            if cause == POLICY:
                # Catch up on expiry under the old policy's stored results first; the new
                # policy then applies as one change at `now`.
                changes, result = replay(
                    subject.entries, kind_policy, before=subject.stored, since=None, until=now, cause=POLICY
                )
            else:
                changes, result = replay(
                    subject.entries,
                    kind_policy,
                    before=subject.stored,
                    since=subject.computed_at if subject.stored is not None else None,
                    until=now,
                    added=mine,
                    cause=cause,
                    event=None if events is None else events.get(subject.subject_key),
                )
            grants, through = grants_to_store(
                subject.entries,
                kind_policy,
                now,
                added=mine if subject.partial else None,
                stored=subject.grants,
                recorded_through=subject.recorded_through,
                counted={c.entry_id: c.points for c in result.counted},
            )
            periods: dict[str, datetime] = {}
            changed_periods = previous is None or dict(
                previous.for_kind(subject.subject_kind).visibility_days
            ) != dict(kind_policy.visibility_days)
            if cause == POLICY and changed_periods:
                # The stored visible_until shows the period in force; a new period rewrites it.
                periods = {e.entry_id: visible_until(e, kind_policy) for e in subject.entries}
            return Rescored(result, tuple(changes), periods, grants, through)

        return rescore

    def rescore_acts(
        self, subjects: Sequence[SubjectLedger], now: datetime, events: Mapping[str, Event]
    ) -> dict[str, Rescored]:
        """The subjects rescored for due-process acts at `now`: `events` by subject key."""
        return _each(subjects, self._rescore(now, cause=EXPIRY, events=events))

    def apply(
        self, outcomes: Sequence[IncomingOutcome], reversals: Sequence[IncomingReversal] = ()
    ) -> ApplyResult:
        """Record a batch, then its reversals; invalid ones are skipped, never block the others."""
        now = self._clock()
        rejected: list[Rejected] = []
        fresh: dict[str, LedgerEntry] = {}
        duplicate = 0
        for outcome in outcomes:
            violations = outcome_violations(outcome)
            if violations:
                rejected.append(Rejected(outcome.outcome_id, tuple(violations)))
            elif outcome.outcome_id in fresh:
                duplicate += 1
            else:
                fresh[outcome.outcome_id] = self._entry(outcome, now)
        recorded = self._record(list(fresh.values()), now) if fresh else Recorded(0, 0)
        wanted: dict[str, ReversalRecord] = {}
        for reversal in reversals:
            violations = reversal_violations(reversal)
            if violations:
                rejected.append(Rejected(reversal.outcome_id, tuple(violations)))
            else:
                wanted.setdefault(reversal.outcome_id, reversal.record(now))
        reversed_ = self._reverse(list(wanted.values()), now) if wanted else Reversed(0, 0)
        return ApplyResult(
            applied=recorded.applied,
            duplicate=duplicate + len(fresh) - recorded.applied,
            subjects_updated=recorded.subjects_updated + reversed_.subjects_updated,
            rejected=tuple(rejected),
            reversed=reversed_.reversed,
        )

    def _record(self, entries: Sequence[LedgerEntry], now: datetime) -> Recorded:
        for _ in range(_RECORD_ATTEMPTS - 1):
            try:
                return self._record_once(entries, now)
            except ConcurrentWrite:
                # A retry sees the other writer's entries as duplicates and its first
                # scores as rows to lock; another writer may meanwhile start yet another.
                continue
        return self._record_once(entries, now)

    def _record_once(self, entries: Sequence[LedgerEntry], now: datetime) -> Recorded:
        """Rescore every subject that gains a new entry and store both, in one unit of work:
        each new entry is inserted once, with its grant (never updated in the same batch)."""
        with self._store.unit_of_work() as uow:
            fresh = uow.add_entries(entries)
            if not fresh:
                return Recorded(0, 0)
            added = {e.entry_id: e.subject_key for e in fresh}
            subjects = uow.lock_live(sorted({e.subject_key for e in fresh}), now, added, self._book.active)
            uow.save(_each(subjects, self._rescore(now, added=added)), max(e.recorded_at for e in fresh))
        return Recorded(len(fresh), len(subjects))

    def _reverse(self, reversals: Sequence[ReversalRecord], now: datetime) -> Reversed:
        """Store the new reversals and rescore the subjects of the entries they reverse, with
        a correction event for each, in one unit of work."""
        with self._store.unit_of_work() as uow:
            applied = uow.add_reversals(reversals)
            if not applied:
                return Reversed(0, 0)
            subjects = uow.lock(sorted({r.subject_key for r in applied}))
            rescore = self._rescore(now, events=corrections(applied))
            uow.save(_each(subjects, rescore), max(r.reversed_at for r in applied))
        return Reversed(len(applied), len(subjects))

    def _recompute(self, keys: Sequence[str], rescore: Rescore) -> int:
        """Rescore the named subjects (those with a score row) in one unit of work."""
        with self._store.unit_of_work() as uow:
            subjects = uow.lock(keys)
            uow.save(_each(subjects, rescore), None)
        return len(subjects)

    def _entry(self, outcome: IncomingOutcome, now: datetime) -> LedgerEntry:
        assert outcome.subject_kind is not None
        assert outcome.severity is not None
        assert outcome.occurred_at is not None
        policy = self._book.active.for_kind(outcome.subject_kind)
        return LedgerEntry(
            entry_id=outcome.outcome_id,
            subject_key=outcome.subject_key,
            subject_kind=outcome.subject_kind,
            rule=outcome.rule,
            points=outcome.points,
            category=outcome.category,
            severity=outcome.severity,
            status=EntryStatus.ACTIVE,
            occurred_at=outcome.occurred_at,
            recorded_at=now,
            visible_until=outcome.occurred_at + policy.visibility(outcome.severity),
            reason=outcome.reason,
            black_list=outcome.black_list,
            snapshot=outcome.snapshot,
        )

    def sweep(self, now: datetime | None = None) -> int:
        """Recompute every subject whose entries expired by `now`, writing a history row at
        each instant its score, tier or lists changed. Returns subjects recomputed."""
        now = now or self._clock()
        total = 0
        while True:
            keys = self._store.due_subjects(now, self._page_size)
            if not keys:
                return total
            total += self._recompute(keys, self._rescore(now, cause=EXPIRY))

    def catch_up_policy(self, now: datetime | None = None, previous: ScorePolicy | None = None) -> int:
        """Recompute subjects still stored under an older policy (an activation that was
        interrupted, or a restart after one); each gets a `policy` history row."""
        now = now or self._clock()
        total = 0
        after = ""
        version = self._book.active.version
        while True:
            keys = self._store.subjects_not_on(version, after, self._page_size)
            if not keys:
                return total
            total += self._recompute(keys, self._rescore(now, cause=POLICY, previous=previous))
            after = keys[-1]

    def preview(self, proposed: ScorePolicy, now: datetime | None = None) -> PolicyReport:
        """Every stored subject scored as of `now` under the active and the proposed policy:
        the tier migration matrix and list moves, like a rules backtest. Writes nothing."""
        now = now or self._clock()
        current = self._book.active
        matrix: dict[tuple[str, str, str], int] = {}
        moves: dict[tuple[str, str], list[int]] = {}
        subjects = score_changed = tier_changed = 0
        for page in self._store.subject_pages(self._page_size):
            for subject in page:
                subjects += 1
                old = compute_score(subject.entries, current.for_kind(subject.subject_kind), now)
                new = compute_score(subject.entries, proposed.for_kind(subject.subject_kind), now)
                key = (subject.subject_kind, old.tier, new.tier)
                matrix[key] = matrix.get(key, 0) + 1
                score_changed += old.score != new.score
                tier_changed += old.tier != new.tier
                for name in (RED, BLACK):
                    was, now_on = old.on_list(name) is not None, new.on_list(name) is not None
                    if was != now_on:
                        counts = moves.setdefault((subject.subject_kind, name), [0, 0])
                        counts[0 if now_on else 1] += 1
        return PolicyReport(
            current_version=current.version,
            proposed_version=proposed.version,
            as_of=now,
            subjects=subjects,
            score_changed=score_changed,
            tier_changed=tier_changed,
            migrations=tuple(Migration(k, f, t, n) for (k, f, t), n in sorted(matrix.items())),
            list_moves=tuple(ListMove(k, name, e, lv) for (k, name), (e, lv) in sorted(moves.items())),
        )

    def activate(
        self, proposed: ScorePolicy, document: str, activated_by: str, expected_current: str = ""
    ) -> tuple[PolicyReport, int]:
        """Make `proposed` the active policy and recompute every subject under it.

        Expiry under the old policy is swept first, so history tells the two causes apart.
        The activation is recorded (who, when, the document) before the recompute, so a
        crash half way is finished by `catch_up_policy` at the next start.
        """
        if not activated_by.strip():
            raise InvalidArgument("invalid request", [Violation("activated_by", "is required", "REQUIRED")])
        if expected_current and expected_current != self._book.active.version:
            raise FailedPrecondition(
                f"the active policy is {self._book.active.version!r}, not {expected_current!r}"
            )
        if proposed.version in self._book.versions():
            raise AlreadyExists(
                f"policy version {proposed.version!r} was activated before; versions are immutable",
                reason="POLICY_VERSION_EXISTS",
            )
        now = self._clock()
        self.sweep(now)
        report = self.preview(proposed, now)
        activation = ActivatedPolicy(proposed, now, activated_by.strip(), document)
        previous = self._book.active
        self._policy_store.save_activation(activation)
        self._book = PolicyBook((*self._book.activations, activation))
        return report, self.catch_up_policy(now, previous)

    def sweep_now(self) -> tuple[datetime, int]:
        """Sweep up to the clock's now; returns that instant and the subjects recomputed."""
        now = self._clock()
        return now, self.sweep(now)

    def verify(
        self, max_mismatches: int, page_size: int = 1000, swept: tuple[datetime, int] | None = None
    ) -> VerifyResult:
        """Sweep expiry up to now (unless the caller just did: `swept`), then recompute every
        subject as of that instant (or as of its stored row, when a batch stored it after
        verify began) and report those that differ."""
        now, swept_count = swept or self.sweep_now()
        checked = 0
        mismatches: list[Mismatch] = []
        count = 0
        for page in self._store.subject_pages(page_size):
            for subject in page:
                checked += 1
                as_of = max(now, subject.computed_at or now)
                result = compute_score(subject.entries, self.policy.for_kind(subject.subject_kind), as_of)
                if subject.stored == result.state and subject.stored_policy_version == result.policy_version:
                    continue
                count += 1
                if len(mismatches) < max_mismatches:
                    mismatches.append(
                        Mismatch(
                            subject_key=subject.subject_key,
                            stored_score=subject.stored_score or 0,
                            recomputed_score=result.score,
                            stored_tier=subject.stored_tier or "",
                            recomputed_tier=result.tier,
                            stored_lists=list_names(subject.stored),
                            recomputed_lists=list_names(result.state),
                        )
                    )
        return VerifyResult(
            subjects_checked=checked, mismatch_count=count, mismatches=tuple(mismatches), swept=swept_count
        )


def _each(subjects: Sequence[SubjectLedger], rescore: Rescore) -> dict[str, Rescored]:
    return {s.subject_key: rescore(s) for s in subjects}
