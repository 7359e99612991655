"""Evaluation's calls: a batch of events and retractions, and the dead letters it leaves,
run on the engine's one thread (durable-rules is not thread-safe); what the batch
committed for score wakes the outbox relay."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from opentelemetry import trace

from domain.ruleset.model import EngineEvent
from kit.db import run_blocking
from kit.logging import get_logger
from services.rules import metrics
from services.rules.domain import (
    DeadLetter,
    EvaluationFailed,
    Evaluator,
    Redrive,
    RetractionNotice,
    Retractions,
)
from services.rules.lifecycle import Actor, RuleSetLifecycle

log = get_logger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    evaluated: int
    duplicate: int
    outcomes: int
    parked: int
    retracted: int
    reversed: int


@dataclass(frozen=True)
class RedriveOutcome:
    redriven: int
    outcomes: int
    still_failing: tuple[DeadLetter, ...]


class EvaluationHandler:
    """Evaluates batches and redrives dead letters. ``committed`` is called whenever outcomes
    or reversals were committed for score; a redrive is audited through ``lifecycle``."""

    def __init__(
        self,
        evaluator: Evaluator,
        executor: Executor,
        committed: Callable[[], None],
        *,
        lifecycle: RuleSetLifecycle,
        max_batch_size: int,
    ) -> None:
        self._evaluator = evaluator
        self._executor = executor
        self._committed = committed
        self._lifecycle = lifecycle
        self._max_batch_size = max_batch_size
        self._tracer = trace.get_tracer("egret.rules")

    async def evaluate(
        self, events: Sequence[EngineEvent], records: Mapping[str, bytes], notices: Sequence[RetractionNotice]
    ) -> BatchOutcome:
        """Evaluates the events, then applies the retractions. Raises EvaluationFailed when
        some events failed: the rest is committed, and the caller retries the batch."""
        with self._tracer.start_as_current_span(
            "rules evaluate", attributes={"egret.batch.size": len(events)}
        ) as span:
            started = time.perf_counter()
            result = await run_blocking(self._executor, self._evaluator.evaluate, list(events), records)
            # After the events (a retraction follows its event), even when some events failed:
            # the retractions are applied once and the failed events are retried anyway.
            retractions = (
                await run_blocking(self._executor, self._evaluator.retract, list(notices))
                if notices
                else Retractions()
            )
            outcomes = len(result.firings) + len(retractions.firings)
            reversed_ = len(retractions.reversed) + len(result.superseded)
            metrics.batch_evaluated(
                time.perf_counter() - started, [*result.firings, *retractions.firings], len(result.parked)
            )
            span.set_attributes(
                {
                    "egret.evaluated": result.evaluated,
                    "egret.duplicate": result.duplicate,
                    "egret.outcomes": outcomes,
                    "egret.retracted": retractions.retracted,
                    "egret.reversed": reversed_,
                    "egret.parked": len(result.parked),
                    "egret.failed": len(result.failed),
                    "egret.rule_set": f"{result.rule_set}@{result.rule_set_version}",
                }
            )
            if outcomes or retractions.reversed or result.superseded:
                self._committed()
            for failure in result.parked:
                log.error(
                    "event parked as a dead letter",
                    event_key=failure.event.key,
                    attempts=failure.attempts,
                    reason=failure.reason,
                    rule_set=f"{result.rule_set}@{result.rule_set_version}",
                )
            log.info(
                "batch evaluated",
                size=len(events),
                evaluated=result.evaluated,
                duplicate=result.duplicate,
                outcomes=outcomes,
                parked=len(result.parked),
                failed=len(result.failed),
                retracted=retractions.retracted,
                reversed=reversed_,
                rule_set=f"{result.rule_set}@{result.rule_set_version}",
            )
            if result.failed:
                # The rest of the batch is committed; failing the call makes the relay
                # retry it with backoff, and the failed events count one more attempt.
                raise EvaluationFailed(result.failed, self._evaluator.dead_letter_after)
            return BatchOutcome(
                evaluated=result.evaluated,
                duplicate=result.duplicate,
                outcomes=outcomes,
                parked=len(result.parked),
                retracted=retractions.retracted,
                reversed=reversed_,
            )

    async def dead_letters(self, after: int | None, limit: int) -> list[DeadLetter]:
        """The parked dead letters after id ``after``, at most ``limit``."""
        return list(await run_blocking(None, self._evaluator.list_dead_letters, after, limit))

    async def redrive(self, ids: Sequence[int] | None, actor: Actor) -> RedriveOutcome:
        """Evaluates the parked dead letters ``ids`` again (None: every one), and audits it."""
        redriven, firings = 0, 0
        still: list[DeadLetter] = []
        if ids is None:
            # Page by id: a dead letter failing again keeps its id, so each is tried once.
            after: int | None = None
            while True:
                page = list(await run_blocking(None, self._evaluator.parked_ids, after, self._max_batch_size))
                if not page:
                    break
                after = page[-1]
                result: Redrive = await run_blocking(self._executor, self._evaluator.redrive, page)
                redriven, firings = redriven + result.redriven, firings + len(result.firings)
                still.extend(result.still_failing)
                if result.firings:
                    self._committed()
        else:
            result = await run_blocking(self._executor, self._evaluator.redrive, list(dict.fromkeys(ids)))
            redriven, firings, still = result.redriven, len(result.firings), list(result.still_failing)
            if result.firings:
                self._committed()
        metrics.redriven(redriven)
        await run_blocking(
            None,
            self._lifecycle.record_redrive,
            actor,
            {
                "requested": "all" if ids is None else list(ids),
                "redriven": redriven,
                "outcomes": firings,
                "still_failing": [d.dead_letter_id for d in still],
            },
        )
        log.info(
            "dead letters redriven",
            redriven=redriven,
            outcomes=firings,
            still_failing=len(still),
            actor=actor.name,
        )
        return RedriveOutcome(redriven, firings, tuple(still))
