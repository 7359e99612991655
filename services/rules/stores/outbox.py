"""What rules queues for score: one ApplyOutcomesRequest per outbox row, holding one
outcome or one reversal; the relay merges a claim's rows into one request.

A reversal's row holds its serialized request. An outcome's row refers to its
rules_outcomes row instead (migration 0011): the outcome is serialized once, stored once,
and the relay reads it from there in its claim's transaction (`stored_payloads`), so what
score receives is exactly what rules recorded. Rows written before 0011 keep a payload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.ruleset.model import Firing
from egret.common.v1 import due_process_pb2, event_pb2, outcome_pb2
from egret.score.v1 import score_service_pb2 as score_pb
from kit.protoconv import SEVERITY_VALUES, SUBJECT_KIND_VALUES, to_timestamp
from services.rules.domain import split_key
from services.rules.stores.schema import EmittedOutcome, Outbox, table_of

# ApplyOutcomesRequest.outcomes is field 1, length-delimited: its tag byte.
_OUTCOMES_TAG: Final = b"\x0a"


def outcome_request(outcome: bytes) -> bytes:
    """ApplyOutcomesRequest(outcomes=[outcome]) serialized, from the outcome's stored bytes
    without parsing them again: the field's tag, the length as a varint, the bytes."""
    length, prefix = len(outcome), bytearray(_OUTCOMES_TAG)
    while length > 0x7F:
        prefix.append((length & 0x7F) | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + outcome


def stored_payloads(session: Session, ids: Sequence[int]) -> dict[int, bytes]:
    """The requests of outbox rows `ids` that refer to an outcome (kit.outbox.PayloadsOf)."""
    outbox, outcomes = table_of(Outbox), table_of(EmittedOutcome)
    rows = session.execute(
        sa.select(outbox.c.id, outcomes.c.outcome)
        .join(outcomes, outcomes.c.outcome_id == outbox.c.outcome_id)
        .where(outbox.c.id.in_(list(ids)))
    )
    return {row_id: outcome_request(bytes(outcome)) for row_id, outcome in rows}


def reversal_payload(outcome_id: str, retraction: due_process_pb2.Retraction, key_id: str) -> bytes:
    """The reversal of an outcome by a retraction, whose key the servicer moved to `key_id`."""
    reversal = score_pb.Reversal(
        outcome_id=outcome_id,
        retraction=retraction,
        cause=score_pb.REVERSAL_CAUSE_RETRACTION,
        subject_key=retraction.subject_key,
        subject_key_id=key_id,
    )
    return score_pb.ApplyOutcomesRequest(reversals=[reversal]).SerializeToString()


def regrouped_payload(outcome_id: str, subject_key: str, late_event: str, key_id: str) -> bytes:
    source, event_id = split_key(late_event)
    reversal = score_pb.Reversal(
        outcome_id=outcome_id,
        cause=score_pb.REVERSAL_CAUSE_REGROUPED,
        late_event=event_pb2.EventRef(source=source, event_id=event_id),
        subject_key=subject_key,
        subject_key_id=key_id,
    )
    return score_pb.ApplyOutcomesRequest(reversals=[reversal]).SerializeToString()


def outcome_message(firing: Firing, records: Mapping[str, bytes], key_id: str) -> outcome_pb2.Outcome:
    """The Outcome sent to score, with the firing events as its evidence snapshot. Every
    stored key is of generation `key_id` (the guard keeps it so), the evidence's too, even
    when its stored copy predates generations."""
    events = [event_pb2.RecordedEvent.FromString(records[key]) for key in firing.event_keys]
    for event in events:
        event.subject_key_id = key_id
    return outcome_pb2.Outcome(
        outcome_id=firing.outcome_id,
        rule=outcome_pb2.RuleRef(
            rule_id=firing.rule_id,
            rule_set=firing.rule_set,
            rule_set_version=firing.rule_set_version,
            title=firing.title,
            description=firing.description,
            legal_basis=firing.legal_basis,
        ),
        subject_key=firing.subject_key,
        subject_kind=SUBJECT_KIND_VALUES[firing.subject_kind],
        points=firing.points,
        category=firing.category,
        severity=SEVERITY_VALUES[firing.severity],
        occurred_at=to_timestamp(firing.occurred_at),
        reason=firing.reason,
        black_list=firing.black_list,
        events=events,
        subject_key_id=key_id,
    )
