"""What the rules service tells Prometheus (kit.metrics): batches and their duration, firings by
rule, dead letters parked, redriven and waiting, the active rule set's version, backtests
running and their duration, and what the window cache holds and how often it answered.

Labels are the active rule set's own names (rule set, rule id): bounded by what is published.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from opentelemetry.metrics import CallbackOptions, Observation

from domain.ruleset.model import Firing
from kit.metrics import Reading, gauge, histogram, meter
from services.rules.domain import Evaluator
from services.rules.stores.evaluation import SqlEvaluationStore

_meter = meter("egret.rules")
_batches = _meter.create_counter("egret.rules.batches", unit="{batch}", description="Batches evaluated")
_batch_duration = histogram(_meter, "egret.rules.batch.duration", description="Time to evaluate one batch")
_firings = _meter.create_counter(
    "egret.rules.firings", unit="{firing}", description="Rules fired, by rule set and rule"
)
_parked = _meter.create_counter(
    "egret.rules.dead_letters.parked", unit="{event}", description="Events parked as dead letters"
)
_redriven = _meter.create_counter(
    "egret.rules.dead_letters.redriven", unit="{event}", description="Dead letters evaluated again"
)

_backtests = _meter.create_up_down_counter(
    "egret.rules.backtests.running", unit="{backtest}", description="Backtests replaying on this instance"
)
_backtest_duration = histogram(_meter, "egret.rules.backtest.duration", description="Replay time")


def batch_evaluated(duration_s: float, firings: Sequence[Firing], parked: int) -> None:
    _batches.add(1)
    _batch_duration.record(duration_s)
    for (rule_set, rule), n in Counter((f.rule_set, f.rule_id) for f in firings).items():
        _firings.add(n, {"rule_set": rule_set, "rule": rule})
    if parked:
        _parked.add(parked)


def redriven(count: int) -> None:
    _redriven.add(count)


@contextmanager
def backtest_running() -> Iterator[None]:
    """Counts a backtest as running while it replays, and its duration when it ends."""
    _backtests.add(1)
    started = time.perf_counter()
    try:
        yield
    finally:
        _backtests.add(-1)
        _backtest_duration.record(time.perf_counter() - started)


class RulesGauges:
    """The gauges read from the evaluator (the rule set in force) and from a periodic count of
    the dead letters waiting (kit.metrics.refreshing runs `refresh`)."""

    def __init__(self, evaluator: Evaluator, store: SqlEvaluationStore) -> None:
        self._evaluator = evaluator
        self._store = store
        self._waiting: int | None = None
        for counter in (_batches, _parked, _redriven, _backtests):
            counter.add(0)  # exported from the start, not from the first batch
        gauge(
            _meter, "egret.rules.active_version", self._active_version, description="Active rule set version"
        )
        gauge(
            _meter,
            "egret.rules.window_cache.subjects",
            lambda: float(self._evaluator.window_cache_stats().subjects),
            unit="{subject}",
            description="Subjects whose history the window cache holds",
        )
        gauge(
            _meter,
            "egret.rules.window_cache.memory",
            lambda: float(self._evaluator.window_cache_stats().bytes),
            unit="By",
            description="Estimated memory of the window cache (bounded by EGRET_RULES_WINDOW_CACHE_MIB)",
        )
        _meter.create_observable_counter(
            "egret.rules.window_cache.reads",
            callbacks=[self._cache_reads],
            unit="{subject}",
            description="Subjects' history asked of the window cache, by result (a miss reads the database)",
        )
        gauge(
            _meter,
            "egret.rules.dead_letters.waiting",
            lambda: self._waiting,
            unit="{event}",
            description="Parked dead letters waiting for a redrive",
        )

    def _cache_reads(self, _options: CallbackOptions) -> Iterable[Observation]:
        held = self._evaluator.window_cache_stats()
        return [Observation(held.hits, {"result": "hit"}), Observation(held.misses, {"result": "miss"})]

    def _active_version(self) -> Reading:
        active = self._evaluator.active
        if active is None:
            return None
        return {(("rule_set", active.rule_set.name),): float(active.rule_set.version)}

    def refresh(self) -> None:
        self._waiting = self._store.parked_count()
