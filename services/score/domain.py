"""The ledger and the score (pure domain).

Each outcome of a rule firing becomes exactly one ledger entry, keyed by its
outcome id, so redelivery by the rules outbox has no effect. A subject's score is a
pure function of its ledger (entries with their pauses), the policy, an instant and a
view (`compute_score`): the store keeps the result, with the instant it next changes
with no new event, only so that reads are cheap; `Ledger.sweep` recomputes subjects
whose entries expired or paused and `Ledger.verify` proves the stored results still match.

Due process (disputes, repairs, corrections) never edits an entry's facts: it adds
*pauses*, dated intervals in which the entry does not count (see `Pause`,
`pauses_of` and docs/due-process.md).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Final, Protocol

from kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Violation
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS
from services.score.policy import ActivatedPolicy, PolicyBook, ScorePolicy, SubjectPolicy

MAX_ID_LENGTH = 128
MAX_SUBJECT_KEY_LENGTH = 64
MAX_CATEGORY_LENGTH = 64


class EntryStatus(Enum):
    """What an entry shows on reads, stored in `score_ledger.status` (`status_of`):
    reversed > repaired > disputed (an open dispute) > active. Expired is not stored:
    readers derive it from visible_until. Whether an entry counts at an instant is decided
    by its pauses (`counts_at`), not by this status."""

    ACTIVE = "active"
    DISPUTED = "disputed"
    REVERSED = "reversed"
    REPAIRED = "repaired"
    EXPIRED = "expired"


# For scorable objects that carry no pauses (e.g. the rules backtest's lines): only
# active entries count.
COUNTING = frozenset({EntryStatus.ACTIVE})


class View(Enum):
    """Which timeline an instant is read on.

    AS_KNOWN (the default, what Egret served then): an entry counts from its recorded_at,
    and a reversal takes effect from the instant it was made. AS_CORRECTED: reversed
    (void) entries never counted, and entries count from their occurred_at, as if every
    event had been known when it happened.
    """

    AS_KNOWN = "as_known"
    AS_CORRECTED = "as_corrected"


# Kinds of pause, and the causes of history rows they produce.
DISPUTE = "dispute"
REPAIR = "repair"
CORRECTION = "correction"
OVERTURN = "overturn"


@dataclass(frozen=True)
class Pause:
    """An interval [start, end) in which an entry does not count (end None: for good).

    - `dispute`: a dispute undecided at its deadline, from the deadline to its decision;
    - `overturn`: a dispute overturned, from the decision on (void);
    - `repair`: an approved repair, from the decision on;
    - `correction`: a source retraction, from the instant score learned it on (void).

    A void pause makes the entry void: on the corrected timeline it never counted.
    `ref` names what caused it (a dispute or application id, "source/event_id").
    """

    start: datetime
    end: datetime | None = None
    void: bool = False
    kind: str = ""
    ref: str = ""

    def covers(self, at: datetime) -> bool:
        return self.start <= at and (self.end is None or at < self.end)


RED = "red"
BLACK = "black"


OPEN = "open"
UPHELD = "upheld"
OVERTURNED = "overturned"
PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"


@dataclass(frozen=True)
class DisputeRecord:
    """A dispute of one entry (table score_disputes). `status` is open, upheld or
    overturned; `resolved_*` are set once decided."""

    dispute_id: int
    entry_id: str
    subject_key: str
    statement: str
    filed_by: str
    filed_by_role: str
    filed_at: datetime
    deadline: datetime
    status: str = OPEN
    resolution_reason: str = ""
    resolved_by: str = ""
    resolved_at: datetime | None = None
    # The reviewer holding it (principal id), "" while no one does.
    assignee: str = ""
    assigned_at: datetime | None = None

    def overdue(self, now: datetime) -> bool:
        """Open at or past its deadline: the entry does not count until it is decided."""
        return self.status == OPEN and now >= self.deadline


@dataclass(frozen=True)
class RepairRecord:
    """A credit repair application (table score_repairs). `status` is pending, approved
    or rejected; `decided_*` are set once decided."""

    application_id: int
    entry_id: str
    subject_key: str
    evidence: str
    evidence_uri: str
    applied_at: datetime
    decision_due: datetime
    status: str = PENDING
    decision_reason: str = ""
    decided_by: str = ""
    decided_at: datetime | None = None

    def overdue(self, now: datetime) -> bool:
        """Pending past its decision date (computed at read, never stored)."""
        return self.status == PENDING and now > self.decision_due


# Why rules reversed an outcome: a department retracted one of its events, or a late
# event regrouped the subject's events in event time (source/event_id name that event).
RETRACTION: Final = "retraction"
REGROUPED: Final = "regrouped"


@dataclass(frozen=True)
class ReversalRecord:
    """A reversal of an outcome by a source correction or a regrouping in event time (table
    score_reversals), keyed by outcome id. It may arrive before its outcome: it then waits
    (a tombstone) and the outcome is reversed from the moment it is recorded."""

    outcome_id: str
    subject_key: str
    source: str
    event_id: str
    reason: str
    retracted_at: datetime | None
    retracted_by: str
    reversed_at: datetime
    cause: str = RETRACTION

    @property
    def event(self) -> str:
        return f"{self.source}/{self.event_id}"

    def explanation(self) -> str:
        """Why the entry no longer counts, in a sentence."""
        if self.cause == REGROUPED:
            return f"event {self.event} arrived late and changed which events form this entry"
        return f"event {self.event} retracted: {self.reason}"


@dataclass(frozen=True)
class Consent:
    """One consent record (table score_consents, append-only): `granted` from
    `effective_at` on, until a later record says otherwise."""

    subject_key: str
    granted: bool
    effective_at: datetime
    recorded_at: datetime
    recorded_by: str
    consent_id: int = 0


def consent_in_force(records: Iterable[Consent], at: datetime) -> Consent | None:
    """The consent in force at `at`: the record with the latest effective_at at or before
    `at`, ties broken by recording order (consent_id); None when none is."""
    chosen: Consent | None = None
    for r in records:
        if r.effective_at <= at and (
            chosen is None or (r.effective_at, r.consent_id) > (chosen.effective_at, chosen.consent_id)
        ):
            chosen = r
    return chosen


def may_serve(consent_required: bool, consent: Consent | None) -> bool:
    """Whether a score may be served: the policy does not require consent, or consent is
    granted at the instant read."""
    return not consent_required or (consent is not None and consent.granted)


def pauses_of(
    disputes: Iterable[DisputeRecord], repairs: Iterable[RepairRecord], reversals: Iterable[ReversalRecord]
) -> tuple[Pause, ...]:
    """An entry's pauses, derived from its disputes, repair applications and reversals."""
    pauses: list[Pause] = []
    for d in disputes:
        if d.resolved_at is None or d.resolved_at > d.deadline:
            pauses.append(Pause(d.deadline, d.resolved_at, False, DISPUTE, str(d.dispute_id)))
        if d.status == OVERTURNED and d.resolved_at is not None:
            pauses.append(Pause(d.resolved_at, None, True, OVERTURN, str(d.dispute_id)))
    for r in repairs:
        if r.status == APPROVED and r.decided_at is not None:
            pauses.append(Pause(r.decided_at, None, False, REPAIR, str(r.application_id)))
    for v in reversals:
        pauses.append(Pause(v.reversed_at, None, True, CORRECTION, v.event))
    return tuple(sorted(pauses, key=lambda p: (p.start, p.kind, p.ref)))


