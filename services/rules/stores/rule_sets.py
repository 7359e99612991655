"""Rule sets, the one active pointer and the audit trail of their changes (the rule-set
lifecycle's store, services.rules.lifecycle). Each change is also an act of rules' audit
log, written with it in the lifecycle's transaction."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from domain.ruleset.model import RuleSet
from kit import audit
from kit.audit import AuditRecord
from kit.db import as_utc
from kit.errors import FailedPrecondition
from services.rules.lifecycle import (
    ActivePointer,
    Change,
    RecordedChange,
    State,
    Status,
    StoredRuleSet,
    source_sha256,
)
from services.rules.stores.schema import (
    RulesAuditHead,
    RulesAuditLog,
    RuleSetActive,
    RuleSetChangeRow,
    RuleSetRow,
)

# The active pointer is one row: one rule set is active for the whole service.
_ACTIVE_SLOT: Final = 1


def _optional_utc(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def _stored(row: RuleSetRow, active_id: int | None, *, with_source: bool = True) -> StoredRuleSet:
    return StoredRuleSet(
        rule_set_id=row.id,
        name=row.name,
        version=row.version,
        state=cast(State, row.state),
        active=row.id == active_id,
        source=row.source if with_source else "",
        source_sha256=row.source_sha256,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        published_at=_optional_utc(row.published_at),
        published_by=row.published_by,
        activated_at=_optional_utc(row.activated_at),
        activated_by=row.activated_by,
        retired_at=_optional_utc(row.retired_at),
        retired_by=row.retired_by,
    )


class SqlLifecycleUnit:
    """One transaction of lifecycle changes (services.rules.lifecycle.LifecycleUnit)."""

    def __init__(self, session: Session, audit_keys: audit.AuditKeys) -> None:
        self._session = session
        self._audit_keys = audit_keys
        self._locking = session.get_bind().dialect.name == "postgresql"

    def get(self, rule_set_id: int, *, lock: bool = False) -> StoredRuleSet | None:
        query = sa.select(RuleSetRow).where(RuleSetRow.id == rule_set_id)
        if lock and self._locking:
            query = query.with_for_update()
        row = self._session.scalars(query).one_or_none()
        return None if row is None else _stored(row, self.active_id())

    def find_published(self, name: str, version: int) -> StoredRuleSet | None:
        row = self._session.scalars(
            sa.select(RuleSetRow).where(RuleSetRow.name == name, RuleSetRow.published_version == version)
        ).one_or_none()
        return None if row is None else _stored(row, self.active_id())

    def latest_published_version(self, name: str) -> int | None:
        return self._session.scalar(
            sa.select(sa.func.max(RuleSetRow.published_version)).where(RuleSetRow.name == name)
        )

    def active_id(self, *, lock: bool = False) -> int | None:
        query = sa.select(RuleSetActive.rule_set_id).where(RuleSetActive.slot == _ACTIVE_SLOT)
        if lock and self._locking:
            query = query.with_for_update()
        return self._session.scalar(query)

    def add_draft(self, rule_set: RuleSet, source: str, actor: str, now: datetime) -> int:
        row = RuleSetRow(
            name=rule_set.name,
            version=rule_set.version,
            published_version=None,
            state="draft",
            source=source,
            source_sha256=source_sha256(source),
            created_at=now,
            created_by=actor,
        )
        self._session.add(row)
        self._session.flush()
        return row.id

    def mark_published(self, rule_set_id: int, actor: str, now: datetime) -> None:
        self._session.execute(
            sa.update(RuleSetRow)
            .where(RuleSetRow.id == rule_set_id)
            .values(
                state="published", published_version=RuleSetRow.version, published_at=now, published_by=actor
            )
        )
        self._session.flush()

    def set_active(self, rule_set_id: int, actor: str, now: datetime) -> None:
        values = {"rule_set_id": rule_set_id, "activated_at": now, "activated_by": actor}
        updated = self._session.execute(
            sa.update(RuleSetActive).where(RuleSetActive.slot == _ACTIVE_SLOT).values(**values)
        )
        if cast(Any, updated).rowcount == 0:
            # The first activation; a concurrent first one fails on the primary key.
            self._session.execute(sa.insert(RuleSetActive).values(slot=_ACTIVE_SLOT, **values))
        self._session.execute(
            sa.update(RuleSetRow)
            .where(RuleSetRow.id == rule_set_id)
            .values(activated_at=now, activated_by=actor)
        )
        self._session.flush()

    def mark_retired(self, rule_set_id: int, actor: str, now: datetime) -> None:
        self._session.execute(
            sa.update(RuleSetRow)
            .where(RuleSetRow.id == rule_set_id)
            .values(state="retired", retired_at=now, retired_by=actor)
        )
        self._session.flush()

    def record(self, change: Change) -> None:
        _record(self._session, change, self._audit_keys)


# Each lifecycle change is also an act of rules' audit log.
_AUDIT_ACTIONS: Final = {
    "create_draft": "ruleset.draft",
    "publish": "ruleset.publish",
    "activate": "ruleset.activate",
    "retire": "ruleset.retire",
    "import": "ruleset.import",
    "redrive": "deadletter.redrive",
}


def audit_record(change: Change) -> AuditRecord:
    """The audit record of a lifecycle change, by the actor and role the change carries."""
    target = f"rule_set:{change.rule_set_id}" if change.rule_set_id is not None else "dead_letters"
    return AuditRecord(
        _AUDIT_ACTIONS[change.action],
        change.actor,
        change.role,
        change.at,
        target=target,
        detail=dict(change.detail),
    )


def _record(session: Session, change: Change, audit_keys: audit.AuditKeys) -> None:
    """The change row and its audit record, in the caller's transaction."""
    audit.append(session, RulesAuditLog, RulesAuditHead, [audit_record(change)], keys=audit_keys)
    session.execute(
        sa.insert(RuleSetChangeRow).values(
            rule_set_id=change.rule_set_id,
            action=change.action,
            actor=change.actor,
            changed_at=change.at,
            detail=json.dumps(dict(change.detail), sort_keys=True, default=str),
        )
    )


