"""RulesService over gRPC: translates protobuf ⇄ domain (services.rules.messages) and
delegates each call to its handler: evaluation and dead letters, the rule-set lifecycle,
backtests at once and in the background."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import grpc

from domain.ruleset.model import RuleSetError
from egret.common.v1 import errors_pb2
from egret.rules.v1 import backtest_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.errors import FailedPrecondition, InvalidArgument, Violation
from kit.principal import Role, acting_principal, current_principal
from kit.protoconv import to_timestamp
from kit.pseudonym import Pseudonymiser
from kit.reads import ReadLog
from kit.sharding import UNSHARDED, Shard
from services.rules.backtest_messages import backtest_scope
from services.rules.handlers.backtest_jobs import MAX_PAGE_SIZE, BacktestJobs
from services.rules.handlers.backtests import BacktestHandler
from services.rules.handlers.evaluation import EvaluationHandler
from services.rules.handlers.lifecycle import LifecycleHandler
from services.rules.lifecycle import Actor, actor_name, decode_page_token, page_size, rule_set_violations
from services.rules.messages import (
    batch_violations,
    change_message,
    dead_letter_message,
    forward_keys,
    job_message,
    positive_id,
    renderable,
    retraction_notice,
    rule_set_message,
    status_of,
)
from services.rules.records import engine_event

# Until every caller is authenticated, an unauthenticated caller names itself here.
ACTOR_METADATA: Final = "x-egret-actor"


def actor_of(context: Any) -> Actor:
    """Who the caller is: the authenticated principal, else the name it claims."""
    metadata = dict(context.invocation_metadata() or ())
    value = metadata.get(ACTOR_METADATA)
    principal = current_principal()
    return Actor(
        actor_name(acting_principal(value if isinstance(value, str) else None)),
        principal.role.value if principal is not None else None,
    )


@contextmanager
def _fields_of(prefix: str) -> Iterator[None]:
    """Names the fields of an embedded message's violations from the request's top."""
    try:
        yield
    except InvalidArgument as error:
        raise InvalidArgument(str(error), [v.prefixed(prefix) for v in error.violations]) from error


class RulesServicer(pb_grpc.RulesServiceServicer):
    def __init__(
        self,
        *,
        evaluation: EvaluationHandler,
        lifecycle: LifecycleHandler,
        reads: ReadLog,
        pseudonymiser: Pseudonymiser,
        max_batch_size: int,
        shard: Shard = UNSHARDED,
        backtests: BacktestHandler | None = None,
        jobs: BacktestJobs | None = None,
    ) -> None:
        self._evaluation = evaluation
        self._lifecycle = lifecycle
        self._reads = reads
        self._pseudonymiser = pseudonymiser
        self._max_batch_size = max_batch_size
        self._shard = shard
        self._backtests = backtests
        self._jobs = jobs

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
        problems = batch_violations(request)
        if problems:
            raise InvalidArgument("malformed recorded events", problems)
        # Evaluating another shard's subjects here would split their window state over two
        # instances; refused as a whole so the misrouting caller retries loudly, never skips.
        misrouted = self._shard.misrouted(
            [e.subject_key for e in request.events] + [r.subject_key for r in request.retractions]
        )
        if misrouted:
            raise FailedPrecondition(self._shard.refusal(misrouted))
        events = [engine_event(e) for e in request.events]
        records = {ev.key: e.SerializeToString() for ev, e in zip(events, request.events, strict=True)}
        batch = await self._evaluation.evaluate(
            events, records, [retraction_notice(r) for r in request.retractions]
        )
        return pb.EvaluateEventsResponse(
            evaluated=batch.evaluated,
            duplicate=batch.duplicate,
            outcomes=batch.outcomes,
            parked=batch.parked,
            retracted=batch.retracted,
            reversed=batch.reversed,
        )

    async def ValidateRuleSet(
        self, request: pb.ValidateRuleSetRequest, context: Any
    ) -> pb.ValidateRuleSetResponse:
        try:
            rule_set = await self._lifecycle.validate(request.source)
        except RuleSetError as error:
            return pb.ValidateRuleSetResponse(
                valid=False,
                problems=[
                    errors_pb2.FieldViolation(field=v.field, description=v.description, reason=v.reason)
                    for v in rule_set_violations(error)
                ],
            )
        return pb.ValidateRuleSetResponse(
            valid=True, name=rule_set.name, version=rule_set.version, rule_ids=[r.id for r in rule_set.rules]
        )

    async def CreateDraft(self, request: pb.CreateDraftRequest, context: Any) -> pb.CreateDraftResponse:
        stored = await self._lifecycle.create_draft(request.source, actor_of(context))
        return pb.CreateDraftResponse(rule_set=rule_set_message(stored))

    async def PublishRuleSet(
        self, request: pb.PublishRuleSetRequest, context: Any
    ) -> pb.PublishRuleSetResponse:
        actor = actor_of(context)
        stored = await self._lifecycle.publish(positive_id(request.rule_set_id), actor)
        return pb.PublishRuleSetResponse(rule_set=rule_set_message(stored))

    async def ActivateRuleSet(
        self, request: pb.ActivateRuleSetRequest, context: Any
    ) -> pb.ActivateRuleSetResponse:
        actor = actor_of(context)
        activation = await self._lifecycle.activate(positive_id(request.rule_set_id), actor)
        return pb.ActivateRuleSetResponse(
            rule_set=rule_set_message(activation.rule_set),
            previous_rule_set_id=activation.previous_rule_set_id or 0,
        )

    async def RetireRuleSet(self, request: pb.RetireRuleSetRequest, context: Any) -> pb.RetireRuleSetResponse:
        actor = actor_of(context)
        stored = await self._lifecycle.retire(positive_id(request.rule_set_id), actor)
        return pb.RetireRuleSetResponse(rule_set=rule_set_message(stored))

    async def ListRuleSets(self, request: pb.ListRuleSetsRequest, context: Any) -> pb.ListRuleSetsResponse:
        page = await self._lifecycle.rule_sets(
            name=request.name or None,
            status=status_of(request.status),
            requested_size=request.page_size,
            page_token=request.page_token,
        )
        rendered = (renderable(s) for s in page.items)
        return pb.ListRuleSetsResponse(
            rule_sets=[m for m in rendered if m is not None], next_page_token=page.next_page_token
        )

    async def GetRuleSet(self, request: pb.GetRuleSetRequest, context: Any) -> pb.GetRuleSetResponse:
        stored, rule_ids = await self._lifecycle.get(positive_id(request.rule_set_id))
        message = renderable(stored, rule_ids)
        if message is None:
            raise FailedPrecondition(
                f"rule set {stored.rule_set_id} is stored with values this service cannot show; "
                "an operator must repair or remove it (the failure was logged)"
            )
        return pb.GetRuleSetResponse(rule_set=message)

    async def ListRuleSetChanges(
        self, request: pb.ListRuleSetChangesRequest, context: Any
    ) -> pb.ListRuleSetChangesResponse:
        page = await self._lifecycle.changes(
            rule_set_id=request.rule_set_id or None,
            requested_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListRuleSetChangesResponse(
            changes=[change_message(c) for c in page.items], next_page_token=page.next_page_token
        )

    async def GetActiveRuleSet(
        self, request: pb.GetActiveRuleSetRequest, context: Any
    ) -> pb.GetActiveRuleSetResponse:
        stored, rule_set = await self._lifecycle.active()
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

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Any
    ) -> pb.ListDeadLettersResponse:
        purpose = self._reads.purpose(request)
        limit = page_size(request.page_size)
        tokens = self._lifecycle.tokens
        binding = {"method": "ListDeadLetters"}
        after = decode_page_token(tokens, request.page_token, bound_to=binding)
        letters = await self._evaluation.dead_letters(after, limit + 1)
        more = len(letters) > limit
        letters = letters[:limit]
        if purpose is not None:
            ids = [d.dead_letter_id for d in letters]
            await self._reads.record(
                "ListDeadLetters",
                [d.event.subject_key for d in letters],
                purpose,
                target="dead_letters",
                detail={"dead_letter_range": [min(ids), max(ids)]} if ids else {},
            )
        return pb.ListDeadLettersResponse(
            dead_letters=[dead_letter_message(d, with_event=purpose is not None) for d in letters],
            next_page_token=tokens.encode(letters[-1].dead_letter_id, bound_to=binding) if more else "",
        )

    async def RedriveDeadLetters(
        self, request: pb.RedriveDeadLettersRequest, context: Any
    ) -> pb.RedriveDeadLettersResponse:
        actor = actor_of(context)
        if request.all == bool(request.dead_letter_ids):
            raise InvalidArgument(
                "name the dead letters or ask for all",
                [Violation("dead_letter_ids", "give either dead_letter_ids or all, not both", "INVALID")],
            )
        if len(request.dead_letter_ids) > self._max_batch_size:
            raise InvalidArgument(
                "too many dead letters",
                [Violation("dead_letter_ids", f"at most {self._max_batch_size} per call", "BATCH_TOO_LARGE")],
            )
        redrive = await self._evaluation.redrive(
            None if request.all else list(request.dead_letter_ids), actor
        )
        return pb.RedriveDeadLettersResponse(
            redriven=redrive.redriven,
            outcomes=redrive.outcomes,
            still_failing=[dead_letter_message(d, with_event=False) for d in redrive.still_failing],
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
            job = await jobs.start(request.backtest, purpose=purpose, started_by=actor_of(context).name)
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
        actor = actor_of(context)
        job = await jobs.cancel(request.backtest_id, by=actor, any_job=actor.role == Role.ADMIN.value)
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


def register(servicer: RulesServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_RulesServiceServicer_to_server(servicer, server)
