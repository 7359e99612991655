"""Evaluation of delivered events (pure domain): skip what was evaluated before, run the
active rule set over the rest, and record events and firings together.

Delivery from ingest is at least once. The inbox (events already evaluated) makes a
resent batch a no-op, and outcome ids are deterministic (rule, version, events), so
even an evaluation repeated after a crash yields the same outcomes, which score
applies once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.rules.engine import RuleEngine
from services.rules.ruleset import EngineEvent, Firing, RuleSet


def split_key(key: str) -> tuple[str, str]:
    source, _, event_id = key.partition("/")
    return source, event_id


class EvaluationStore(Protocol):
    def already_evaluated(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]: ...

    def commit_evaluation(
        self,
        events: Sequence[EngineEvent],
        firings: Sequence[Firing],
        records: Mapping[str, bytes],
        *,
        rule_set: RuleSet,
        now: datetime,
    ) -> bool:
        """Record events and firings in one transaction; False if another evaluation won a race."""
        ...


@dataclass(frozen=True)
class Evaluation:
    evaluated: int
    duplicate: int
    firings: tuple[Firing, ...]


class ActiveRuleSet:
    """The rule set in force and its compiled engine, swapped as one unit."""

    def __init__(self, rule_set: RuleSet, activated_at: datetime) -> None:
        self.rule_set = rule_set
        self.engine = RuleEngine(rule_set)
        self.activated_at = activated_at


class Evaluator:
    """Evaluates batches one at a time: durable-rules is not thread-safe."""

    def __init__(
        self, *, active: ActiveRuleSet, store: EvaluationStore, clock: Callable[[], datetime]
    ) -> None:
        self._active = active
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def active(self) -> ActiveRuleSet:
        return self._active

    def evaluate(self, events: Sequence[EngineEvent], records: Mapping[str, bytes]) -> Evaluation:
        with self._lock:
            for _ in range(3):
                result = self._evaluate_once(events, records)
                if result is not None:
                    return result
            raise RuntimeError("evaluation kept losing races with a concurrent evaluator")

    def _evaluate_once(
        self, events: Sequence[EngineEvent], records: Mapping[str, bytes]
    ) -> Evaluation | None:
        done = self._store.already_evaluated([split_key(e.key) for e in events])
        fresh: dict[str, EngineEvent] = {}
        for event in events:
            if split_key(event.key) not in done and event.key not in fresh:
                fresh[event.key] = event
        if not fresh:
            return Evaluation(evaluated=0, duplicate=len(events), firings=())
        # Evaluate in event time order, so that later rule forms (windows, sequences)
        # see a subject's events as they happened.
        ordered = sorted(fresh.values(), key=lambda e: (e.occurred_at, e.key))
        active = self._active
        firings = active.engine.evaluate(ordered)
        if not self._store.commit_evaluation(
            ordered, firings, records, rule_set=active.rule_set, now=self._clock()
        ):
            return None
        return Evaluation(
            evaluated=len(ordered), duplicate=len(events) - len(ordered), firings=tuple(firings)
        )
