"""The wire form of due-process records (egret.common.v1.due_process), shared by the services
that send them: score answers its acts with them and query its reads."""

from __future__ import annotations

from datetime import datetime

from domain.consent import Consent
from domain.entries import APPROVED, OPEN, OVERTURNED, PENDING, REJECTED, UPHELD, DisputeRecord, RepairRecord
from egret.common.v1 import due_process_pb2 as dp
from kit.protoconv import to_timestamp

DISPUTE_STATUSES = {
    OPEN: dp.DISPUTE_STATUS_OPEN,
    UPHELD: dp.DISPUTE_STATUS_UPHELD,
    OVERTURNED: dp.DISPUTE_STATUS_OVERTURNED,
}
REPAIR_STATUSES = {
    PENDING: dp.REPAIR_STATUS_PENDING,
    APPROVED: dp.REPAIR_STATUS_APPROVED,
    REJECTED: dp.REPAIR_STATUS_REJECTED,
}


def dispute_message(d: DisputeRecord, now: datetime) -> dp.Dispute:
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


def repair_message(r: RepairRecord, now: datetime) -> dp.RepairApplication:
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


def consent_message(c: Consent) -> dp.ConsentRecord:
    return dp.ConsentRecord(
        subject_key=c.subject_key,
        granted=c.granted,
        effective_at=to_timestamp(c.effective_at),
        recorded_at=to_timestamp(c.recorded_at),
        recorded_by=c.recorded_by,
    )
