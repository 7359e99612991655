"""Evaluation of delivered events (pure domain): skip what was evaluated before, run the
active rule set over the rest in event time, isolate what fails, and record events,
firings and failures together.

Delivery from ingest is at least once. The inbox (events already evaluated) makes a
resent batch a no-op, and outcome ids are deterministic (rule, version, events), so
even an evaluation repeated after a crash yields the same outcomes, which score
applies once.

Event time. Windows, sequences and caps need a subject's earlier (and, for late
arrivals, later) events. They are read per batch from the inbox, from the rule set's
lookback before the batch's earliest event of each subject on, together with the
subject's active outcomes of those rules (prior outcomes); both live in the database,
so a restart loses nothing. The engine settles those rules in event time: what a late
event changes is reversed (a reversal to score) and re-formed, so the outcomes do not
depend on arrival order (docs/rules.md, "Event time").

Hot swap. At the start of every batch the evaluator compares the database's active
rule-set id with the one it holds (one primary-key read) and, if they differ, loads
and compiles the new one. A batch uses the pair it read for its whole evaluation, and
batches are serialised, so the previous engine is closed only when no batch uses it.
Every replica does the same, so all converge on the next batch after an activation.

Failures. An exception from the engine fails the events that caused it, not the
batch: the batch is split (the failing events named by RuleEvaluationError, otherwise
subject by subject) and the rest is committed. A failing event is retried with the
relay's backoff (the call fails with UNAVAILABLE after the commit); once it has failed
`dead_letter_after` times it is parked in the dead letters with its reason and the
call succeeds, so a poison event never blocks its subject or the relay.

Retractions. After a batch's events, each retraction (a department withdrew an event)
is applied once, in its own transaction: the event is marked retracted (it leaves every
later history), every outcome that used it is reversed, and the subject's window,
sequence and capped rules are settled again from the event's instant on without it,
exactly as for a late event, so what the rest of its events now form fires (a new
outcome with its own deterministic id). docs/rules.md, "Retractions and corrections".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Protocol

from domain.ruleset.model import EngineEvent, Firing, RuleSet
from domain.ruleset.parsing import rule_set_from_yaml
from kit.errors import FailedPrecondition, NotFound, Unavailable
from services.rules.batch import (
    Compiler,
    Engine,
    EvaluationContext,
    in_evaluation_order,
    lookback,
    run_batch,
    without,
)
from services.rules.evaluated import Evaluated
from services.rules.lifecycle import ActivePointer, StoredRuleSet
from services.rules.window_cache import CacheStats, WindowCache


def split_key(key: str) -> tuple[str, str]:
    source, _, event_id = key.partition("/")
    return source, event_id


@dataclass(frozen=True)
class BatchState:
    """What the store knows about a batch's events before they are evaluated."""

    evaluated: frozenset[str] = frozenset()
    parked: frozenset[str] = frozenset()
    # Failed before, not parked yet: key → failed attempts so far.
    attempts: Mapping[str, int] = field(default_factory=dict)
    # Retracted: never evaluated again, even if ingest delivers the event again.
    retracted: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Failure:
    event: EngineEvent
    reason: str
    attempts: int  # including this one
    parked: bool


@dataclass(frozen=True)
class DeadLetter:
    dead_letter_id: int
    event: EngineEvent
    record: bytes
    reason: str
    attempts: int
    rule_set: str
    rule_set_version: int
    first_failed_at: datetime
    last_failed_at: datetime
    parked_at: datetime | None


@dataclass(frozen=True)
class RetractionNotice:
    """A retraction as delivered: the event's key, its subject, and the Retraction message
    (serialized), which the reversals carry to score."""

    key: str
    subject_key: str
    record: bytes


@dataclass(frozen=True)
class ReversedOutcome:
    """An outcome that used a retracted event: reversed, its other events released."""

    outcome_id: str
    rule_id: str
    event_keys: tuple[str, ...]


@dataclass(frozen=True)
class RetractionContext:
    """What a retraction undoes: the outcomes that used the event, and the event itself
    (None if it was never evaluated), from whose instant its subject is settled again."""

    reversed: tuple[ReversedOutcome, ...]
    event: EngineEvent | None


@dataclass(frozen=True)
class Retractions:
    """What a call's retractions did."""

    retracted: int = 0
    duplicate: int = 0
    reversed: tuple[str, ...] = ()
    firings: tuple[Firing, ...] = ()


