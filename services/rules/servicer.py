"""RulesService over gRPC: translates protobuf ⇄ domain."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import grpc
from opentelemetry import trace

from egret.common.v1 import due_process_pb2, event_pb2
from egret.rules.v1 import backtest_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import FailedPrecondition, InvalidArgument, Violation
from kit.logging import get_logger
from kit.protoconv import SUBJECT_KIND_NAMES, to_datetime, to_timestamp
from kit.pseudonym import Pseudonymiser
from kit.reads import ReadLog
from kit.sharding import UNSHARDED, Shard
from services.rules.backtest_servicer import BacktestHandler
from services.rules.domain import EvaluationFailed, Evaluator, RetractionNotice, Retractions
from services.rules.lifecycle import RuleSetLifecycle
from services.rules.lifecycle_servicer import LifecycleRpcs
from services.rules.records import engine_event
from services.rules.ruleset import stored_rule_set

log = get_logger(__name__)


def _retraction_violations(index: int, retraction: due_process_pb2.Retraction) -> list[Violation]:
    path = f"retractions[{index}]"
    problems = []
    if not retraction.ref.source or not retraction.ref.event_id or "/" in retraction.ref.source:
        problems.append(Violation(f"{path}.ref", "needs a source without '/' and an event_id", "INVALID"))
    if not retraction.subject_key:
        problems.append(Violation(f"{path}.subject_key", "is required", "REQUIRED"))
    return problems


def retraction_notice(retraction: due_process_pb2.Retraction) -> RetractionNotice:
    return RetractionNotice(
        key=f"{retraction.ref.source}/{retraction.ref.event_id}",
        subject_key=retraction.subject_key,
        record=retraction.SerializeToString(),
    )


def _violations(index: int, event: event_pb2.RecordedEvent) -> list[Violation]:
    path = f"events[{index}]"
    problems = []
    if not event.ref.source or not event.ref.event_id or "/" in event.ref.source:
        problems.append(Violation(f"{path}.ref", "needs a source without '/' and an event_id", "INVALID"))
    if not event.subject_key:
        problems.append(Violation(f"{path}.subject_key", "is required", "REQUIRED"))
    if event.subject_kind not in SUBJECT_KIND_NAMES:
        problems.append(Violation(f"{path}.subject_kind", "is required", "REQUIRED"))
    if not event.HasField("occurred_at"):
        problems.append(Violation(f"{path}.occurred_at", "is required", "REQUIRED"))
    return problems


def forward_keys(request: pb.EvaluateEventsRequest, pseudonymiser: Pseudonymiser) -> None:
    """Moves every subject key of the request to the current generation, in place, so that
    rules evaluates, shards and stores current keys only (docs/security.md, "Rotating the
    subject key"): a sender's outbox may hold keys of the generation before. Raises
    UnknownKeyGeneration (UNAVAILABLE: the relay retries) for a generation not configured
    here yet. An empty key is left for the contract check to refuse."""
    current = pseudonymiser.current_key_id
    moved: dict[tuple[str, str], str] = {}
    messages: list[event_pb2.RecordedEvent | due_process_pb2.Retraction] = [
        *request.events,
        *request.retractions,
    ]
    for message in messages:
        if not message.subject_key:
            continue
        if message.subject_key_id not in ("", current):
            known = (message.subject_key, message.subject_key_id)
            if known not in moved:
                moved[known] = pseudonymiser.forward(*known)
            message.subject_key = moved[known]
        message.subject_key_id = current


def backtest_scope(
    request: backtest_pb2.BacktestRuleSetRequest, response: backtest_pb2.BacktestRuleSetResponse
) -> dict[str, object]:
    """What a backtest's read record keeps of the request: its scope and the instant
    scored (rerun over the same history, it lists the same subjects: the digest checks)."""
    scope: dict[str, object] = {
        "as_of": to_datetime(response.as_of).isoformat(),
        "sample_fraction": request.sample_fraction,
        "subject_limit": request.subject_limit,
    }
    for field in ("occurred_from", "occurred_to"):
        if request.HasField(field):
            scope[field] = to_datetime(getattr(request, field)).isoformat()
    return scope


class RulesServicer(LifecycleRpcs, pb_grpc.RulesServiceServicer):
    def __init__(
        self,
        evaluator: Evaluator,
        executor: Executor,
        committed: Callable[[], None],
        max_batch_size: int,
        shard: Shard = UNSHARDED,
        *,
        lifecycle: RuleSetLifecycle,
        reads: ReadLog,
        backtests: BacktestHandler | None = None,
        pseudonymiser: Pseudonymiser,
    ) -> None:
        self._pseudonymiser = pseudonymiser
        self._lifecycle = lifecycle
        self._reads = reads
        self._backtests = backtests
        self._evaluator = evaluator
        self._executor = executor
        self._committed = committed
        self._max_batch_size = max_batch_size
        self._shard = shard
        self._tracer = trace.get_tracer("egret.rules")

    async def EvaluateEvents(
        self, request: pb.EvaluateEventsRequest, context: Any
    ) -> pb.EvaluateEventsResponse:
        if len(request.events) + len(request.retractions) > self._max_batch_size:
            raise InvalidArgument(
                "batch too large",
                [
                    Violation(
                        "events",
                        f"at most {self._max_batch_size} events and retractions per call",
                        "BATCH_TOO_LARGE",
                    )
                ],
            )
        forward_keys(request, self._pseudonymiser)
        # Ingest validated these events; a malformed one here is a contract breach by
        # the caller, reported for the whole call so that it is fixed, not skipped.
        problems = [v for i, e in enumerate(request.events) for v in _violations(i, e)]
        problems += [v for i, r in enumerate(request.retractions) for v in _retraction_violations(i, r)]
        if problems:
            raise InvalidArgument("malformed recorded events", problems)
        # Evaluating another shard's subjects here would split their window state over two
        # instances; refused as a whole so the misrouting caller retries loudly, never skips.
        misrouted = self._shard.misrouted(
            [e.subject_key for e in request.events] + [r.subject_key for r in request.retractions]
        )
        if misrouted:
            raise FailedPrecondition(self._shard.refusal(misrouted))
        with self._tracer.start_as_current_span(
            "rules evaluate", attributes={"egret.batch.size": len(request.events)}
        ) as span:
            events = [engine_event(e) for e in request.events]
            records = {ev.key: e.SerializeToString() for ev, e in zip(events, request.events, strict=True)}
            result = await run_blocking(self._executor, self._evaluator.evaluate, events, records)
            # After the events (a retraction follows its event), even when some events failed:
            # the retractions are applied once and the failed events are retried anyway.
            retractions = (
                await run_blocking(
                    self._executor,
                    self._evaluator.retract,
                    [retraction_notice(r) for r in request.retractions],
                )
                if request.retractions
                else Retractions()
            )
            outcomes = len(result.firings) + len(retractions.firings)
            reversed_ = len(retractions.reversed) + len(result.superseded)
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
            return pb.EvaluateEventsResponse(
                evaluated=result.evaluated,
                duplicate=result.duplicate,
                outcomes=outcomes,
                parked=len(result.parked),
                retracted=retractions.retracted,
                reversed=reversed_,
            )

    async def BacktestRuleSet(
        self, request: backtest_pb2.BacktestRuleSetRequest, context: Any
    ) -> backtest_pb2.BacktestRuleSetResponse:
        if self._backtests is None:
            raise FailedPrecondition("backtests are not configured on this instance")
        # Checked before the replay: a refused purpose costs nothing.
        purpose = self._reads.purpose(request)
        response = await self._backtests.backtest(request, list_subjects=purpose is not None)
        if purpose is not None:
            await self._reads.record(
                "BacktestRuleSet",
                [s.subject_key for s in response.subjects],
                purpose,
                target=f"rule_set:{request.rule_set_id}",
                detail=backtest_scope(request, response),
            )
        return response

    async def GetActiveRuleSet(
        self, request: pb.GetActiveRuleSetRequest, context: Any
    ) -> pb.GetActiveRuleSetResponse:
        # The database's answer, which every replica converges on at its next batch.
        stored = await run_blocking(None, self._lifecycle.active)
        rule_set = stored_rule_set(stored.source)
        return pb.GetActiveRuleSetResponse(
            rule_set=pb.RuleSetSummary(
                name=rule_set.name,
                version=rule_set.version,
                rule_ids=[r.id for r in rule_set.rules],
                activated_at=to_timestamp(stored.activated_at or stored.created_at),
                source_sha256=rule_set.source_sha256,
                rule_set_id=stored.rule_set_id,
            ),
            source=stored.source,
        )


def register(servicer: RulesServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_RulesServiceServicer_to_server(servicer, server)
