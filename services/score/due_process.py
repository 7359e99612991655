"""Due process on the ledger (pure domain): disputes, credit repair and consent.

Every act is one transaction of a `DueProcessStore`: the facts are read under the
subject's lock, checked here, written with their history row and audit record, and the
subject, loaded locked, is rescored by the ledger and stored. Nothing here edits an entry's
facts: disputes and repairs end or resume its effect through pauses
(`domain.entries.pauses_of`), so any past score is still a pure function of the ledger
(docs/due-process.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from domain.consent import Consent
from domain.entries import (
    APPROVED,
    DISPUTE,
    OPEN,
    OVERTURNED,
    PENDING,
    REJECTED,
    REPAIR,
    UPHELD,
    DisputeRecord,
    EntryFacts,
    EntryStatus,
    RepairRecord,
    counts_at,
)
from domain.history import Event
from domain.intake import MAX_ID_LENGTH, is_hex
from kit import reasons
from kit.errors import FailedPrecondition, NotFound, Violation
from kit.principal import Principal, Role
from kit.pseudonym import Pseudonymiser
from kit.purposes import Purposes
from services.score.due_process_checks import (
    MAX_URI_LENGTH,
    actor,
    add_working_days,
    check,
    check_assignee,
    consent_subject,
    held_by_another,
    may_dispute,
    numeric_id,
    owns,
    repair_possible_from,
    text_violations,
    why_not,
)
from services.score.ledger import Ledger
from services.score.ledger_store import Rescoring

# A dispute or a repair application: filed, assigned or decided alike.
_Application = TypeVar("_Application", DisputeRecord, RepairRecord)

UPHOLD = "uphold"
OVERTURN = "overturn"
APPROVE = "approve"
REJECT = "reject"


@dataclass(frozen=True)
class Audited:
    """An audit record to append with the act: what, about whom, and the facts."""

    action: str
    subject_key: str | None
    target: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class DueProcessTx(Rescoring, Protocol):
    """One transaction of the due-process store."""

    def entry(self, entry_id: str) -> EntryFacts | None:
        """The entry's facts, its subject locked until commit; None if there is none."""
        ...

    def dispute(self, dispute_id: int) -> DisputeRecord | None: ...

    def repair(self, application_id: int) -> RepairRecord | None: ...

    def add_dispute(self, dispute: DisputeRecord) -> DisputeRecord:
        """Store a new dispute; returns it with its assigned id."""
        ...

    def save_dispute(self, dispute: DisputeRecord) -> None: ...

    def add_repair(self, repair: RepairRecord) -> RepairRecord:
        """Store a new application; returns it with its assigned id."""
        ...

    def save_repair(self, repair: RepairRecord) -> None: ...

    def add_consent(self, consent: Consent) -> Consent:
        """Append a consent record; returns it with its assigned id."""
        ...

    def stored_subject(self, subject_keys: Sequence[str]) -> str | None:
        """The first of `subject_keys` the store holds a score or a consent record of."""
        ...

    def set_status(self, entry_id: str, status: EntryStatus) -> None: ...

    def audit(self, act: Audited, at: datetime) -> None:
        """Append the act's audit record in this transaction."""
        ...


class DueProcessStore(Protocol):
    def transaction(self) -> AbstractContextManager[DueProcessTx]: ...

    def overdue_repairs(self, now: datetime, limit: int) -> list[RepairRecord]:
        """Pending applications whose decision is past due at `now`, oldest due first."""
        ...