def status_of(
    disputes: Iterable[DisputeRecord], repairs: Iterable[RepairRecord], reversed_: bool
) -> EntryStatus:
    """What an entry shows: reversed > repaired > disputed (an open dispute) > active."""
    disputes = list(disputes)
    if reversed_ or any(d.status == OVERTURNED for d in disputes):
        return EntryStatus.REVERSED
    if any(r.status == APPROVED for r in repairs):
        return EntryStatus.REPAIRED
    if any(d.status == OPEN for d in disputes):
        return EntryStatus.DISPUTED
    return EntryStatus.ACTIVE


class Scorable(Protocol):
    """What the score needs of an entry."""

    @property
    def entry_id(self) -> str: ...
    @property
    def points(self) -> int: ...
    @property
    def category(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def status(self) -> EntryStatus: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def recorded_at(self) -> datetime: ...
    @property
    def black_list(self) -> bool: ...


@dataclass(frozen=True)
class ScoredEntry:
    """The part of a ledger entry the score depends on, with its pauses (`pauses_of`)."""

    entry_id: str
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    black_list: bool = False
    pauses: tuple[Pause, ...] = ()

    @property
    def void(self) -> bool:
        return any(p.void for p in self.pauses)


def visible_until(entry: Scorable, policy: SubjectPolicy) -> datetime:
    """The first instant at which `entry` no longer counts under `policy`."""
    return entry.occurred_at + policy.visibility(entry.severity)


def _pauses(entry: Scorable) -> tuple[Pause, ...] | None:
    # Scorables without pauses (the rules backtest's lines) fall back to their status.
    pauses: tuple[Pause, ...] | None = getattr(entry, "pauses", None)
    return pauses


def known_at(entry: Scorable, at: datetime, view: View = View.AS_KNOWN) -> bool:
    """Whether `entry` is part of the ledger at `at` on `view`'s timeline (whatever its
    expiry): this is what caps are computed over.

    AS_KNOWN: recorded by `at` and not voided (reversed) by `at`: a reversal frees the
    entry's share of the cap from the reversal on, never before. AS_CORRECTED: occurred by
    `at` and never voided.
    """
    pauses = _pauses(entry)
    if pauses is None:
        return entry.status in COUNTING and entry.recorded_at <= at
    if view is View.AS_CORRECTED:
        return entry.occurred_at <= at and not any(p.void for p in pauses)
    return entry.recorded_at <= at and not any(p.void and p.start <= at for p in pauses)


def counts_at(entry: Scorable, policy: SubjectPolicy, at: datetime, view: View = View.AS_KNOWN) -> bool:
    """Whether `entry` adds to the score at `at`: known (`known_at`), not expired, and in
    no pause."""
    if not (known_at(entry, at, view) and at < visible_until(entry, policy)):
        return False
    return not any(p.covers(at) for p in _pauses(entry) or ())


def _boundaries(entry: Scorable) -> Iterator[datetime]:
    for p in _pauses(entry) or ():
        yield p.start
        if p.end is not None:
            yield p.end


@dataclass(frozen=True)
class CategoryScore:
    category: str
    # The points the category's visible entries add, after caps.
    points: int
    entry_count: int
    # Positive points of visible entries withheld by the category's cap.
    capped: int = 0


@dataclass(frozen=True)
class CountedEntry:
    """One visible entry and the points it adds to the score after caps."""

    entry_id: str
    category: str
    points: int
    negative: bool
    black_list: bool
    visible_until: datetime


@dataclass(frozen=True)
class ListMembership:
    """Why a subject is on a list: the rule of the policy it met and the entries behind it."""

    name: str
    reasons: tuple[str, ...]
    entry_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScoreState:
    """What a history row compares: a change of any of these is a history event."""

    score: int
    tier: str
    red: bool
    black: bool


@dataclass(frozen=True)
class ScoreResult:
    score: int
    tier: str
    policy_version: str
    categories: tuple[CategoryScore, ...]
    entry_count: int
    as_of: datetime | None = None
    lists: tuple[ListMembership, ...] = ()
    counted: tuple[CountedEntry, ...] = ()
    # When the score next changes with no new event: the earliest visible_until of a
    # counting entry, or pause start or end (a dispute's deadline) after as_of; None when
    # nothing is due.
    next_change_at: datetime | None = None

    def on_list(self, name: str) -> ListMembership | None:
        return next((m for m in self.lists if m.name == name), None)

    @property
    def state(self) -> ScoreState:
        return ScoreState(
            self.score, self.tier, self.on_list(RED) is not None, self.on_list(BLACK) is not None
        )


def _capped_points(entries: Sequence[Scorable], policy: SubjectPolicy) -> dict[str, int]:
    """The points each entry may add after the rolling per-category cap on positives.

    Positives are taken in event-time order (entry id breaks ties, so the result does not
    depend on arrival order); each adds at most what is left of its category's limit over
    the window (occurred_at - window, occurred_at]. Every window of that length then holds at
    most the limit. The allowance depends only on which entries are known, not on whether
    older ones have since expired, so an entry's contribution never changes while it counts.
    """
    allowed: dict[str, int] = {}
    positives: dict[str, list[Scorable]] = {}
    for e in entries:
        if e.points > 0 and policy.caps.limit(e.category) is not None:
            positives.setdefault(e.category, []).append(e)
        else:
            allowed[e.entry_id] = e.points
    window = policy.caps.window
    for category, items in positives.items():
        limit = policy.caps.limit(category)
        assert limit is not None
        items.sort(key=lambda e: (e.occurred_at, e.entry_id))
        granted: list[tuple[datetime, int]] = []
        start = 0
        in_window = 0
        for e in items:
            while start < len(granted) and granted[start][0] <= e.occurred_at - window:
                in_window -= granted[start][1]
                start += 1
            grant = max(0, min(e.points, limit - in_window))
            granted.append((e.occurred_at, grant))
            in_window += grant
            allowed[e.entry_id] = grant
    return allowed


def compute_score(
    entries: Iterable[Scorable],
    policy: SubjectPolicy,
    as_of: datetime,
    *,
    categories: frozenset[str] | None = None,
    view: View = View.AS_KNOWN,
) -> ScoreResult:
    """The score, tier, lists and category breakdown of one subject's ledger under `policy`,
    exactly as it stood at `as_of` on `view`'s timeline.

    An entry counts at `as_of` when `counts_at` says so: known then (recorded by then on
    the as-known timeline, occurred by then on the corrected one, where void entries never
    count), `as_of` before its visible_until, and `as_of` in none of its pauses. Caps are
    computed over the entries known then (`known_at`), so a paused entry keeps its share of
    the cap and its contribution does not change when it counts again. `categories`
    restricts the ledger to a benefit's purpose (None: every category).
    """
    entries = list(entries)
    known = [
        e for e in entries if known_at(e, as_of, view) and (categories is None or e.category in categories)
    ]
    allowed = _capped_points(known, policy)
    points: dict[str, int] = {}
    counts: dict[str, int] = {}
    capped: dict[str, int] = {}
    counted: list[CountedEntry] = []
    upcoming: list[datetime] = []
    for e in sorted(known, key=lambda e: (e.occurred_at, e.entry_id)):
        until = visible_until(e, policy)
        # A pause that starts or ends later changes the score with no new event (a
        # dispute's deadline passing undecided); so may a void pause of an expired entry
        # (it frees cap), hence every known entry's boundaries.
        upcoming += [b for b in _boundaries(e) if b > as_of]
        if as_of >= until or any(p.covers(as_of) for p in _pauses(e) or ()):
            continue
        grant = allowed[e.entry_id]
        points[e.category] = points.get(e.category, 0) + grant
        counts[e.category] = counts.get(e.category, 0) + 1
        capped[e.category] = capped.get(e.category, 0) + (e.points - grant)
        counted.append(CountedEntry(e.entry_id, e.category, grant, e.points < 0, e.black_list, until))
    score = policy.clamp(policy.base + sum(points.values()))
    tier = policy.tier_of(score)
    return ScoreResult(
        score=score,
        tier=tier,
        policy_version=policy.version,
        categories=tuple(CategoryScore(c, points[c], counts[c], capped[c]) for c in sorted(points)),
        entry_count=len(counted),
        as_of=as_of,
        lists=_lists(tier, counted, policy),
        counted=tuple(counted),
        next_change_at=min(
            [*(c.visible_until for c in counted), *upcoming, *_arrivals(entries, as_of, view, categories)],
            default=None,
        ),
    )


def _arrivals(
    entries: Sequence[Scorable], as_of: datetime, view: View, categories: frozenset[str] | None
) -> Iterator[datetime]:
    # On the corrected timeline an entry recorded early with a future event time starts
    # counting at its occurred_at.
    if view is View.AS_CORRECTED:
        for e in entries:
            if e.occurred_at > as_of and (categories is None or e.category in categories):
                yield e.occurred_at


def on_lists(tier: str, negative: bool, flagged: bool, policy: SubjectPolicy) -> tuple[bool, bool]:
    """(red, black): whether a subject of `tier` is on each list, given whether any counting
    entry is negative and whether any is black-list flagged."""
    criteria = policy.lists
    red = tier in criteria.red_tiers and not (criteria.red_requires_no_negative and negative)
    black = tier in criteria.black_tiers or (criteria.black_on_flag and flagged)
    return red, black


def _lists(tier: str, counted: Sequence[CountedEntry], policy: SubjectPolicy) -> tuple[ListMembership, ...]:
    criteria = policy.lists
    memberships = []
    red, _ = on_lists(tier, any(c.negative for c in counted), False, policy)
    if red:
        reasons = [f"tier {tier}"]
        if criteria.red_requires_no_negative:
            reasons.append("no counting negative entry")
        memberships.append(ListMembership(RED, tuple(reasons)))
    black_reasons = []
    flagged = [c.entry_id for c in counted if c.black_list] if criteria.black_on_flag else []
    if tier in criteria.black_tiers:
        black_reasons.append(f"tier {tier}")
    if flagged:
        black_reasons.append(
            f"{len(flagged)} counting black-list-flagged entr{'y' if len(flagged) == 1 else 'ies'}"
        )
    if black_reasons:
        memberships.append(ListMembership(BLACK, tuple(black_reasons), tuple(flagged)))
    return tuple(memberships)


ENTRIES = "entries"
EXPIRY = "expiry"
POLICY = "policy"
# DISPUTE, REPAIR and CORRECTION (above) are causes too.


@dataclass(frozen=True)
class Change:
    """One history row: the score, tier or list membership changed at `changed_at`, or a
    due-process act happened then (those are written even when nothing changed).

    `ended_entry_ids` stopped counting by a decision, a correction or a dispute's lapse;
    `resumed_entry_ids` count again (a dispute upheld after its deadline); `note` says
    what happened ("dispute 7 filed", "event library/ev-9 retracted").
    """

    changed_at: datetime
    cause: str
    before: ScoreState | None
    after: ScoreResult
    added_entry_ids: tuple[str, ...] = ()
    expired_entry_ids: tuple[str, ...] = ()
    ended_entry_ids: tuple[str, ...] = ()
    resumed_entry_ids: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Event:
    """What happens at the end of a replay (its `until`): its history cause, the entries it
    adds, ends or resumes, and whether it is written even if nothing changed (`always`:
    every due-process act is part of the subject's history)."""

    cause: str
    added: tuple[str, ...] = ()
    ended: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()
    note: str = ""
    always: bool = False


def lapses_at(entries: Sequence[Scorable], at: datetime) -> list[tuple[str, str]]:
    """(dispute id, entry id) of every dispute whose deadline passes undecided at `at`."""
    found = []
    for e in entries:
        for p in _pauses(e) or ():
            if p.kind == DISPUTE and p.start == at and (p.end is None or p.end > at) and e.recorded_at < at:
                found.append((p.ref, e.entry_id))
    return sorted(found)


def _lapse_note(lapses: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"dispute {d} undecided at its deadline" for d, _ in lapses)


def replay(
    entries: Sequence[Scorable],
    policy: SubjectPolicy,
    *,
    before: ScoreState | None,
    since: datetime | None,
    until: datetime,
    added: Collection[str] = (),
    cause: str = ENTRIES,
    event: Event | None = None,
    view: View = View.AS_KNOWN,
) -> tuple[list[Change], ScoreResult]:
    """Every change between the state stored at `since` and `until`, at the instant it happened.

    With no new event, an entry stops or starts counting only at its visible_until or at
    a pause boundary (a dispute's deadline), so the instants to look at are those in
    (since, until); at `until` itself the `event` applies (new entries, a policy, a
    due-process act; `added`/`cause` are the older spelling of an ENTRIES or POLICY
    event). Expiry and a dispute's lapse therefore appear in history at the exact instant
    they took effect, however late the sweep that wrote them ran. A lapse is always
    written (cause DISPUTE), even when the score does not change.
    """
    if event is None:
        event = Event(cause, added=tuple(sorted(added))) if (added or cause == POLICY) else None
    instants: set[datetime] = set()
    if since is not None:
        for e in entries:
            for b in (visible_until(e, policy), *_boundaries(e)):
                if since < b < until and e.recorded_at < b:
                    instants.add(b)
    changes: list[Change] = []
    state = before
    result: ScoreResult | None = None
    for at in [*sorted(instants), until]:
        result = compute_score(entries, policy, at, view=view)
        expired = tuple(
            sorted(e.entry_id for e in entries if visible_until(e, policy) == at and e.recorded_at < at)
        )
        lapses = lapses_at(entries, at) if since is None or at > since else []
        final = at == until and event is not None
        if lapses:
            changes.append(
                Change(
                    at,
                    DISPUTE,
                    state,
                    result,
                    (),
                    expired,
                    ended_entry_ids=tuple(sorted({e for _, e in lapses})),
                    note=_lapse_note(lapses),
                )
            )
            state = result.state
            expired = ()
        if final:
            assert event is not None
            if result.state != state or event.always:
                changes.append(
                    Change(
                        at,
                        event.cause,
                        state,
                        result,
                        tuple(sorted(event.added)),
                        expired,
                        tuple(sorted(event.ended)),
                        tuple(sorted(event.resumed)),
                        event.note,
                    )
                )
        elif result.state != state and not lapses:
            changes.append(Change(at, EXPIRY, state, result, (), expired))
        state = result.state
    assert result is not None
    return changes, result


@dataclass(frozen=True)
class RuleRef:
    rule_id: str = ""
    rule_set: str = ""
    rule_set_version: int = 0
    title: str = ""
    description: str = ""
    legal_basis: str = ""


@dataclass(frozen=True)
class IncomingOutcome:
    """An outcome as delivered, before validation. `snapshot` is the serialized outcome,
    kept verbatim as the entry's evidence."""

    outcome_id: str
    subject_key: str
    subject_kind: str | None
    rule: RuleRef
    points: int
    category: str
    severity: str | None
    occurred_at: datetime | None
    reason: str
    black_list: bool
    snapshot: bytes


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: str
    subject_key: str
    subject_kind: str
    rule: RuleRef
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    visible_until: datetime
    reason: str
    black_list: bool
    snapshot: bytes


def outcome_violations(outcome: IncomingOutcome) -> list[Violation]:
    """Every problem of one outcome; empty when it can become a ledger entry."""
    problems = []
    for name, value, limit in (
        ("outcome_id", outcome.outcome_id, MAX_ID_LENGTH),
        ("subject_key", outcome.subject_key, MAX_SUBJECT_KEY_LENGTH),
        ("category", outcome.category, MAX_CATEGORY_LENGTH),
    ):
        if not value:
            problems.append(Violation(name, "is required", "REQUIRED"))
        elif len(value) > limit:
            problems.append(Violation(name, f"must be at most {limit} characters", "TOO_LONG"))
    for name, value in (("rule.rule_id", outcome.rule.rule_id), ("rule.rule_set", outcome.rule.rule_set)):
        if len(value) > MAX_ID_LENGTH:
            problems.append(Violation(name, f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    if outcome.subject_kind not in SUBJECT_KINDS:
        problems.append(Violation("subject_kind", "is required", "REQUIRED"))
    if outcome.severity not in SEVERITIES:
        problems.append(Violation("severity", "is required", "REQUIRED"))
    if outcome.occurred_at is None:
        problems.append(Violation("occurred_at", "is required", "REQUIRED"))
    return problems


@dataclass(frozen=True)
class Rejected:
    outcome_id: str
    violations: tuple[Violation, ...]


@dataclass(frozen=True)
class ApplyResult:
    applied: int
    duplicate: int
    subjects_updated: int
    rejected: tuple[Rejected, ...] = ()
    # Entries reversed by this batch's reversals.
    reversed: int = 0


@dataclass(frozen=True)
class IncomingReversal:
    """A reversal as delivered: the outcome to reverse and the retraction (or late event) behind it."""

    outcome_id: str
    subject_key: str
    source: str
    event_id: str
    reason: str
    retracted_at: datetime | None
    retracted_by: str
    cause: str = RETRACTION

    def record(self, now: datetime) -> ReversalRecord:
        return ReversalRecord(
            outcome_id=self.outcome_id,
            subject_key=self.subject_key,
            source=self.source,
            event_id=self.event_id,
            reason=self.reason,
            retracted_at=self.retracted_at,
            retracted_by=self.retracted_by,
            reversed_at=now,
            cause=self.cause,
        )


def reversal_violations(reversal: IncomingReversal) -> list[Violation]:
    problems = []
    if not reversal.outcome_id:
        problems.append(Violation("outcome_id", "is required", "REQUIRED"))
    elif len(reversal.outcome_id) > MAX_ID_LENGTH:
        problems.append(Violation("outcome_id", f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    if len(reversal.subject_key) > MAX_SUBJECT_KEY_LENGTH:
        problems.append(
            Violation(
                "retraction.subject_key", f"must be at most {MAX_SUBJECT_KEY_LENGTH} characters", "TOO_LONG"
            )
        )
    for name, value in (
        ("retraction.ref.source", reversal.source),
        ("retraction.ref.event_id", reversal.event_id),
    ):
        if len(value) > MAX_ID_LENGTH:
            problems.append(Violation(name, f"must be at most {MAX_ID_LENGTH} characters", "TOO_LONG"))
    return problems


def corrections(done: Sequence[ReversalRecord]) -> dict[str, Event]:
    """One CORRECTION history event per subject for the reversals just applied (their
    subject_key is the reversed entry's)."""
    by_subject: dict[str, list[ReversalRecord]] = {}
    for r in done:
        by_subject.setdefault(r.subject_key, []).append(r)
    return {
        key: Event(
            CORRECTION,
            ended=tuple(sorted({r.outcome_id for r in items})),
            note="; ".join(sorted({_correction_note(r) for r in items})),
            always=True,
        )
        for key, items in by_subject.items()
    }


def _correction_note(r: ReversalRecord) -> str:
    if r.cause == REGROUPED:
        return f"event {r.event} arrived late and regrouped"
    return f"event {r.event} retracted"


@dataclass(frozen=True)
class Reversed:
    reversed: int
    subjects_updated: int


@dataclass(frozen=True)
class Recorded:
    applied: int
    subjects_updated: int


@dataclass(frozen=True)
class SubjectLedger:
    """A subject's stored score row and its whole ledger.

    `stored` is None when no score row exists yet; `computed_at` is the instant the stored
    row was computed for.
    """

    subject_key: str
    subject_kind: str
    stored: ScoreState | None
    computed_at: datetime | None
    stored_policy_version: str
    entries: tuple[ScoredEntry, ...]

    @property
    def stored_score(self) -> int | None:
        return None if self.stored is None else self.stored.score

    @property
    def stored_tier(self) -> str | None:
        return None if self.stored is None else self.stored.tier


@dataclass(frozen=True)
class Rescored:
    """What the store writes for one subject: the new score row, its history rows, and the
    visible_until of entries whose period the policy changed."""

    result: ScoreResult
    changes: tuple[Change, ...]
    visible_until: Mapping[str, datetime]


Rescore = Callable[[SubjectLedger], Rescored]


class LedgerStore(Protocol):
    def record(self, entries: Sequence[LedgerEntry], rescore: Rescore) -> Recorded:
        """In one transaction: store each entry whose id is new, then rescore and store every
        subject that gained one (score row, categories, history rows)."""
        ...

    def recompute(self, subject_keys: Sequence[str], rescore: Rescore) -> int:
        """In one transaction: rescore and store the named subjects; returns how many."""
        ...

    def reverse(
        self, reversals: Sequence[ReversalRecord], rescore: Callable[[Sequence[ReversalRecord]], Rescore]
    ) -> Reversed:
        """In one transaction: store each reversal whose outcome id is new (with its audit
        record), mark reversed the entries that exist, and rescore their subjects with
        `rescore(applied)`, where `applied` are the new reversals of existing entries, with
        the entry's subject key. A reversal of an outcome not yet recorded waits for it."""
        ...

    def due_subjects(self, now: datetime, limit: int) -> list[str]:
        """Subjects whose stored score is due to change by `now` with no new entry."""
        ...

    def subjects_not_on(self, policy_version: str, after: str, limit: int) -> list[str]:
        """Subjects (key order, after `after`) whose stored score is from another policy."""
        ...

    def subject_pages(self, page_size: int) -> Iterator[Sequence[SubjectLedger]]:
        """Every subject that has ledger entries, in pages ordered by subject key."""
        ...

    def activations(self) -> list[ActivatedPolicy]:
        """Every policy activated so far, oldest first."""
        ...

    def save_activation(self, activation: ActivatedPolicy) -> None: ...


@dataclass(frozen=True)
class Mismatch:
    subject_key: str
    stored_score: int
    recomputed_score: int
    stored_tier: str
    recomputed_tier: str
    stored_lists: tuple[str, ...] = ()
    recomputed_lists: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    subjects_checked: int
    mismatch_count: int
    mismatches: tuple[Mismatch, ...] = ()
    swept: int = 0


@dataclass(frozen=True)
class Migration:
    """How many subjects of one kind move from one tier to another under a new policy."""

    subject_kind: str
    from_tier: str
    to_tier: str
    subjects: int


@dataclass(frozen=True)
class ListMove:
    subject_kind: str
    list_name: str
    entering: int
    leaving: int


@dataclass(frozen=True)
class PolicyReport:
    """A backtest of a policy over every stored subject, as of one instant."""

    current_version: str
    proposed_version: str
    as_of: datetime
    subjects: int
    score_changed: int
    tier_changed: int
    migrations: tuple[Migration, ...]
    list_moves: tuple[ListMove, ...]


def list_names(state: ScoreState | None) -> tuple[str, ...]:
    if state is None:
        return ()
    return tuple(n for n, on in ((RED, state.red), (BLACK, state.black)) if on)


class Ledger:
    """Applies outcomes to the ledger, sweeps expiry, changes the policy, and checks stored
    scores against recomputes."""

    def __init__(
        self,
        *,
        policies: PolicyBook,
        store: LedgerStore,
        clock: Callable[[], datetime],
        page_size: int = 1000,
    ) -> None:
        self._book = policies
        self._store = store
        self._clock = clock
        self._page_size = page_size

    @property
    def policy(self) -> ScorePolicy:
        return self._book.active

    @property
    def policies(self) -> PolicyBook:
        return self._book

    def _rescore(
        self,
        now: datetime,
        *,
        added: Collection[str] = (),
        cause: str = ENTRIES,
        previous: ScorePolicy | None = None,
        events: Mapping[str, Event] | None = None,
    ) -> Rescore:
        """The rescore of one subject at `now`: catch up on expiry and lapses since its
        stored row, then apply the event at `now` (new entries, `events[subject]` for a
        due-process act, or a policy change)."""
        chosen = self._book.active

        def rescore(subject: SubjectLedger) -> Rescored:
            kind_policy = chosen.for_kind(subject.subject_kind)
            mine = [e.entry_id for e in subject.entries if e.entry_id in added]
            if cause == POLICY:
                # Catch up on expiry under the old policy's stored results first; the new
                # policy then applies as one change at `now`.
                changes, result = replay(
                    subject.entries, kind_policy, before=subject.stored, since=None, until=now, cause=POLICY
                )
            else:
                changes, result = replay(
                    subject.entries,
                    kind_policy,
                    before=subject.stored,
                    since=subject.computed_at if subject.stored is not None else None,
                    until=now,
                    added=mine,
                    cause=cause,
                    event=None if events is None else events.get(subject.subject_key),
                )
            periods: dict[str, datetime] = {}
            changed_periods = previous is None or dict(
                previous.for_kind(subject.subject_kind).visibility_days
            ) != dict(kind_policy.visibility_days)
            if cause == POLICY and changed_periods:
                # The stored visible_until shows the period in force; a new period rewrites it.
                periods = {e.entry_id: visible_until(e, kind_policy) for e in subject.entries}
            return Rescored(result, tuple(changes), periods)

        return rescore

    def rescorer(self, now: datetime, events: Mapping[str, Event]) -> Rescore:
        """The rescore for due-process acts at `now`: `events` by subject key."""
        return self._rescore(now, cause=EXPIRY, events=events)

    def apply(
        self, outcomes: Sequence[IncomingOutcome], reversals: Sequence[IncomingReversal] = ()
    ) -> ApplyResult:
        """Record a batch, then its reversals; invalid ones are skipped, never block the others."""
        now = self._clock()
        rejected: list[Rejected] = []
        fresh: dict[str, LedgerEntry] = {}
        duplicate = 0
        for outcome in outcomes:
            violations = outcome_violations(outcome)
            if violations:
                rejected.append(Rejected(outcome.outcome_id, tuple(violations)))
            elif outcome.outcome_id in fresh:
                duplicate += 1
            else:
                fresh[outcome.outcome_id] = self._entry(outcome, now)
        recorded = (
            self._store.record(list(fresh.values()), self._rescore(now, added=set(fresh)))
            if fresh
            else Recorded(0, 0)
        )
        wanted: dict[str, ReversalRecord] = {}
        for reversal in reversals:
            violations = reversal_violations(reversal)
            if violations:
                rejected.append(Rejected(reversal.outcome_id, tuple(violations)))
            else:
                wanted.setdefault(reversal.outcome_id, reversal.record(now))
        reversed_ = (
            self._store.reverse(
                list(wanted.values()), lambda done: self._rescore(now, events=corrections(done))
            )
            if wanted
            else Reversed(0, 0)
        )
        return ApplyResult(
            applied=recorded.applied,
            duplicate=duplicate + len(fresh) - recorded.applied,
            subjects_updated=recorded.subjects_updated + reversed_.subjects_updated,
            rejected=tuple(rejected),
            reversed=reversed_.reversed,
        )

    def _entry(self, outcome: IncomingOutcome, now: datetime) -> LedgerEntry:
        assert outcome.subject_kind is not None
        assert outcome.severity is not None
        assert outcome.occurred_at is not None
        policy = self._book.active.for_kind(outcome.subject_kind)
        return LedgerEntry(
            entry_id=outcome.outcome_id,
            subject_key=outcome.subject_key,
            subject_kind=outcome.subject_kind,
            rule=outcome.rule,
            points=outcome.points,
            category=outcome.category,
            severity=outcome.severity,
            status=EntryStatus.ACTIVE,
            occurred_at=outcome.occurred_at,
            recorded_at=now,
            visible_until=outcome.occurred_at + policy.visibility(outcome.severity),
            reason=outcome.reason,
            black_list=outcome.black_list,
            snapshot=outcome.snapshot,
        )

    def sweep(self, now: datetime | None = None) -> int:
        """Recompute every subject whose entries expired by `now`, writing a history row at
        each instant its score, tier or lists changed. Returns subjects recomputed."""
        now = now or self._clock()
        total = 0
        while True:
            keys = self._store.due_subjects(now, self._page_size)
            if not keys:
                return total
            total += self._store.recompute(keys, self._rescore(now, cause=EXPIRY))

    def catch_up_policy(self, now: datetime | None = None, previous: ScorePolicy | None = None) -> int:
        """Recompute subjects still stored under an older policy (an activation that was
        interrupted, or a restart after one); each gets a `policy` history row."""
        now = now or self._clock()
        total = 0
        after = ""
        version = self._book.active.version
        while True:
            keys = self._store.subjects_not_on(version, after, self._page_size)
            if not keys:
                return total
            total += self._store.recompute(keys, self._rescore(now, cause=POLICY, previous=previous))
            after = keys[-1]

    def preview(self, proposed: ScorePolicy, now: datetime | None = None) -> PolicyReport:
        """Every stored subject scored as of `now` under the active and the proposed policy:
        the tier migration matrix and list moves, like a rules backtest. Writes nothing."""
        now = now or self._clock()
        current = self._book.active
        matrix: dict[tuple[str, str, str], int] = {}
        moves: dict[tuple[str, str], list[int]] = {}
        subjects = score_changed = tier_changed = 0
        for page in self._store.subject_pages(self._page_size):
            for subject in page:
                subjects += 1
                old = compute_score(subject.entries, current.for_kind(subject.subject_kind), now)
                new = compute_score(subject.entries, proposed.for_kind(subject.subject_kind), now)
                key = (subject.subject_kind, old.tier, new.tier)
                matrix[key] = matrix.get(key, 0) + 1
                score_changed += old.score != new.score
                tier_changed += old.tier != new.tier
                for name in (RED, BLACK):
                    was, now_on = old.on_list(name) is not None, new.on_list(name) is not None
                    if was != now_on:
                        counts = moves.setdefault((subject.subject_kind, name), [0, 0])
                        counts[0 if now_on else 1] += 1
        return PolicyReport(
            current_version=current.version,
            proposed_version=proposed.version,
            as_of=now,
            subjects=subjects,
            score_changed=score_changed,
            tier_changed=tier_changed,
            migrations=tuple(Migration(k, f, t, n) for (k, f, t), n in sorted(matrix.items())),
            list_moves=tuple(ListMove(k, name, e, lv) for (k, name), (e, lv) in sorted(moves.items())),
        )

    def activate(
        self, proposed: ScorePolicy, document: str, activated_by: str, expected_current: str = ""
    ) -> tuple[PolicyReport, int]:
        """Make `proposed` the active policy and recompute every subject under it.

        Expiry under the old policy is swept first, so history tells the two causes apart.
        The activation is recorded (who, when, the document) before the recompute, so a
        crash half way is finished by `catch_up_policy` at the next start.
        """
        if not activated_by.strip():
            raise InvalidArgument("invalid request", [Violation("activated_by", "is required", "REQUIRED")])
        if expected_current and expected_current != self._book.active.version:
            raise FailedPrecondition(
                f"the active policy is {self._book.active.version!r}, not {expected_current!r}"
            )
        if proposed.version in self._book.versions():
            raise AlreadyExists(
                f"policy version {proposed.version!r} was activated before; versions are immutable",
                reason="POLICY_VERSION_EXISTS",
            )
        now = self._clock()
        self.sweep(now)
        report = self.preview(proposed, now)
        activation = ActivatedPolicy(proposed, now, activated_by.strip(), document)
        previous = self._book.active
        self._store.save_activation(activation)
        self._book = PolicyBook((*self._book.activations, activation))
        return report, self.catch_up_policy(now, previous)

    def sweep_now(self) -> tuple[datetime, int]:
        """Sweep up to the clock's now; returns that instant and the subjects recomputed."""
        now = self._clock()
        return now, self.sweep(now)

    def verify(
        self, max_mismatches: int, page_size: int = 1000, swept: tuple[datetime, int] | None = None
    ) -> VerifyResult:
        """Sweep expiry up to now (unless the caller just did: `swept`), then recompute every
        subject as of that instant (or as of its stored row, when a batch stored it after
        verify began) and report those that differ."""
        now, swept_count = swept or self.sweep_now()
        checked = 0
        mismatches: list[Mismatch] = []
        count = 0
        for page in self._store.subject_pages(page_size):
            for subject in page:
                checked += 1
                as_of = max(now, subject.computed_at or now)
                result = compute_score(subject.entries, self.policy.for_kind(subject.subject_kind), as_of)
                if subject.stored == result.state and subject.stored_policy_version == result.policy_version:
                    continue
                count += 1
                if len(mismatches) < max_mismatches:
                    mismatches.append(
                        Mismatch(
                            subject_key=subject.subject_key,
                            stored_score=subject.stored_score or 0,
                            recomputed_score=result.score,
                            stored_tier=subject.stored_tier or "",
                            recomputed_tier=result.tier,
                            stored_lists=list_names(subject.stored),
                            recomputed_lists=list_names(result.state),
                        )
                    )
        return VerifyResult(
            subjects_checked=checked, mismatch_count=count, mismatches=tuple(mismatches), swept=swept_count
        )
