"""Backtests (pure domain): what a candidate rule set would do to every score, before it goes live.

A backtest replays stored history (every event rules evaluated, with the time it was
evaluated) through the candidate rule set and, as the baseline, through the active
one, each on its own engine and its own in-memory state: nothing live is read during
the replay and nothing is written anywhere. Both outcome sets are scored per subject
with score's pure ``compute_score`` under the score policy, and the report compares
them: the tier migration matrix, the distribution of score changes, the rules moving
the most points, and the same per cohort (services/rules/backtest_report.py). The
engines are the caller's (``make_engine``): services.rules.engine.RuleEngine.

Why the numbers equal what activating the candidate live would produce:

- Batches. Live evaluation commits each delivered batch with one ``evaluated_at``, so
  the stored events grouped by ``evaluated_at``, in that order, are the batches exactly
  as live evaluation saw them (the final outcomes do not depend on them, but which
  outcomes were superseded on the way does). Within a batch the order is the
  one ``services.rules.batch.in_evaluation_order`` gives, the very function live
  evaluation uses: event time, then event key. Two batches committed in the same
  microsecond would be replayed as one; that is the documented tie-break of the order
  (``evaluated_at``, ``occurred_at``, key).
- History and prior outcomes. Each side keeps, per subject, the events it has replayed
  and its active window, sequence and capped outcomes, passes them to the engine as
  live evaluation passes what it stored, and drops the outcomes a batch supersedes.
- Scores. Score keeps one ledger entry per distinct outcome id and computes the score
  with ``compute_score``; the replay does the same with the same function and policy.

Scope: an event-time range keeps only events that occurred in it (so windows reaching
back before the range do not see earlier events: the report is "this history through
that rule set"), and a sample keeps a deterministic share of subjects by a hash of the
subject key. Subjects are independent of each other, so a sampled subject's numbers are
exactly its numbers in the full run.

Scoring comes from the shared domain (``domain.scoring``, ``domain.policy``): the score
function must be the one score runs, not a copy of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Final

from domain.entries import EntryStatus
from domain.policy import ScorePolicy
from domain.ruleset.model import EngineEvent, Firing, RuleSet
from domain.scoring import ScoreResult, compute_score
from services.rules.backtest_report import (
    BacktestReport,
    CohortBreakdown,
    PartialReport,
    SideScore,
    SubjectComparison,
    Tally,
    first_listed,
)
from services.rules.batch import Compiler, Engine, EvaluationContext, in_evaluation_order, lookback, run_batch
from services.rules.evaluated import Supersession, prior_outcome
from services.rules.windows import PriorOutcome

SUBJECT_KIND_DIMENSION: Final = "subject_kind"

_SAMPLE_SALT: Final = b"egret-backtest-sample/"
_HASH_SPACE: Final = 2**64


@dataclass(frozen=True)
class BacktestScope:
    """Which stored events a backtest replays.

    ``occurred_from`` is inclusive and ``occurred_to`` exclusive (None: open). A subject
    is in the sample when the first 8 bytes of SHA-256 over a fixed salt and its key,
    read as a fraction of 2**64, are below ``sample_fraction`` (1.0: every subject). The
    salt keeps the sample independent of the shard split, which hashes the bare key.
    """

    occurred_from: datetime | None = None
    occurred_to: datetime | None = None
    sample_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError("sample_fraction must lie in (0, 1]")
        if self.occurred_from and self.occurred_to and self.occurred_from >= self.occurred_to:
            raise ValueError("occurred_from must be before occurred_to")

    def includes_subject(self, subject_key: str) -> bool:
        if self.sample_fraction >= 1.0:
            return True
        digest = hashlib.sha256(_SAMPLE_SALT + subject_key.encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.sample_fraction * _HASH_SPACE

    def includes_time(self, occurred_at: datetime) -> bool:
        if self.occurred_from is not None and occurred_at < self.occurred_from:
            return False
        return self.occurred_to is None or occurred_at < self.occurred_to


@dataclass(frozen=True)
class StoredEvent:
    """An event as rules stored it: the engine's view and when live evaluation committed it."""

    evaluated_at: datetime
    event: EngineEvent


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """The ledger entry score would make of one firing: what compute_score reads, and the rule.

    ``recorded_at`` is the evaluated_at of the batch that fired it; live, score records it
    a little later, which matters only for a score asked of an instant between the two.
    Slots: a replay of a million events holds a few hundred thousand of these per side.
    """

    entry_id: str
    rule_id: str
    points: int
    category: str
    severity: str
    occurred_at: datetime
    recorded_at: datetime
    black_list: bool
    status: EntryStatus = EntryStatus.ACTIVE


