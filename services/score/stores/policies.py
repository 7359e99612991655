"""Every activated policy, with its audit record."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy.orm import Session, sessionmaker

from contracts.score_store import StoredPolicy, load_policies
from domain.policy import ActivatedPolicy
from kit import audit
from services.score.due_process import Audited
from services.score.stores.audit import append_audit


class SqlPolicyStore:
    """PolicyStore on SQLAlchemy."""

    def __init__(self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys

    def activations(self) -> list[ActivatedPolicy]:
        with self._sessions() as session:
            return load_policies(session)

    def save_activation(self, activation: ActivatedPolicy) -> None:
        with self._sessions() as session, session.begin():
            session.add(
                StoredPolicy(
                    version=activation.policy.version,
                    activated_at=activation.activated_at.astimezone(UTC),
                    activated_by=activation.activated_by,
                    document=activation.document,
                )
            )
            session.flush()
            append_audit(
                session,
                Audited(
                    "policy.activate",
                    None,
                    activation.policy.version,
                    {"activated_by": activation.activated_by},
                ),
                activation.activated_at,
                self._audit_keys,
                claimed_actor=activation.activated_by,
            )
