"""RulesService over gRPC: translates protobuf ⇄ domain."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any, Final

import grpc
from opentelemetry import trace

from domain.ruleset.parsing import stored_rule_set
from egret.common.v1 import due_process_pb2, event_pb2
from egret.rules.v1 import backtest_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import FailedPrecondition, InvalidArgument, Violation
from kit.logging import get_logger
from kit.principal import Role, current_principal
from kit.protoconv import SUBJECT_KIND_NAMES, to_timestamp
from kit.pseudonym import Pseudonymiser
from kit.reads import ReadLog
from kit.sharding import UNSHARDED, Shard
from services.rules import metrics
from services.rules.backtest_job import StoredJob
from services.rules.backtest_runner import MAX_PAGE_SIZE, BacktestJobs
from services.rules.backtest_servicer import BacktestHandler, backtest_scope
from services.rules.domain import EvaluationFailed, Evaluator, RetractionNotice, Retractions
from services.rules.lifecycle import RuleSetLifecycle, decode_page_token, page_size
from services.rules.lifecycle_servicer import LifecycleRpcs, actor_of
from services.rules.records import engine_event

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


_JOB_STATES: Final[dict[str, backtest_pb2.BacktestState]] = {
    "queued": backtest_pb2.BACKTEST_STATE_QUEUED,
    "running": backtest_pb2.BACKTEST_STATE_RUNNING,
    "succeeded": backtest_pb2.BACKTEST_STATE_SUCCEEDED,
    "failed": backtest_pb2.BACKTEST_STATE_FAILED,
    "cancelled": backtest_pb2.BACKTEST_STATE_CANCELLED,
}


def job_message(job: StoredJob, *, with_subjects: bool = False) -> backtest_pb2.BacktestJob:
    """The stored job; its report (when loaded) lists subjects only `with_subjects`."""
    message = backtest_pb2.BacktestJob(
        backtest_id=job.backtest_id,
        rule_set_id=job.rule_set_id,
        state=_JOB_STATES[job.state],
        progress=job.progress,
        events_replayed=job.events_replayed,
        events_total=job.events_total,
        started_at=to_timestamp(job.started_at),
        started_by=job.started_by,
        request=backtest_pb2.BacktestRuleSetRequest.FromString(job.request),
        error=job.error,
        cancelled_by=job.cancelled_by,
    )
    if job.finished_at is not None:
        message.finished_at.CopyFrom(to_timestamp(job.finished_at))
    if job.report is not None:
        message.report.ParseFromString(job.report)
        if not with_subjects:
            del message.report.subjects[:]
    return message


@contextmanager
def _fields_of(prefix: str) -> Iterator[None]:
    """Names the fields of an embedded message's violations from the request's top."""
    try:
        yield
    except InvalidArgument as error:
        raise InvalidArgument(str(error), [v.prefixed(prefix) for v in error.violations]) from error


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
        jobs: BacktestJobs | None = None,
        pseudonymiser: Pseudonymiser,
    ) -> None:
        self._jobs = jobs
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
            started = time.perf_counter()
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

    def _backtest_jobs(self) -> BacktestJobs:
        if self._jobs is None:
            raise FailedPrecondition("backtests are not configured on this instance")
        return self._jobs

    async def StartBacktest(
        self, request: backtest_pb2.StartBacktestRequest, context: Any
    ) -> backtest_pb2.StartBacktestResponse:
        jobs = self._backtest_jobs()
        with _fields_of("backtest"):
            purpose = self._reads.purpose(request.backtest)
            job = await jobs.start(request.backtest, purpose=purpose, started_by=actor_of(context))
        return backtest_pb2.StartBacktestResponse(backtest=job_message(job))

    async def GetBacktest(
        self, request: backtest_pb2.GetBacktestRequest, context: Any
    ) -> backtest_pb2.GetBacktestResponse:
        jobs = self._backtest_jobs()
        purpose = self._reads.purpose(request)
        job = await jobs.get(request.backtest_id)
        # A report's subjects are keys of the generation it was made under: after a
        # rotation of the subject key they are withheld (run the backtest again).
        listed = purpose is not None and job.subject_key_id == jobs.key_id
        message = job_message(job, with_subjects=listed)
        if purpose is not None:
            await self._reads.record(
                "GetBacktest",
                [s.subject_key for s in message.report.subjects],
                purpose,
                target=f"backtest:{job.backtest_id}",
                detail={"rule_set_id": job.rule_set_id},
            )
        return backtest_pb2.GetBacktestResponse(backtest=message)

    async def CancelBacktest(
        self, request: backtest_pb2.CancelBacktestRequest, context: Any
    ) -> backtest_pb2.CancelBacktestResponse:
        jobs = self._backtest_jobs()
        principal = current_principal()
        job = await jobs.cancel(
            request.backtest_id,
            by=actor_of(context),
            any_job=principal is not None and principal.role is Role.ADMIN,
        )
        return backtest_pb2.CancelBacktestResponse(backtest=job_message(job))

    async def ListBacktests(
        self, request: backtest_pb2.ListBacktestsRequest, context: Any
    ) -> backtest_pb2.ListBacktestsResponse:
        jobs = self._backtest_jobs()
        size = min(page_size(request.page_size), MAX_PAGE_SIZE)
        tokens = self._lifecycle.tokens
        binding = {"method": "ListBacktests", "rule_set_id": request.rule_set_id}
        page = await jobs.list(
            rule_set_id=request.rule_set_id or None,
            before=decode_page_token(tokens, request.page_token, bound_to=binding),
            size=size,
        )
        return backtest_pb2.ListBacktestsResponse(
            backtests=[job_message(job) for job in page.items],
            next_page_token=""
            if page.next_before is None
            else tokens.encode(page.next_before, bound_to=binding),
        )

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