class _Side:
    """One rule set replayed the way live evaluation runs it, on private in-memory state.

    The state is what the live store would hold had this rule set been active from the
    start: the events evaluated so far (only the types whose history the rule set reads)
    and, per subject, the active outcomes of its window, sequence and capped rules; an
    outcome a later batch supersedes leaves the ledger, as its reversal does live.
    """

    def __init__(self, rule_set: RuleSet, engine: Engine) -> None:
        self.rule_set = rule_set
        self._engine = engine
        self._history_types = (
            rule_set.history_event_types if lookback(rule_set) > timedelta(0) else frozenset()
        )
        self._settled = frozenset(
            rule.id
            for rule in rule_set.rules
            if rule.window is not None or rule.sequence is not None or rule.cap is not None
        )
        self._history: dict[str, list[EngineEvent]] = {}
        self._prior: dict[str, dict[str, PriorOutcome]] = {}
        # Per subject, the ledger entries of its firings (a list: a dict per subject keyed
        # by outcome id would cost far more; ids are made unique when the subject is scored).
        self.outcomes: dict[str, list[LedgerLine]] = {}
        self.failed_events = 0

    def close(self) -> None:
        self._engine.close()

    def evaluate(self, ordered: Sequence[EngineEvent], evaluated_at: datetime) -> None:
        result, failed, _records = run_batch(self.rule_set, self._engine, ordered, self._context)
        # Live evaluation parks an event that keeps failing: it is never stored as
        # evaluated, so it is in no later batch's history either.
        self.failed_events += len(failed)
        if self._history_types:
            for event in ordered:
                if event.event_type in self._history_types and event.key not in failed:
                    self._history.setdefault(event.subject_key, []).append(event)
        self._supersede(result.superseded)
        self._record(result.firings, evaluated_at)

    def _context(self, since: Mapping[str, datetime]) -> EvaluationContext:
        """What the store's context() returns, from this side's replay instead of the database."""
        history: dict[str, list[EngineEvent]] = {}
        prior: dict[str, list[PriorOutcome]] = {}
        for subject_key, low in since.items():
            history[subject_key] = [e for e in self._history.get(subject_key, ()) if e.occurred_at >= low]
            prior[subject_key] = [o for o in self._prior.get(subject_key, {}).values() if o.last_at >= low]
        return EvaluationContext(history=history, prior=prior, records={})

    def _supersede(self, superseded: Iterable[Supersession]) -> None:
        gone: dict[str, set[str]] = {}
        for s in superseded:
            del self._prior[s.outcome.subject_key][s.outcome.outcome_id]
            gone.setdefault(s.outcome.subject_key, set()).add(s.outcome.outcome_id)
        for subject_key, ids in gone.items():
            self.outcomes[subject_key] = [
                line for line in self.outcomes[subject_key] if line.entry_id not in ids
            ]

    def _record(self, firings: Iterable[Firing], evaluated_at: datetime) -> None:
        for firing in firings:
            if firing.rule_id in self._settled:
                self._prior.setdefault(firing.subject_key, {})[firing.outcome_id] = prior_outcome(firing)
            self.outcomes.setdefault(firing.subject_key, []).append(
                LedgerLine(
                    entry_id=firing.outcome_id,
                    rule_id=firing.rule_id,
                    points=firing.points,
                    category=firing.category,
                    severity=firing.severity,
                    occurred_at=firing.occurred_at,
                    recorded_at=evaluated_at,
                    black_list=firing.black_list,
                )
            )


@dataclass
class _Subject:
    kind: str
    # Per cohort attribute: (occurred_at, event key, value) of the latest event carrying it.
    cohorts: dict[str, tuple[datetime, str, str]] = field(default_factory=dict)


