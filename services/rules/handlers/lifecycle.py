"""RulesService's lifecycle and dead-letter RPCs: protobuf ⇄ services.rules.lifecycle / domain.

A mixin of RulesServicer (services/rules/servicer.py), kept apart so that evaluation,
lifecycle and backtests, which change for different reasons, live in different files.
Calls that compile a rule set or evaluate events run on the engine's one thread
(durable-rules is not thread-safe); the others only touch the database.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final

from egret.common.v1 import errors_pb2, event_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from kit.auth import acting_principal
from kit.db import run_blocking
from kit.errors import FailedPrecondition, InvalidArgument, Violation
from kit.logging import get_logger
from kit.protoconv import to_timestamp
from kit.reads import ReadLog
from services.rules import metrics
from services.rules.domain import DeadLetter, Evaluator, Redrive
from services.rules.lifecycle import (
    RecordedChange,
    RuleSetLifecycle,
    Status,
    StoredRuleSet,
    actor_name,
    decode_page_token,
    page_size,
    rule_set_violations,
)
from services.rules.ruleset import RuleSetError, stored_rule_set

log = get_logger(__name__)

# Until the security issue brings authenticated principals, the caller names itself here.
ACTOR_METADATA: Final = "x-egret-actor"

_STATUS_VALUES: Final[dict[Status, pb.RuleSetStatus]] = {
    "draft": pb.RULE_SET_STATUS_DRAFT,
    "published": pb.RULE_SET_STATUS_PUBLISHED,
    "active": pb.RULE_SET_STATUS_ACTIVE,
    "retired": pb.RULE_SET_STATUS_RETIRED,
}
_STATUS_NAMES: Final = {value: name for name, value in _STATUS_VALUES.items()}


def actor_of(context: Any) -> str:
    metadata = dict(context.invocation_metadata() or ())
    value = metadata.get(ACTOR_METADATA)
    return actor_name(acting_principal(value if isinstance(value, str) else None))


def rule_set_message(stored: StoredRuleSet, rule_ids: list[str] | None = None) -> pb.RuleSet:
    message = pb.RuleSet(
        rule_set_id=stored.rule_set_id,
        name=stored.name,
        version=stored.version,
        status=_STATUS_VALUES[stored.status],
        source=stored.source,
        source_sha256=stored.source_sha256,
        rule_ids=rule_ids or [],
        created_at=to_timestamp(stored.created_at),
        created_by=stored.created_by,
        published_by=stored.published_by or "",
        activated_by=stored.activated_by or "",
        retired_by=stored.retired_by or "",
    )
    if stored.published_at is not None:
        message.published_at.CopyFrom(to_timestamp(stored.published_at))
    if stored.activated_at is not None:
        message.activated_at.CopyFrom(to_timestamp(stored.activated_at))
    if stored.retired_at is not None:
        message.retired_at.CopyFrom(to_timestamp(stored.retired_at))
    return message


def dead_letter_message(letter: DeadLetter, *, with_event: bool) -> pb.DeadLetter:
    """The dead letter; its event (the subject data) only `with_event`, its key always."""
    source, _, event_id = letter.event.key.partition("/")
    message = pb.DeadLetter(
        dead_letter_id=letter.dead_letter_id,
        event_ref=event_pb2.EventRef(source=source, event_id=event_id),
        reason=letter.reason,
        attempts=letter.attempts,
        rule_set=letter.rule_set,
        rule_set_version=letter.rule_set_version,
        first_failed_at=to_timestamp(letter.first_failed_at),
        last_failed_at=to_timestamp(letter.last_failed_at),
    )
    if letter.parked_at is not None:
        message.parked_at.CopyFrom(to_timestamp(letter.parked_at))
    if with_event:
        message.event.CopyFrom(event_pb2.RecordedEvent.FromString(letter.record))
    return message


def change_message(recorded: RecordedChange) -> pb.RuleSetChange:
    change = recorded.change
    return pb.RuleSetChange(
        change_id=recorded.change_id,
        rule_set_id=change.rule_set_id or 0,
        action=change.action,
        actor=change.actor,
        changed_at=to_timestamp(change.at),
        detail_json=json.dumps(dict(change.detail), sort_keys=True, default=str),
    )


def _positive_id(value: int, field: str = "rule_set_id") -> int:
    if value <= 0:
        raise InvalidArgument(f"invalid {field}", [Violation(field, "is required", "REQUIRED")])
    return value


class LifecycleRpcs:
    """ValidateRuleSet … RedriveDeadLetters. The host class sets these attributes."""

    _lifecycle: RuleSetLifecycle
    _evaluator: Evaluator
    _executor: Executor
    _committed: Callable[[], None]
    _max_batch_size: int
    _reads: ReadLog

    async def _on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await run_blocking(self._executor, fn, *args)

    async def _on_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await run_blocking(None, fn, *args)

    async def ValidateRuleSet(
        self, request: pb.ValidateRuleSetRequest, context: Any
    ) -> pb.ValidateRuleSetResponse:
        try:
            rule_set = await self._on_engine(self._lifecycle.validate, request.source)
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
        actor = actor_of(context)
        stored: StoredRuleSet = await self._on_engine(self._lifecycle.create_draft, request.source, actor)
        log.info("rule set draft created", rule_set_id=stored.rule_set_id, name=stored.name, actor=actor)
        return pb.CreateDraftResponse(rule_set=rule_set_message(stored))

    async def PublishRuleSet(
        self, request: pb.PublishRuleSetRequest, context: Any
    ) -> pb.PublishRuleSetResponse:
        actor = actor_of(context)
        stored: StoredRuleSet = await self._on_db(
            self._lifecycle.publish, _positive_id(request.rule_set_id), actor
        )
        log.info("rule set published", rule_set_id=stored.rule_set_id, version=stored.version, actor=actor)
        return pb.PublishRuleSetResponse(rule_set=rule_set_message(stored))

    async def ActivateRuleSet(
        self, request: pb.ActivateRuleSetRequest, context: Any
    ) -> pb.ActivateRuleSetResponse:
        actor = actor_of(context)
        activation = await self._on_db(self._lifecycle.activate, _positive_id(request.rule_set_id), actor)
        log.info(
            "rule set activated",
            rule_set_id=activation.rule_set.rule_set_id,
            previous=activation.previous_rule_set_id,
            actor=actor,
        )
        return pb.ActivateRuleSetResponse(
            rule_set=rule_set_message(activation.rule_set),
            previous_rule_set_id=activation.previous_rule_set_id or 0,
        )

    async def RetireRuleSet(self, request: pb.RetireRuleSetRequest, context: Any) -> pb.RetireRuleSetResponse:
        actor = actor_of(context)
        stored: StoredRuleSet = await self._on_db(
            self._lifecycle.retire, _positive_id(request.rule_set_id), actor
        )
        log.info("rule set retired", rule_set_id=stored.rule_set_id, actor=actor)
        return pb.RetireRuleSetResponse(rule_set=rule_set_message(stored))

    async def ListRuleSets(self, request: pb.ListRuleSetsRequest, context: Any) -> pb.ListRuleSetsResponse:
        status = None
        if request.status != pb.RULE_SET_STATUS_UNSPECIFIED:
            if request.status not in _STATUS_NAMES:
                raise InvalidArgument(
                    "invalid status", [Violation("status", "is not a known status", "INVALID")]
                )
            status = _STATUS_NAMES[request.status]
        page = await self._on_db(
            lambda: self._lifecycle.list(
                name=request.name or None,
                status=status,
                requested_size=request.page_size,
                page_token=request.page_token,
            )
        )
        rendered = (_renderable(s) for s in page.items)
        return pb.ListRuleSetsResponse(
            rule_sets=[m for m in rendered if m is not None], next_page_token=page.next_page_token
        )

    async def GetRuleSet(self, request: pb.GetRuleSetRequest, context: Any) -> pb.GetRuleSetResponse:
        stored: StoredRuleSet = await self._on_db(self._lifecycle.get, _positive_id(request.rule_set_id))
        # The source was valid when stored; its rule ids are read back from it.
        rule_set = await self._on_db(_parse_quietly, stored.source)
        message = _renderable(stored, rule_set)
        if message is None:
            raise FailedPrecondition(
                f"rule set {stored.rule_set_id} is stored with values this service cannot show; "
                "an operator must repair or remove it (the failure was logged)"
            )
        return pb.GetRuleSetResponse(rule_set=message)

    async def ListRuleSetChanges(
        self, request: pb.ListRuleSetChangesRequest, context: Any
    ) -> pb.ListRuleSetChangesResponse:
        page = await self._on_db(
            lambda: self._lifecycle.changes(
                rule_set_id=request.rule_set_id or None,
                requested_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListRuleSetChangesResponse(
            changes=[change_message(c) for c in page.items], next_page_token=page.next_page_token
        )

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Any
    ) -> pb.ListDeadLettersResponse:
        purpose = self._reads.purpose(request)
        limit = page_size(request.page_size)
        tokens = self._lifecycle.tokens
        binding = {"method": "ListDeadLetters"}
        after = decode_page_token(tokens, request.page_token, bound_to=binding)
        letters: list[DeadLetter] = list(
            await self._on_db(self._evaluator.list_dead_letters, after, limit + 1)
        )
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
        redriven, firings = 0, 0
        still: list[DeadLetter] = []
        if request.all:
            # Page by id: a dead letter failing again keeps its id, so each is tried once.
            after: int | None = None
            while True:
                ids = list(await self._on_db(self._evaluator.parked_ids, after, self._max_batch_size))
                if not ids:
                    break
                after = ids[-1]
                result: Redrive = await self._on_engine(self._evaluator.redrive, ids)
                redriven, firings = redriven + result.redriven, firings + len(result.firings)
                still.extend(result.still_failing)
                if result.firings:
                    self._committed()
        else:
            result = await self._on_engine(
                self._evaluator.redrive, list(dict.fromkeys(request.dead_letter_ids))
            )
            redriven, firings, still = result.redriven, len(result.firings), list(result.still_failing)
            if result.firings:
                self._committed()
        metrics.redriven(redriven)
        await self._on_db(
            self._lifecycle.record_redrive,
            actor,
            {
                "requested": "all" if request.all else list(request.dead_letter_ids),
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
            actor=actor,
        )
        return pb.RedriveDeadLettersResponse(
            redriven=redriven,
            outcomes=firings,
            still_failing=[dead_letter_message(d, with_event=False) for d in still],
        )


def _renderable(stored: StoredRuleSet, rule_ids: list[str] | None = None) -> pb.RuleSet | None:
    """The message of a stored rule set, or None (with a warning) when a stored value does
    not fit it: a row written by other code or by hand must not break every listing."""
    try:
        return rule_set_message(stored, rule_ids)
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        log.warning(
            "stored rule set cannot be shown; left out",
            rule_set_id=stored.rule_set_id,
            error=f"{type(error).__name__}: {error}",
            throttle=("unrenderable rule set", stored.rule_set_id),
        )
        return None


def _parse_quietly(source: str) -> list[str]:
    try:
        return [r.id for r in stored_rule_set(source).rules]
    except RuleSetError:
        # Stored by an older format that this code no longer reads: still show the rest.
        return []
