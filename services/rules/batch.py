"""One batch through a compiled rule set, the way live evaluation and backtests both run it.

A batch is put in evaluation order (event time, then key), its subjects' history and
prior outcomes are read from the rule set's lookback before each subject's instant,
and the events that make evaluation fail are set aside so that the rest is evaluated.
Live evaluation (services/rules/domain.py) reads that context from its store; a
backtest (services/rules/backtest.py) from its own replay. The compiled rule set is a
collaborator (``Engine``): bootstrap and a backtest's caller pass
services.rules.engine.RuleEngine in as the ``Compiler``.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Protocol, TypeAlias

from domain.ruleset.model import EngineEvent, RuleSet
from services.rules.evaluated import Evaluated, RuleEvaluationError
from services.rules.windows import PriorOutcome

# Reasons are shown to operators and stored; a pathological message is cut.
MAX_REASON_LENGTH: Final = 2000


class Engine(Protocol):
    """A rule set compiled for evaluation (services.rules.engine.RuleEngine in the service).

    evaluate() raises RuleEvaluationError naming the events it cannot evaluate, or any
    other exception when it fails as a whole; see RuleEngine.evaluate for the semantics.
    """

    def evaluate(
        self,
        events: Sequence[EngineEvent],
        history: Mapping[str, Sequence[EngineEvent]] = ...,
        prior: Mapping[str, Sequence[PriorOutcome]] = ...,
        since: Mapping[str, datetime] = ...,
    ) -> Evaluated: ...

    def close(self) -> None: ...


# Compiles a rule set; raises RuleSetError if the engine refuses it.
Compiler: TypeAlias = Callable[[RuleSet], Engine]


def lookback(rule_set: RuleSet) -> timedelta:
    """How far around an event its windows and sequences reach (0: per-event rules only)."""
    return rule_set.lookback


@dataclass(frozen=True)
class EvaluationContext:
    """A batch's subjects' history from the lookback on, and their prior outcomes."""

    history: Mapping[str, Sequence[EngineEvent]]
    # Per subject: the active outcomes of window, sequence and capped rules.
    prior: Mapping[str, Sequence[PriorOutcome]]
    # The stored records of the history events: a window's outcome quotes them as evidence.
    records: Mapping[str, bytes]


def history_order(event: EngineEvent) -> tuple[datetime, str, str]:
    """The order of a subject's history: event time, then source and event id compared as
    Python compares strings (by code point), so the store, whatever its collation, and the
    window cache give the engine the same order."""
    source, _, event_id = event.key.partition("/")
    return event.occurred_at, source, event_id


Run = Callable[[Sequence[EngineEvent]], Evaluated]


def isolate(run: Run, events: Sequence[EngineEvent]) -> tuple[Evaluated, dict[str, str]]:
    """Evaluate `events`, setting aside the ones that make evaluation fail.

    RuleEvaluationError names its events, which are removed before evaluating the rest
    again. Any other exception is narrowed subject by subject; a subject that still
    fails on its own fails with all its events (the engine gives no finer cause).
    Returns what the rest brings about and a reason per failed event key.
    """
    failures: dict[str, str] = {}
    remaining = list(events)
    while remaining:
        try:
            return run(remaining), failures
        except RuleEvaluationError as error:
            present = {e.key for e in remaining}
            named = [f for f in error.failures if f.event_key in present]
            if named:
                for failure in named:
                    reason = f"[{failure.rule_id}] {failure.message}" if failure.rule_id else failure.message
                    failures.setdefault(failure.event_key, _cut(reason))
                keys = {f.event_key for f in named}
                remaining = [e for e in remaining if e.key not in keys]
                continue
            cause: Exception = error
        except Exception as error:  # the engine's failure becomes these events' failure
            cause = error
        subjects = _by_subject(remaining)
        if len(subjects) == 1:
            reason = _cut(f"{type(cause).__name__}: {cause}")
            failures.update(dict.fromkeys((e.key for e in remaining), reason))
            return Evaluated(), failures
        merged = Evaluated()
        for subject_events in subjects.values():
            subject_result, subject_failures = isolate(run, subject_events)
            merged.firings.extend(subject_result.firings)
            merged.superseded.extend(subject_result.superseded)
            failures.update(subject_failures)
        return merged, failures
    return Evaluated(), failures


ContextSource = Callable[[Mapping[str, datetime]], EvaluationContext]


def run_batch(
    rule_set: RuleSet,
    engine: Engine,
    ordered: Sequence[EngineEvent],
    context_of: ContextSource,
    *,
    since: Mapping[str, datetime] | None = None,
) -> tuple[Evaluated, dict[str, str], Mapping[str, bytes]]:
    """Evaluate a batch (already in evaluation order) with the history and prior outcomes
    `context_of` gives for each subject's instant (its earliest event, or `since` when a
    subject is to be settled from an earlier instant or without new events); failing
    events are set aside (`isolate`).

    Returns what the batch brings about, a failure reason per event key, and the records
    of the history used. Live evaluation reads the context from the store; a backtest
    (services/rules/backtest.py) from its own replay, through this same function.
    """
    if not ordered and not since:
        return Evaluated(), {}, {}
    reach = lookback(rule_set)
    if reach <= timedelta(0):
        # Per-event rules only: no history to read, two queries saved per batch.
        result, reasons = isolate(engine.evaluate, ordered)
        return result, reasons, {}
    instants = _instants(ordered, since or {})
    context = context_of({subject: at - reach for subject, at in instants.items()})

    def run(events: Sequence[EngineEvent]) -> Evaluated:
        return engine.evaluate(events, history=context.history, prior=context.prior, since=since or {})

    if not ordered:
        return run([]), {}, context.records
    result, reasons = isolate(run, ordered)
    return result, reasons, context.records


def in_evaluation_order(
    events: Iterable[EngineEvent], done: Container[str] = frozenset()
) -> list[EngineEvent]:
    """A batch as it is evaluated: without events in `done` or repeated keys, in event-time
    order (then key), so that windows and sequences see a subject's events as they happened.

    Backtests replay stored batches through this very function (services/rules/backtest.py).
    """
    fresh: dict[str, EngineEvent] = {}
    for event in events:
        if event.key not in done and event.key not in fresh:
            fresh[event.key] = event
    return sorted(fresh.values(), key=lambda e: (e.occurred_at, e.key))


def without(context: EvaluationContext, retracted: str, reversed_ids: Container[str]) -> EvaluationContext:
    """The context a retraction settles its subject with: the history without the retracted
    event, the prior outcomes without the ones it reverses."""
    return EvaluationContext(
        history={
            subject: [e for e in events if e.key != retracted] for subject, events in context.history.items()
        },
        prior={
            subject: [o for o in outcomes if o.outcome_id not in reversed_ids]
            for subject, outcomes in context.prior.items()
        },
        records=context.records,
    )


def _instants(events: Sequence[EngineEvent], since: Mapping[str, datetime]) -> dict[str, datetime]:
    """Per subject: its earliest new event's occurred_at, or `since` if earlier."""
    earliest = dict(since)
    for event in events:
        at = earliest.get(event.subject_key)
        if at is None or event.occurred_at < at:
            earliest[event.subject_key] = event.occurred_at
    return earliest


def _by_subject(events: Sequence[EngineEvent]) -> dict[str, list[EngineEvent]]:
    grouped: dict[str, list[EngineEvent]] = {}
    for event in events:
        grouped.setdefault(event.subject_key, []).append(event)
    return grouped


def _cut(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_LENGTH else reason[: MAX_REASON_LENGTH - 1] + "…"