class Backtest:
    """Feed stored events in evaluation order (``feed``), then ``report()``.

    Not thread-safe, and the engines are durable-rules: run every call on the rules
    engine thread. ``close()`` frees both engines.
    """

    def __init__(
        self,
        *,
        baseline: RuleSet,
        candidate: RuleSet,
        policy: ScorePolicy,
        cohort_attributes: Sequence[str] = (),
        make_engine: Compiler,
    ) -> None:
        self._policy = policy
        self._cohort_attributes = tuple(dict.fromkeys(cohort_attributes))
        baseline_engine = make_engine(baseline)
        try:
            candidate_engine = make_engine(candidate)
        except BaseException:
            baseline_engine.close()
            raise
        self._baseline = _Side(baseline, baseline_engine)
        self._candidate = _Side(candidate, candidate_engine)
        self._subjects: dict[str, _Subject] = {}
        self._pending: list[EngineEvent] = []
        self._pending_at: datetime | None = None
        self._events = 0
        self._batches: set[datetime] = set()

    def feed(self, stored: Iterable[StoredEvent]) -> None:
        """Replay stored events, which must come in ``evaluated_at`` order (ties in any order)."""
        for item in stored:
            if self._pending_at is not None and item.evaluated_at != self._pending_at:
                if item.evaluated_at < self._pending_at:
                    raise ValueError("stored events must be fed in evaluated_at order")
                self._flush()
            self._pending_at = item.evaluated_at
            self._pending.append(item.event)

    def report(
        self, *, as_of: datetime, rule_limit: int | None = None, subject_limit: int | None = None
    ) -> BacktestReport:
        """Replay the last batch and compare the scores as they stand at ``as_of`` (entries
        expire by then as live ones do); ``rule_limit`` caps the rules listed per breakdown,
        ``subject_limit`` the subjects listed (None: every one).

        The report ends the backtest: each subject's entries are dropped once scored, so
        that the report does not double the replay's memory.
        """
        return combine(
            [self.partial(as_of=as_of, subject_limit=subject_limit)],
            baseline=self._baseline.rule_set,
            candidate=self._candidate.rule_set,
            policy=self._policy,
            cohort_attributes=self._cohort_attributes,
            as_of=as_of,
            rule_limit=rule_limit,
            subject_limit=subject_limit,
        )

    def partial(self, *, as_of: datetime, subject_limit: int | None = None) -> PartialReport:
        """What ``report`` builds on: the replayed subjects scored at ``as_of`` and tallied,
        listing every subject or the first ``subject_limit`` (most changed first); every
        tally still counts every subject. A worker process sends only what can be listed:
        hundreds of thousands of comparisons cost seconds to pickle and unpickle.

        Like ``report``, it ends the backtest.
        """
        self._flush()
        overall = Tally()
        cohorts: dict[tuple[str, str], Tally] = {}
        comparisons: list[SubjectComparison] = []
        # compute_score of an empty ledger depends only on the kind's policy and as_of.
        empty: dict[str, SideScore] = {}
        for subject_key, subject in self._subjects.items():
            policy = self._policy.for_kind(subject.kind)
            scores: list[SideScore] = []
            totals: list[dict[str, list[int]]] = []
            ledgers = [
                _held(side.outcomes.pop(subject_key, ())) for side in (self._baseline, self._candidate)
            ]
            if _score_alike(*ledgers):
                # Most subjects: the candidate changed nothing of theirs, scored once.
                ledgers = ledgers[:1]
            for held in ledgers:
                if not held:
                    if subject.kind not in empty:
                        empty[subject.kind] = _side_score(compute_score((), policy, as_of))
                    scores.append(empty[subject.kind])
                    totals.append({})
                else:
                    scores.append(_side_score(compute_score(held.values(), policy, as_of)))
                    totals.append(_rule_totals(held))
            if len(ledgers) == 1:
                scores.append(scores[0])
                totals.append(totals[0])
            comparison = SubjectComparison(subject_key, subject.kind, scores[0], scores[1])
            comparisons.append(comparison)
            overall.add(comparison, totals[0], totals[1])
            keys = [(SUBJECT_KIND_DIMENSION, subject.kind)]
            for attribute in self._cohort_attributes:
                value = subject.cohorts.get(attribute)
                keys.append((attribute, value[2] if value else ""))
            for key in keys:
                tally = cohorts.get(key)
                if tally is None:
                    tally = cohorts[key] = Tally()
                tally.add(comparison, totals[0], totals[1])
        self._subjects = {}
        return PartialReport(
            events=self._events,
            batches=frozenset(self._batches),
            baseline_failed_events=self._baseline.failed_events,
            candidate_failed_events=self._candidate.failed_events,
            overall=overall,
            cohorts=cohorts,
            subjects=first_listed(comparisons, subject_limit),
        )

    def close(self) -> None:
        self._baseline.close()
        self._candidate.close()

    def _flush(self) -> None:
        evaluated_at = self._pending_at
        if not self._pending or evaluated_at is None:
            return
        # The very ordering and de-duplication live evaluation applies to a batch. Stored
        # events were evaluated once each, so nothing is "done" before the batch.
        ordered = in_evaluation_order(self._pending)
        self._pending = []
        self._pending_at = None
        self._batches.add(evaluated_at)
        self._events += len(ordered)
        for event in ordered:
            self._note_subject(event)
        self._baseline.evaluate(ordered, evaluated_at)
        self._candidate.evaluate(ordered, evaluated_at)

    def _note_subject(self, event: EngineEvent) -> None:
        subject = self._subjects.get(event.subject_key)
        if subject is None:
            subject = self._subjects[event.subject_key] = _Subject(event.subject_kind)
        for attribute in self._cohort_attributes:
            value = event.attributes.get(attribute)
            if value is None:
                continue
            latest = subject.cohorts.get(attribute)
            # The cohort is the value on the subject's latest event in event time (key
            # breaks ties), so it does not depend on the order events arrived in.
            if latest is None or (event.occurred_at, event.key) > latest[:2]:
                subject.cohorts[attribute] = (event.occurred_at, event.key, str(value))