class EvaluationStore(Protocol):
    def batch_state(self, keys: Sequence[str]) -> BatchState: ...

    def context(self, since: Mapping[str, datetime], event_types: frozenset[str]) -> EvaluationContext:
        """History (events of `event_types` only) of each subject with occurred_at at or
        after its instant, and the prior outcomes that reach that far."""
        ...

    def commit_evaluation(
        self,
        events: Sequence[EngineEvent],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        failures: Sequence[Failure] = (),
        cleared: Sequence[str] = (),
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        """In one transaction: record the events as evaluated, their firings (with the
        outbox rows) and the reversal of the outcomes they superseded, record the failures
        (attempt counts, parked ones), and delete the dead-letter rows of `cleared` keys.
        False if another evaluation won a race."""
        ...

    def dead_letters(self, ids: Sequence[int]) -> Sequence[DeadLetter]:
        """The parked dead letters among `ids`."""
        ...

    def retraction_context(self, notice: RetractionNotice) -> RetractionContext | None:
        """What the retraction undoes; None if it was applied before."""
        ...

    def commit_retraction(
        self,
        notice: RetractionNotice,
        reversed_ids: Sequence[str],
        evaluated: Evaluated,
        records: Mapping[str, bytes],
        *,
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        """In one transaction: record the retraction as applied, mark the event retracted
        (and drop any dead letter of it), reverse `reversed_ids` and the outcomes the
        settling superseded (queueing a reversal each for score), and record its firings
        with their outbox rows. False if a concurrent application won."""
        ...

    def reversed_among(self, outcome_ids: Sequence[str]) -> frozenset[str]:
        """Which of these outcomes are reversed (a firing of a reversed id is stored under
        its reissued id)."""
        ...

    def parked_ids(self, after: int | None, limit: int) -> Sequence[int]: ...

    def list_dead_letters(self, after: int | None, limit: int) -> Sequence[DeadLetter]: ...


class ActiveSource(Protocol):
    """Where the evaluator learns which rule set is active (the lifecycle's store)."""

    def active(self) -> ActivePointer | None: ...

    def get(self, rule_set_id: int) -> StoredRuleSet | None: ...


@dataclass(frozen=True)
class ActiveRuleSet:
    """The rule set in force and its compiled engine, swapped as one unit."""

    rule_set_id: int
    rule_set: RuleSet
    engine: Engine
    activated_at: datetime


@dataclass(frozen=True)
class Evaluation:
    evaluated: int
    duplicate: int
    firings: tuple[Firing, ...]
    # Outcomes reversed because the batch's late events changed how events group.
    superseded: tuple[str, ...] = ()
    parked: tuple[Failure, ...] = ()
    # Failed, with attempts left: the caller must fail the call so that it is retried.
    failed: tuple[Failure, ...] = ()
    rule_set: str = ""
    rule_set_version: int = 0


@dataclass(frozen=True)
class Redrive:
    redriven: int
    firings: tuple[Firing, ...]
    still_failing: tuple[DeadLetter, ...]


class EvaluationFailed(Unavailable):
    """Some events failed and will be retried; the rest of the batch was committed."""

    def __init__(self, failed: Sequence[Failure], limit: int) -> None:
        first = failed[0]
        super().__init__(
            f"{len(failed)} event(s) failed evaluation and will be retried (parked after {limit} "
            f"attempts); first: {first.event.key} (attempt {first.attempts}): {first.reason}"
        )
        self.failed = tuple(failed)


class Evaluator:
    """Evaluates batches one at a time: durable-rules is not thread-safe.

    ``compile_rule_set`` makes the engine of each rule set that becomes active (bootstrap
    passes services.rules.engine.RuleEngine). ``window_cache`` keeps subjects' history and
    prior outcomes between batches (services/rules/window_cache.py); None reads them from
    the store for every batch.
    """

    def __init__(
        self,
        *,
        rule_sets: ActiveSource,
        store: EvaluationStore,
        clock: Callable[[], datetime],
        dead_letter_after: int,
        compile_rule_set: Compiler,
        window_cache: WindowCache | None = None,
    ) -> None:
        self._rule_sets = rule_sets
        self._cache = window_cache if window_cache is not None else WindowCache(max_subjects=0, max_bytes=0)
        self._store = store
        self._clock = clock
        self._dead_letter_after = dead_letter_after
        self._compile = compile_rule_set
        self._lock = threading.Lock()
        self._active: ActiveRuleSet | None = None

    @property
    def dead_letter_after(self) -> int:
        return self._dead_letter_after

    @property
    def active(self) -> ActiveRuleSet | None:
        """The pair the last batch used (None before the first load)."""
        return self._active

    def window_cache_stats(self) -> CacheStats:
        """What the window cache holds and how it answered (read without the lock: a snapshot
        of counters, for metrics)."""
        return self._cache.stats()

    def load_active(self) -> ActiveRuleSet:
        """Bring the active pair up to date with the database now (start-up, tests)."""
        with self._lock:
            return self._refresh()

    def close(self) -> None:
        with self._lock:
            if self._active is not None:
                self._active.engine.close()
                self._active = None
            self._cache.clear()

    def evaluate(self, events: Sequence[EngineEvent], records: Mapping[str, bytes]) -> Evaluation:
        with self._lock:
            # Read once: the whole batch runs on this pair even if an activation commits meanwhile.
            active = self._refresh()
            for _ in range(3):
                result = self._evaluate_once(active, events, records)
                if result is not None:
                    return result
            raise RuntimeError("evaluation kept losing races with a concurrent evaluator")

    def redrive(self, ids: Sequence[int]) -> Redrive:
        """Evaluate parked dead letters again with the active rule set."""
        with self._lock:
            active = self._refresh()
            for _ in range(3):
                result = self._redrive_once(active, ids)
                if result is not None:
                    return result
            raise RuntimeError("redrive kept losing races with a concurrent evaluator")

    def retract(self, notices: Sequence[RetractionNotice]) -> Retractions:
        """Apply retractions in order, each once, each in its own transaction, so that a
        later one sees what an earlier one re-formed."""
        with self._lock:
            active = self._refresh()
            retracted, duplicate = 0, 0
            reversed_ids: list[str] = []
            firings: list[Firing] = []
            for notice in notices:
                for _ in range(3):
                    applied = self._retract_once(active, notice)
                    if applied is not None:
                        break
                else:
                    raise RuntimeError("a retraction kept losing races with a concurrent evaluator")
                if applied is _ALREADY_APPLIED:
                    duplicate += 1
                    continue
                retracted += 1
                reversed_ids.extend(applied.reversed)
                firings.extend(applied.firings)
            return Retractions(retracted, duplicate, tuple(reversed_ids), tuple(firings))

    def _retract_once(self, active: ActiveRuleSet, notice: RetractionNotice) -> Retractions | None:
        context = self._store.retraction_context(notice)
        if context is None:
            return _ALREADY_APPLIED
        evaluated = Evaluated()
        records: Mapping[str, bytes] = {}
        event = context.event
        rule_set = active.rule_set
        if event is not None and lookback(rule_set) > timedelta(0):
            # Settle the subject again from the event's instant on, as if it had never come:
            # without it in the history and without the outcomes that used it.
            gone = {o.outcome_id for o in context.reversed}

            def context_of(since: Mapping[str, datetime]) -> EvaluationContext:
                stored = self._store.context(since, rule_set.history_event_types)
                return without(stored, notice.key, gone)

            evaluated, _, records = run_batch(
                rule_set, active.engine, [], context_of, since={event.subject_key: event.occurred_at}
            )
        reversed_ids = [o.outcome_id for o in context.reversed]
        try:
            applied = self._store.commit_retraction(
                notice, reversed_ids, evaluated, records, rule_set=rule_set, now=self._clock()
            )
        finally:
            # The retracted event leaves the history: the subject is read from the store again.
            self._cache.drop({notice.subject_key, *([event.subject_key] if event is not None else [])})
        if not applied:
            return None
        return Retractions(
            retracted=1,
            reversed=(*reversed_ids, *(s.outcome.outcome_id for s in evaluated.superseded)),
            firings=tuple(evaluated.firings),
        )

    def parked_ids(self, after: int | None, limit: int) -> Sequence[int]:
        return self._store.parked_ids(after, limit)

    def list_dead_letters(self, after: int | None, limit: int) -> Sequence[DeadLetter]:
        return self._store.list_dead_letters(after, limit)

    def _refresh(self) -> ActiveRuleSet:
        pointer = self._rule_sets.active()
        if pointer is None:
            raise FailedPrecondition("no rule set is active")
        current = self._active
        if current is not None and current.rule_set_id == pointer.rule_set_id:
            return current
        stored = self._rule_sets.get(pointer.rule_set_id)
        if stored is None:
            raise NotFound(f"the active rule set {pointer.rule_set_id} is missing")
        rule_set = rule_set_from_yaml(stored.source)
        fresh = ActiveRuleSet(pointer.rule_set_id, rule_set, self._compile(rule_set), pointer.activated_at)
        self._active = fresh
        # Its lookback, history types and settled rules are another's: no entry carries over.
        self._cache.clear()
        if current is not None:
            # Safe: batches hold self._lock, so none is running on the previous engine.
            current.engine.close()
        return fresh

    def _evaluate_once(
        self, active: ActiveRuleSet, events: Sequence[EngineEvent], records: Mapping[str, bytes]
    ) -> Evaluation | None:
        state = self._store.batch_state([e.key for e in events])
        # A parked event stays parked when ingest delivers it again; a redrive decides.
        ordered = in_evaluation_order(events, state.evaluated | state.parked | state.retracted)
        if not ordered:
            return Evaluation(evaluated=0, duplicate=len(events), firings=())
        result, reasons, context_records = self._run(active, ordered)
        failures = tuple(
            Failure(
                event=e,
                reason=reasons[e.key],
                attempts=state.attempts.get(e.key, 0) + 1,
                parked=state.attempts.get(e.key, 0) + 1 >= self._dead_letter_after,
            )
            for e in ordered
            if e.key in reasons
        )
        evaluated = [e for e in ordered if e.key not in reasons]
        every_record = {**context_records, **records}
        subjects = {e.subject_key for e in ordered}
        try:
            committed = self._store.commit_evaluation(
                evaluated,
                result,
                every_record,
                failures=failures,
                cleared=[e.key for e in evaluated if e.key in state.attempts],
                rule_set=active.rule_set,
                now=self._clock(),
            )
        except BaseException:
            self._cache.drop(subjects)  # committed or not, nobody knows
            raise
        if not committed:
            # Another evaluation got there first: the next attempt reads the store.
            self._cache.drop(subjects)
            return None
        try:
            confirm = self._cache.to_confirm(result)
            reissued = self._store.reversed_among(confirm) if confirm else frozenset()
            self._cache.committed(active.rule_set, evaluated, result, every_record, reissued=reissued)
        except BaseException:
            # The commit stands but the cache could not follow it: read from the store next time.
            self._cache.drop(subjects)
            raise
        return Evaluation(
            evaluated=len(evaluated),
            duplicate=len(events) - len(ordered),
            firings=tuple(result.firings),
            superseded=tuple(s.outcome.outcome_id for s in result.superseded),
            parked=tuple(f for f in failures if f.parked),
            failed=tuple(f for f in failures if not f.parked),
            rule_set=active.rule_set.name,
            rule_set_version=active.rule_set.version,
        )

    def _redrive_once(self, active: ActiveRuleSet, ids: Sequence[int]) -> Redrive | None:
        letters = {d.event.key: d for d in self._store.dead_letters(ids)}
        missing = sorted(set(ids) - {d.dead_letter_id for d in letters.values()})
        if missing:
            raise NotFound(f"no parked dead letter with id {', '.join(map(str, missing))}")
        state = self._store.batch_state(list(letters))
        # Evaluated meanwhile (e.g. redriven by another replica): only the row is left to clear.
        pending = [d.event for key, d in letters.items() if key not in state.evaluated]
        ordered = in_evaluation_order(pending)
        # Redriven events join their subjects' histories late: those are read from the store.
        self._cache.drop({e.subject_key for e in ordered})
        result, reasons, context_records = self._run(active, ordered, cached=False)
        failures = tuple(
            Failure(e, reasons[e.key], letters[e.key].attempts + 1, parked=True)
            for e in ordered
            if e.key in reasons
        )
        evaluated = [e for e in ordered if e.key not in reasons]
        now = self._clock()
        records = {**context_records, **{key: d.record for key, d in letters.items()}}
        try:
            committed = self._store.commit_evaluation(
                evaluated,
                result,
                records,
                failures=failures,
                cleared=[key for key in letters if key not in reasons],
                rule_set=active.rule_set,
                now=now,
            )
        finally:
            # The subjects of what a redrive superseded or fired, read from the store next time.
            self._cache.drop({e.subject_key for e in ordered})
        if not committed:
            return None
        still = tuple(
            DeadLetter(
                dead_letter_id=letters[f.event.key].dead_letter_id,
                event=f.event,
                record=letters[f.event.key].record,
                reason=f.reason,
                attempts=f.attempts,
                rule_set=active.rule_set.name,
                rule_set_version=active.rule_set.version,
                first_failed_at=letters[f.event.key].first_failed_at,
                last_failed_at=now,
                parked_at=letters[f.event.key].parked_at,
            )
            for f in failures
        )
        return Redrive(redriven=len(evaluated), firings=tuple(result.firings), still_failing=still)

    def _run(
        self, active: ActiveRuleSet, ordered: Sequence[EngineEvent], *, cached: bool = True
    ) -> tuple[Evaluated, dict[str, str], Mapping[str, bytes]]:
        """What the batch brings about, failure reasons per event key, and the records of
        the history used (from the window cache where it holds them when ``cached``)."""
        rule_set = active.rule_set

        def stored(since: Mapping[str, datetime]) -> EvaluationContext:
            # Only the types windows, sequences and caps read: the engine ignores the rest.
            return self._store.context(since, rule_set.history_event_types)

        def context_of(since: Mapping[str, datetime]) -> EvaluationContext:
            return self._cache.context(rule_set, since, stored) if cached else stored(since)

        return run_batch(rule_set, active.engine, ordered, context_of)


_ALREADY_APPLIED: Final = Retractions(duplicate=1)
