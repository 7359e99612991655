"""Wire forms (egret.common.v1 due_process messages) of disputes, repair applications and
consents: score answers its due-process writes with them, query its due-process reads.

The records are described by shape (Protocols), so that this module needs no service's
code; score's dataclasses (DisputeRecord, RepairRecord, Consent) are what is passed in.
Statuses are keyed by the values score stores (table score_disputes, score_repairs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from egret.common.v1 import due_process_pb2 as dp
from kit.protoconv import to_timestamp

DISPUTE_STATUSES = {
    "open": dp.DISPUTE_STATUS_OPEN,
    "upheld": dp.DISPUTE_STATUS_UPHELD,
    "overturned": dp.DISPUTE_STATUS_OVERTURNED,
}
REPAIR_STATUSES = {
    "pending": dp.REPAIR_STATUS_PENDING,
    "approved": dp.REPAIR_STATUS_APPROVED,
    "rejected": dp.REPAIR_STATUS_REJECTED,
}


class DisputeLike(Protocol):
    @property
    def dispute_id(self) -> int: ...
    @property
    def entry_id(self) -> str: ...
    @property
    def subject_key(self) -> str: ...
    @property
    def statement(self) -> str: ...
    @property
    def filed_by(self) -> str: ...
    @property
    def filed_by_role(self) -> str: ...
    @property
    def filed_at(self) -> datetime: ...
    @property
    def deadline(self) -> datetime: ...
    @property
    def status(self) -> str: ...
    @property
    def resolution_reason(self) -> str: ...
    @property
    def resolved_by(self) -> str: ...
    @property
    def resolved_at(self) -> datetime | None: ...
    @property
    def assignee(self) -> str: ...
    @property
    def assigned_at(self) -> datetime | None: ...
    def overdue(self, now: datetime) -> bool: ...


class RepairLike(Protocol):
    @property
    def application_id(self) -> int: ...
    @property
    def entry_id(self) -> str: ...
    @property
    def subject_key(self) -> str: ...
    @property
    def evidence(self) -> str: ...
    @property
    def evidence_uri(self) -> str: ...
    @property
    def applied_at(self) -> datetime: ...
    @property
    def decision_due(self) -> datetime: ...
    @property
    def status(self) -> str: ...
    @property
    def decision_reason(self) -> str: ...
    @property
    def decided_by(self) -> str: ...
    @property
    def decided_at(self) -> datetime | None: ...
    def overdue(self, now: datetime) -> bool: ...


class ConsentLike(Protocol):
    @property
    def subject_key(self) -> str: ...
    @property
    def granted(self) -> bool: ...
    @property
    def effective_at(self) -> datetime: ...
    @property
    def recorded_at(self) -> datetime: ...
    @property
    def recorded_by(self) -> str: ...


def dispute_message(d: DisputeLike, now: datetime) -> dp.Dispute:
    """The wire form of a dispute as of `now` (`overdue` depends on it)."""
    message = dp.Dispute(
        dispute_id=str(d.dispute_id),
        entry_id=d.entry_id,
        subject_key=d.subject_key,
        statement=d.statement,
        filed_by=d.filed_by,
        filed_by_role=d.filed_by_role,
        filed_at=to_timestamp(d.filed_at),
        deadline=to_timestamp(d.deadline),
        status=DISPUTE_STATUSES[d.status],
        resolution_reason=d.resolution_reason,
        resolved_by=d.resolved_by,
        overdue=d.overdue(now),
        assignee=d.assignee,
    )
    if d.resolved_at is not None:
        message.resolved_at.CopyFrom(to_timestamp(d.resolved_at))
    if d.assigned_at is not None:
        message.assigned_at.CopyFrom(to_timestamp(d.assigned_at))
    return message


def repair_message(r: RepairLike, now: datetime) -> dp.RepairApplication:
    """The wire form of a repair application as of `now`."""
    message = dp.RepairApplication(
        application_id=str(r.application_id),
        entry_id=r.entry_id,
        subject_key=r.subject_key,
        evidence=r.evidence,
        evidence_uri=r.evidence_uri,
        applied_at=to_timestamp(r.applied_at),
        decision_due=to_timestamp(r.decision_due),
        status=REPAIR_STATUSES[r.status],
        decision_reason=r.decision_reason,
        decided_by=r.decided_by,
        overdue=r.overdue(now),
    )
    if r.decided_at is not None:
        message.decided_at.CopyFrom(to_timestamp(r.decided_at))
    return message


def consent_message(c: ConsentLike) -> dp.ConsentRecord:
    return dp.ConsentRecord(
        subject_key=c.subject_key,
        granted=c.granted,
        effective_at=to_timestamp(c.effective_at),
        recorded_at=to_timestamp(c.recorded_at),
        recorded_by=c.recorded_by,
    )