class DueProcess:
    """Disputes, repairs and consent, each one transaction with its history row and
    audit record."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        store: DueProcessStore,
        clock: Callable[[], datetime],
        pseudonymiser: Pseudonymiser | None = None,
        purposes: Purposes | None = None,
    ) -> None:
        self._ledger = ledger
        self._store = store
        self._clock = clock
        self._pseudonymiser = pseudonymiser
        # Its identifier patterns keep a resident's id from being stored as an assignee.
        self._purposes = purposes

    def _requested_subject(self, tx: DueProcessTx, subject_key: str) -> str:
        """The subject a caller names by key: the key as given, or, after a rotation, a key
        of the previous generation (one a read returned before it) moved to the current
        one. Every stored key is of the current generation while this instance serves
        (kit.rekey's guard), so a given key the store holds nothing of, whose moved form it
        does, was of the previous generation. A key it knows in neither form is taken as given."""
        chain = self._pseudonymiser
        previous = None if chain is None else chain.previous_key_id
        if chain is None or previous is None:
            return subject_key
        moved = chain.rekey(subject_key, previous)
        return tx.stored_subject((subject_key, moved)) or subject_key

    def _entry(self, tx: DueProcessTx, entry_id: str) -> EntryFacts:
        # An id no outcome could have (too long, not hex) is unknown alike, and never bound.
        facts = tx.entry(entry_id) if len(entry_id) <= MAX_ID_LENGTH and is_hex(entry_id) else None
        if facts is None:
            raise NotFound(f"no ledger entry {entry_id!r}")
        return facts

    def _record(
        self,
        tx: DueProcessTx,
        act: Audited,
        now: datetime,
        *,
        status: EntryStatus | None = None,
        event: Event | None = None,
    ) -> None:
        """What every dispute and repair act writes after its application: the entry's new
        `status`, the subject rescored with the act's history `event`, and the audit record."""
        if status is not None:
            tx.set_status(act.target, status)
        if event is not None and act.subject_key is not None:
            subjects = tx.lock([act.subject_key])
            tx.save(self._ledger.rescore_acts(subjects, now, {act.subject_key: event}), now)
        tx.audit(act, now)

    def _undecided(
        self,
        tx: DueProcessTx,
        found: _Application | None,
        *,
        missing: str,
        current: Callable[[EntryFacts], _Application],
        name: str,
        pending: str,
    ) -> tuple[EntryFacts, _Application]:
        """An application with its entry's facts, read under the subject's lock (a concurrent
        decision or assignment may have won): NOT_FOUND without one, ALREADY_DECIDED unless it
        is still `pending`."""
        if found is None:
            raise NotFound(missing)
        facts = self._entry(tx, found.entry_id)
        application = current(facts)
        if application.status != pending:
            raise FailedPrecondition(
                f"{name} was decided before ({application.status})",
                reasons.ALREADY_DECIDED,
                {"status": application.status},
            )
        return facts, application

    def _open_dispute(self, tx: DueProcessTx, number: int) -> tuple[EntryFacts, DisputeRecord]:
        return self._undecided(
            tx,
            tx.dispute(number),
            missing=f"no dispute {str(number)!r}",
            current=lambda facts: next(d for d in facts.disputes if d.dispute_id == number),
            name=f"dispute {number}",
            pending=OPEN,
        )

    def file_dispute(self, principal: Principal | None, entry_id: str, statement: str) -> DisputeRecord:
        check(
            text_violations("entry_id", entry_id, limit=MAX_ID_LENGTH)
            + text_violations("statement", statement)
        )
        now = self._clock()
        with self._store.transaction() as tx:
            facts = self._entry(tx, entry_id)
            if not may_dispute(principal, facts):
                # The same answer as for a missing entry, so existence does not leak.
                raise NotFound(f"no ledger entry {entry_id!r}")
            if any(d.status == OPEN for d in facts.disputes):
                raise FailedPrecondition(
                    f"entry {entry_id!r} already has an open dispute", reasons.DISPUTE_ALREADY_OPEN
                )
            if facts.status in (EntryStatus.REVERSED, EntryStatus.REPAIRED):
                raise FailedPrecondition(
                    f"entry {entry_id!r} is {facts.status.value}; it no longer counts",
                    reasons.ENTRY_NOT_DISPUTABLE,
                    {"status": facts.status.value},
                )
            by, role = actor(principal)
            deadline = now + self._ledger.policy.due_process.dispute_deadline
            dispute = tx.add_dispute(
                DisputeRecord(0, entry_id, facts.entry.subject_key, statement, by, role, now, deadline)
            )
            self._record(
                tx,
                Audited(
                    "dispute.file",
                    facts.entry.subject_key,
                    entry_id,
                    {
                        "dispute_id": dispute.dispute_id,
                        "deadline": deadline.isoformat(),
                        "statement": statement,
                    },
                ),
                now,
                status=EntryStatus.DISPUTED,
                event=Event(DISPUTE, note=f"dispute {dispute.dispute_id} filed", always=True),
            )
            return dispute

    def resolve_dispute(
        self, principal: Principal | None, dispute_id: str, decision: str | None, reason: str
    ) -> DisputeRecord:
        problems = text_violations("reason", reason)
        if decision not in (UPHOLD, OVERTURN):
            problems.insert(0, Violation("decision", "must be UPHOLD or OVERTURN", "REQUIRED"))
        check(problems)
        number = numeric_id("dispute_id", dispute_id, "dispute")
        now = self._clock()
        with self._store.transaction() as tx:
            facts, dispute = self._open_dispute(tx, number)
            by, _ = actor(principal)
            if dispute.assignee and dispute.assignee != by:
                # Held by another reviewer: only they decide it, unless it is released.
                raise held_by_another(dispute)
            decided = replace(
                dispute,
                status=UPHELD if decision == UPHOLD else OVERTURNED,
                resolution_reason=reason,
                resolved_by=by,
                resolved_at=now,
            )
            tx.save_dispute(decided)
            after = replace(
                facts, disputes=tuple(decided if d.dispute_id == number else d for d in facts.disputes)
            )
            if decision == UPHOLD:
                lapsed = now > dispute.deadline
                event = Event(
                    DISPUTE,
                    resumed=(dispute.entry_id,) if lapsed else (),
                    note=f"dispute {number} upheld: {reason}",
                    always=True,
                )
            else:
                event = Event(
                    DISPUTE,
                    ended=(dispute.entry_id,),
                    note=f"dispute {number} overturned: {reason}",
                    always=True,
                )
            self._record(
                tx,
                Audited(
                    "dispute.resolve",
                    dispute.subject_key,
                    dispute.entry_id,
                    {"dispute_id": number, "decision": decided.status, "reason": reason},
                ),
                now,
                status=after.status,
                event=event,
            )
            return decided

    def assign_dispute(
        self, principal: Principal | None, dispute_id: str, assignee: str, release: bool
    ) -> DisputeRecord:
        """A reviewer takes an open dispute (or releases the one it holds); an admin assigns
        one to a named reviewer or releases it from whoever holds it. Taking or releasing a
        dispute another reviewer holds is refused with ASSIGNED_TO_ANOTHER; only an admin
        moves it. Each change is an audit record under the caller's identity."""
        by, role = actor(principal)
        admin = principal is not None and principal.role is Role.ADMIN
        check_assignee(assignee, release, admin, by, self._purposes)
        number = numeric_id("dispute_id", dispute_id, "dispute")
        now = self._clock()
        with self._store.transaction() as tx:
            _, dispute = self._open_dispute(tx, number)
            target = "" if release else (assignee or by)
            if not admin and dispute.assignee and dispute.assignee != by:
                raise held_by_another(dispute)
            if dispute.assignee == target:
                return dispute  # already so: nothing changes, nothing to record
            changed = replace(dispute, assignee=target, assigned_at=None if release else now)
            tx.save_dispute(changed)
            self._record(
                tx,
                Audited(
                    "dispute.release" if release else "dispute.assign",
                    dispute.subject_key,
                    dispute.entry_id,
                    {
                        "dispute_id": number,
                        "assignee": target,
                        "previous_assignee": dispute.assignee,
                        "by_role": role,
                    },
                ),
                now,
            )
            return changed

    def apply_for_repair(
        self, principal: Principal | None, entry_id: str, evidence: str, evidence_uri: str
    ) -> RepairRecord:
        check(
            text_violations("entry_id", entry_id, limit=MAX_ID_LENGTH)
            + text_violations("evidence", evidence)
            + text_violations("evidence_uri", evidence_uri, required=False, limit=MAX_URI_LENGTH)
        )
        now = self._clock()
        policy = self._ledger.policy
        with self._store.transaction() as tx:
            facts = self._entry(tx, entry_id)
            if not owns(principal, facts):
                raise NotFound(f"no ledger entry {entry_id!r}")
            entry = facts.entry
            if entry.points >= 0:
                raise FailedPrecondition(
                    f"entry {entry_id!r} is not negative; only negative entries are repaired",
                    reasons.ENTRY_NOT_NEGATIVE,
                )
            if not counts_at(facts.scored, policy.for_kind(entry.subject_kind), now):
                why, words = why_not(facts, now)
                raise FailedPrecondition(
                    f"entry {entry_id!r} does not count now ({words}); there is nothing to repair",
                    reasons.ENTRY_NOT_COUNTING,
                    {"why": why},
                )
            if any(r.status == PENDING for r in facts.repairs):
                raise FailedPrecondition(
                    f"entry {entry_id!r} already has a pending repair application",
                    reasons.REPAIR_ALREADY_PENDING,
                )
            period = policy.due_process.repair_min_period(entry.severity)
            if period is None:
                raise FailedPrecondition(
                    f"entries of severity {entry.severity!r} cannot be repaired",
                    reasons.SEVERITY_NOT_REPAIRABLE,
                    {"severity": entry.severity},
                )
            possible = repair_possible_from(entry, period)
            if now < possible:
                raise FailedPrecondition(
                    f"a repair of this {entry.severity} entry may be applied for from "
                    f"{possible.date().isoformat()} ({possible.isoformat()}), "
                    f"{period.days} days after the event",
                    reasons.REPAIR_TOO_EARLY,
                    {
                        "earliest_date": possible.date().isoformat(),
                        "earliest_at": possible.isoformat(),
                        "min_period_days": str(period.days),
                        "severity": entry.severity,
                    },
                )
            due = add_working_days(now, policy.due_process.repair_decision_working_days)
            repair = tx.add_repair(
                RepairRecord(0, entry_id, entry.subject_key, evidence, evidence_uri, now, due)
            )
            self._record(
                tx,
                Audited(
                    "repair.apply",
                    entry.subject_key,
                    entry_id,
                    {"application_id": repair.application_id, "decision_due": due.isoformat()},
                ),
                now,
            )
            return repair

    def decide_repair(
        self, principal: Principal | None, application_id: str, decision: str | None, reason: str
    ) -> RepairRecord:
        problems = text_violations("reason", reason)
        if decision not in (APPROVE, REJECT):
            problems.insert(0, Violation("decision", "must be APPROVE or REJECT", "REQUIRED"))
        check(problems)
        number = numeric_id("application_id", application_id, "repair application")
        now = self._clock()
        with self._store.transaction() as tx:
            facts, repair = self._undecided(
                tx,
                tx.repair(number),
                missing=f"no repair application {application_id!r}",
                current=lambda facts: next(r for r in facts.repairs if r.application_id == number),
                name=f"repair application {application_id}",
                pending=PENDING,
            )
            by, _ = actor(principal)
            decided = replace(
                repair,
                status=APPROVED if decision == APPROVE else REJECTED,
                decision_reason=reason,
                decided_by=by,
                decided_at=now,
            )
            tx.save_repair(decided)
            approved = decided.status == APPROVED
            after = replace(
                facts, repairs=tuple(decided if r.application_id == number else r for r in facts.repairs)
            )
            self._record(
                tx,
                Audited(
                    "repair.decide",
                    repair.subject_key,
                    repair.entry_id,
                    {"application_id": number, "decision": decided.status, "reason": reason},
                ),
                now,
                status=after.status if approved else None,
                event=Event(
                    REPAIR,
                    ended=(repair.entry_id,),
                    note=f"repair {number} approved: {reason}",
                    always=True,
                )
                if approved
                else None,
            )
            return decided

    def set_consent(
        self, principal: Principal | None, subject_key: str, granted: bool, effective_at: datetime | None
    ) -> Consent:
        now = self._clock()
        subject_key = consent_subject(principal, subject_key, effective_at, now)
        by, _ = actor(principal)
        staff = principal is None or principal.role is not Role.SUBJECT
        with self._store.transaction() as tx:
            if staff:
                subject_key = self._requested_subject(tx, subject_key)
            consent = tx.add_consent(Consent(subject_key, granted, effective_at or now, now, by))
            tx.audit(
                Audited(
                    "consent.set",
                    subject_key,
                    subject_key,
                    {"granted": granted, "effective_at": consent.effective_at.isoformat()},
                ),
                now,
            )
            return consent

    def overdue_repairs(self, limit: int = 100) -> list[RepairRecord]:
        return self._store.overdue_repairs(self._clock(), limit)