class SqlLifecycleStore:
    """Rule sets, the active pointer and the audit trail (services.rules.lifecycle.LifecycleStore)."""

    def __init__(self, sessions: sessionmaker[Session], *, audit_keys: audit.AuditKeys) -> None:
        self._sessions = sessions
        self._audit_keys = audit_keys

    @contextmanager
    def unit(self) -> Iterator[SqlLifecycleUnit]:
        try:
            with self._sessions() as session, session.begin():
                yield SqlLifecycleUnit(session, self._audit_keys)
        except IntegrityError as error:
            # Two changes raced (two publications of one version, two first activations).
            raise FailedPrecondition("a concurrent change to the rule sets won; read them again") from error

    def get(self, rule_set_id: int) -> StoredRuleSet | None:
        with self._sessions() as session:
            return SqlLifecycleUnit(session, self._audit_keys).get(rule_set_id)

    def active(self) -> ActivePointer | None:
        """One primary-key read: every batch calls it to notice an activation."""
        with self._sessions() as session:
            row = session.execute(
                sa.select(RuleSetActive.rule_set_id, RuleSetActive.activated_at).where(
                    RuleSetActive.slot == _ACTIVE_SLOT
                )
            ).one_or_none()
        return None if row is None else ActivePointer(row.rule_set_id, as_utc(row.activated_at))

    def list(
        self, *, after: int | None, limit: int, name: str | None, status: Status | None
    ) -> Sequence[StoredRuleSet]:
        with self._sessions() as session:
            active_id = SqlLifecycleUnit(session, self._audit_keys).active_id()
            query = sa.select(RuleSetRow)
            if after is not None:
                query = query.where(RuleSetRow.id > after)
            if name:
                query = query.where(RuleSetRow.name == name)
            if status == "active":
                query = query.where(RuleSetRow.id == (active_id if active_id is not None else -1))
            elif status is not None:
                query = query.where(RuleSetRow.state == status)
                if status == "published" and active_id is not None:
                    query = query.where(RuleSetRow.id != active_id)
            rows = session.scalars(query.order_by(RuleSetRow.id).limit(limit)).all()
            return [_stored(r, active_id, with_source=False) for r in rows]

    def changes(self, *, rule_set_id: int | None, after: int | None, limit: int) -> Sequence[RecordedChange]:
        with self._sessions() as session:
            query = sa.select(RuleSetChangeRow)
            if rule_set_id is not None:
                query = query.where(RuleSetChangeRow.rule_set_id == rule_set_id)
            if after is not None:
                query = query.where(RuleSetChangeRow.id > after)
            rows = session.scalars(query.order_by(RuleSetChangeRow.id).limit(limit)).all()
            return [
                RecordedChange(
                    r.id,
                    Change(
                        rule_set_id=r.rule_set_id,
                        action=cast(Any, r.action),
                        actor=r.actor,
                        at=as_utc(r.changed_at),
                        detail=json.loads(r.detail),
                    ),
                )
                for r in rows
            ]

    def record(self, change: Change) -> None:
        with self._sessions() as session, session.begin():
            _record(session, change, self._audit_keys)
