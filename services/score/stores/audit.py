"""Score's audit log written in the transaction of the act it records (kit.audit)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from contracts.score_store import ScoreAuditHead, ScoreAuditLog
from kit import audit
from services.score.due_process import Audited


def append_audit(
    session: Session, act: Audited, at: datetime, keys: audit.AuditKeys, *, claimed_actor: str = ""
) -> None:
    """Append one audit record, by the principal of the call being handled, in the
    session's transaction."""
    audit.append(
        session,
        ScoreAuditLog,
        ScoreAuditHead,
        [
            audit.record(
                act.action,
                at.astimezone(UTC),
                subject_key=act.subject_key,
                target=act.target,
                detail=act.detail,
                claimed_actor=claimed_actor,
            )
        ],
        keys=keys,
    )
