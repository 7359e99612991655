"""RulesService's wire: protobuf ⇄ rules' domain for evaluation, the rule-set lifecycle,
dead letters and background backtests (BacktestRuleSet's own: services.rules.backtest_messages)."""

from __future__ import annotations

import json
from typing import Final

from egret.common.v1 import due_process_pb2, event_pb2
from egret.rules.v1 import backtest_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from kit.columns import NotHex, hex_bytes
from kit.errors import InvalidArgument, Violation
from kit.logging import get_logger
from kit.protoconv import SUBJECT_KIND_NAMES, to_timestamp
from kit.pseudonym import Pseudonymiser
from services.rules.backtest_job import StoredJob
from services.rules.domain import DeadLetter, RetractionNotice
from services.rules.lifecycle import RecordedChange, Status, StoredRuleSet

log = get_logger(__name__)

_STATUS_VALUES: Final[dict[Status, pb.RuleSetStatus]] = {
    "draft": pb.RULE_SET_STATUS_DRAFT,
    "published": pb.RULE_SET_STATUS_PUBLISHED,
    "active": pb.RULE_SET_STATUS_ACTIVE,
    "retired": pb.RULE_SET_STATUS_RETIRED,
}
_STATUS_NAMES: Final = {value: name for name, value in _STATUS_VALUES.items()}

_JOB_STATES: Final[dict[str, backtest_pb2.BacktestState]] = {
    "queued": backtest_pb2.BACKTEST_STATE_QUEUED,
    "running": backtest_pb2.BACKTEST_STATE_RUNNING,
    "succeeded": backtest_pb2.BACKTEST_STATE_SUCCEEDED,
    "failed": backtest_pb2.BACKTEST_STATE_FAILED,
    "cancelled": backtest_pb2.BACKTEST_STATE_CANCELLED,
}


def _subject_key_violations(path: str, key: str) -> list[Violation]:
    """A subject key is lowercase hex (an HMAC digest), and stored as the bytes it spells
    (kit.columns.Hex): anything else is refused here, not by the database."""
    if not key:
        return [Violation(path, "is required", "REQUIRED")]
    try:
        hex_bytes(key)
    except NotHex:
        return [Violation(path, "is not a subject key (lowercase hexadecimal)", "INVALID")]
    return []


def _event_violations(index: int, event: event_pb2.RecordedEvent) -> list[Violation]:
    path = f"events[{index}]"
    problems = []
    if not event.ref.source or not event.ref.event_id or "/" in event.ref.source:
        problems.append(Violation(f"{path}.ref", "needs a source without '/' and an event_id", "INVALID"))
    problems += _subject_key_violations(f"{path}.subject_key", event.subject_key)
    if event.subject_kind not in SUBJECT_KIND_NAMES:
        problems.append(Violation(f"{path}.subject_kind", "is required", "REQUIRED"))
    if not event.HasField("occurred_at"):
        problems.append(Violation(f"{path}.occurred_at", "is required", "REQUIRED"))
    return problems


def _retraction_violations(index: int, retraction: due_process_pb2.Retraction) -> list[Violation]:
    path = f"retractions[{index}]"
    problems = []
    if not retraction.ref.source or not retraction.ref.event_id or "/" in retraction.ref.source:
        problems.append(Violation(f"{path}.ref", "needs a source without '/' and an event_id", "INVALID"))
    problems += _subject_key_violations(f"{path}.subject_key", retraction.subject_key)
    return problems


def batch_violations(request: pb.EvaluateEventsRequest) -> list[Violation]:
    """What is malformed in the batch's events and retractions."""
    problems = [v for i, e in enumerate(request.events) for v in _event_violations(i, e)]
    return problems + [v for i, r in enumerate(request.retractions) for v in _retraction_violations(i, r)]


def retraction_notice(retraction: due_process_pb2.Retraction) -> RetractionNotice:
    return RetractionNotice(
        key=f"{retraction.ref.source}/{retraction.ref.event_id}",
        subject_key=retraction.subject_key,
        record=retraction.SerializeToString(),
    )


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


def positive_id(value: int, field: str = "rule_set_id") -> int:
    if value <= 0:
        raise InvalidArgument(f"invalid {field}", [Violation(field, "is required", "REQUIRED")])
    return value


def status_of(value: pb.RuleSetStatus) -> Status | None:
    """The status a listing filters on (None: any)."""
    if value == pb.RULE_SET_STATUS_UNSPECIFIED:
        return None
    if value not in _STATUS_NAMES:
        raise InvalidArgument("invalid status", [Violation("status", "is not a known status", "INVALID")])
    return _STATUS_NAMES[value]


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


def renderable(stored: StoredRuleSet, rule_ids: list[str] | None = None) -> pb.RuleSet | None:
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
