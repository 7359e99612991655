"""RulesService over gRPC: translates protobuf ⇄ domain."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import grpc
from opentelemetry import trace

from egret.common.v1 import event_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import InvalidArgument, Violation
from kit.logging import get_logger
from kit.protoconv import SUBJECT_KIND_NAMES, attributes_dict, to_datetime, to_timestamp
from services.rules.domain import Evaluator
from services.rules.ruleset import EngineEvent

log = get_logger(__name__)


def engine_event(event: event_pb2.RecordedEvent) -> EngineEvent:
    return EngineEvent(
        key=f"{event.ref.source}/{event.ref.event_id}",
        subject_key=event.subject_key,
        subject_kind=SUBJECT_KIND_NAMES[event.subject_kind],
        event_type=event.event_type,
        occurred_at=to_datetime(event.occurred_at),
        attributes=attributes_dict(event.attributes),
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


class RulesServicer(pb_grpc.RulesServiceServicer):
    def __init__(
        self, evaluator: Evaluator, executor: Executor, committed: Callable[[], None], max_batch_size: int
    ) -> None:
        self._evaluator = evaluator
        self._executor = executor
        self._committed = committed
        self._max_batch_size = max_batch_size
        self._tracer = trace.get_tracer("egret.rules")

    async def EvaluateEvents(
        self, request: pb.EvaluateEventsRequest, context: Any
    ) -> pb.EvaluateEventsResponse:
        if len(request.events) > self._max_batch_size:
            raise InvalidArgument(
                "batch too large",
                [Violation("events", f"at most {self._max_batch_size} events per call", "BATCH_TOO_LARGE")],
            )
        # Ingest validated these events; a malformed one here is a contract breach by
        # the caller, reported for the whole call so that it is fixed, not skipped.
        problems = [v for i, e in enumerate(request.events) for v in _violations(i, e)]
        if problems:
            raise InvalidArgument("malformed recorded events", problems)
        with self._tracer.start_as_current_span(
            "rules evaluate", attributes={"egret.batch.size": len(request.events)}
        ) as span:
            events = [engine_event(e) for e in request.events]
            records = {ev.key: e.SerializeToString() for ev, e in zip(events, request.events, strict=True)}
            result = await run_blocking(self._executor, self._evaluator.evaluate, events, records)
            span.set_attributes(
                {
                    "egret.evaluated": result.evaluated,
                    "egret.duplicate": result.duplicate,
                    "egret.outcomes": len(result.firings),
                }
            )
            if result.firings:
                self._committed()
            log.info(
                "batch evaluated",
                size=len(events),
                evaluated=result.evaluated,
                duplicate=result.duplicate,
                outcomes=len(result.firings),
            )
            return pb.EvaluateEventsResponse(
                evaluated=result.evaluated, duplicate=result.duplicate, outcomes=len(result.firings)
            )

    async def GetActiveRuleSet(
        self, request: pb.GetActiveRuleSetRequest, context: Any
    ) -> pb.GetActiveRuleSetResponse:
        active = self._evaluator.active
        return pb.GetActiveRuleSetResponse(
            rule_set=pb.RuleSetSummary(
                name=active.rule_set.name,
                version=active.rule_set.version,
                rule_ids=[r.id for r in active.rule_set.rules],
                activated_at=to_timestamp(active.activated_at),
                source_sha256=active.rule_set.source_sha256,
            )
        )


def register(servicer: RulesServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_RulesServiceServicer_to_server(servicer, server)