def combine(
    partials: Iterable[PartialReport],
    *,
    baseline: RuleSet,
    candidate: RuleSet,
    policy: ScorePolicy,
    cohort_attributes: Sequence[str],
    as_of: datetime,
    rule_limit: int | None = None,
    subject_limit: int | None = None,
) -> BacktestReport:
    """The report of partial reports from disjoint groups of subjects (see PartialReport),
    listing the first ``subject_limit`` subjects (None: all the partial reports hold)."""
    dimensions = (SUBJECT_KIND_DIMENSION, *dict.fromkeys(cohort_attributes))
    # Tiers in policy order (highest first), so the matrix reads top to bottom.
    tier_rank: dict[str, int] = {}
    for kind_policy in policy.kinds.values():
        for tier in kind_policy.tiers:
            tier_rank.setdefault(tier.name, len(tier_rank))
    events = baseline_failed = candidate_failed = 0
    batches: set[datetime] = set()
    overall = Tally()
    cohorts: dict[tuple[str, str], Tally] = {}
    comparisons: list[SubjectComparison] = []
    for part in partials:
        events += part.events
        batches |= part.batches
        baseline_failed += part.baseline_failed_events
        candidate_failed += part.candidate_failed_events
        overall.merge(part.overall)
        for key, tally in part.cohorts.items():
            cohorts.setdefault(key, Tally()).merge(tally)
        comparisons.extend(part.subjects)
    return BacktestReport(
        baseline=baseline,
        candidate=candidate,
        policy_version=policy.version,
        as_of=as_of,
        events_replayed=events,
        batches_replayed=len(batches),
        baseline_failed_events=baseline_failed,
        candidate_failed_events=candidate_failed,
        overall=overall.breakdown(rule_limit, tier_rank),
        cohorts=tuple(
            CohortBreakdown(dimension, value, tally.breakdown(rule_limit, tier_rank))
            for (dimension, value), tally in sorted(
                cohorts.items(), key=lambda item: (dimensions.index(item[0][0]), item[0][1])
            )
        ),
        subjects=first_listed(comparisons, subject_limit),
    )


def _held(lines: Iterable[LedgerLine]) -> dict[str, LedgerLine]:
    """A side's ledger of a subject: score inserts each outcome id once, so a repeated id
    counts once here too (its first line)."""
    return {line.entry_id: line for line in reversed(list(lines))}


# What compute_score reads of an entry besides its id, and the order it reads entries in.
_SCORED: Final = attrgetter(*(f.name for f in fields(LedgerLine) if f.name != "entry_id"))
_SCORING_ORDER: Final = attrgetter("occurred_at", "entry_id")


def _score_alike(a: Mapping[str, LedgerLine], b: Mapping[str, LedgerLine]) -> bool:
    """Whether two ledgers of one subject score alike at any instant, under any policy, so
    the report can score them once. The sides' entry ids always differ (an outcome id names
    its rule set's version); compute_score uses ids only to order entries (occurred_at, then
    id) and to key them, so the same lines in the same order give the same result."""
    if len(a) != len(b):
        return False
    return [_SCORED(line) for line in sorted(a.values(), key=_SCORING_ORDER)] == [
        _SCORED(line) for line in sorted(b.values(), key=_SCORING_ORDER)
    ]


def _rule_totals(outcomes: Mapping[str, LedgerLine]) -> dict[str, list[int]]:
    """Per rule id: [firings, points]."""
    totals: dict[str, list[int]] = {}
    for entry in outcomes.values():
        total = totals.setdefault(entry.rule_id, [0, 0])
        total[0] += 1
        total[1] += entry.points
    return totals


def _side_score(result: ScoreResult) -> SideScore:
    return SideScore(result.score, result.tier)
