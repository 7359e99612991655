"""The ledger and the score (pure domain).

Each outcome of a rule firing becomes exactly one ledger entry, keyed by its
outcome id, so redelivery by the rules outbox has no effect. A subject's score is a
pure function of its ledger, the policy and an instant (`compute_score`): the store keeps
the result, with the instant it next changes by expiry, only so that reads are cheap;
`Ledger.sweep` recomputes subjects whose entries expired and `Ledger.verify` proves the
stored results still match.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Protocol

from kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Violation
from kit.vocabulary import SEVERITIES, SUBJECT_KINDS
from services.score.policy import ActivatedPolicy, PolicyBook, ScorePolicy, SubjectPolicy

MAX_ID_LENGTH = 128
MAX_SUBJECT_KEY_LENGTH = 64
MAX_CATEGORY_LENGTH = 64


class EntryStatus(Enum):
    ACTIVE = "active"
    DISPUTED = "disputed"
    REVERSED = "reversed"
    REPAIRED = "repaired"
    EXPIRED = "expired"


# Only active entries count; disputes and repairs (due-process issue) will widen or
# narrow this without touching the arithmetic. Expiry is not a status: whether an entry
# is visible is a function of the instant asked about (`visible_until`).
COUNTING = frozenset({EntryStatus.ACTIVE})

RED = "red"
BLACK = "black"


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
    """The part of a ledger entry the score depends on."""

    entry_id: str
    points: int
    category: str
    severity: str
    status: EntryStatus
    occurred_at: datetime
    recorded_at: datetime
    black_list: bool = False


def visible_until(entry: Scorable, policy: SubjectPolicy) -> datetime:
    """The first instant at which `entry` no longer counts under `policy`."""
    return entry.occurred_at + policy.visibility(entry.severity)


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
    # When the score next changes with no new entry (the earliest visible_until of a
    # counting entry); None when nothing is due to expire.
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
) -> ScoreResult:
    """The score, tier, lists and category breakdown of one subject's ledger under `policy`,
    exactly as it stood at `as_of`.

    An entry counts at `as_of` when its status counts, it was recorded at or before `as_of`
    and `as_of` is before its visible_until. `categories` restricts the ledger to a
    benefit's purpose (None: every category).
    """
    known = [
        e
        for e in entries
        if e.status in COUNTING
        and e.recorded_at <= as_of
        and (categories is None or e.category in categories)
    ]
    allowed = _capped_points(known, policy)
    points: dict[str, int] = {}
    counts: dict[str, int] = {}
    capped: dict[str, int] = {}
    counted: list[CountedEntry] = []
    for e in sorted(known, key=lambda e: (e.occurred_at, e.entry_id)):
        until = visible_until(e, policy)
        if as_of >= until:
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
        next_change_at=min((c.visible_until for c in counted), default=None),
    )


def _lists(tier: str, counted: Sequence[CountedEntry], policy: SubjectPolicy) -> tuple[ListMembership, ...]:
    criteria = policy.lists
    memberships = []
    negatives = [c.entry_id for c in counted if c.negative]
    if tier in criteria.red_tiers and not (criteria.red_requires_no_negative and negatives):
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


@dataclass(frozen=True)
class Change:
    """One history event: the score, tier or list membership changed at `changed_at`."""

    changed_at: datetime
    cause: str
    before: ScoreState | None
    after: ScoreResult
    added_entry_ids: tuple[str, ...] = ()
    expired_entry_ids: tuple[str, ...] = ()


def replay(
    entries: Sequence[Scorable],
    policy: SubjectPolicy,
    *,
    before: ScoreState | None,
    since: datetime | None,
    until: datetime,
    added: Collection[str] = (),
    cause: str = ENTRIES,
) -> tuple[list[Change], ScoreResult]:
    """Every change between the state stored at `since` and `until`, at the instant it happened.

    Entries only expire between two recomputes, so the instants to look at are the
    visible_until values in (since, until); at `until` itself new entries (`added`) or a new
    policy (`cause`) may also apply. Expiry therefore appears in history at the exact instant
    an entry stopped counting, however late the sweep that wrote it ran.
    """
    instants: set[datetime] = set()
    if since is not None:
        for e in entries:
            end = visible_until(e, policy)
            if since < end < until and e.recorded_at < end:
                instants.add(end)
    changes: list[Change] = []
    state = before
    result: ScoreResult | None = None
    for at in [*sorted(instants), until]:
        result = compute_score(entries, policy, at)
        if result.state == state:
            continue
        expired = tuple(
            sorted(e.entry_id for e in entries if visible_until(e, policy) == at and e.recorded_at < at)
        )
        if at == until and (added or cause == POLICY):
            changes.append(Change(at, cause, state, result, tuple(sorted(added)), expired))
        else:
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
    ) -> Rescore:
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

    def apply(self, outcomes: Sequence[IncomingOutcome]) -> ApplyResult:
        """Record a batch; invalid outcomes are skipped, never block the others."""
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
        return ApplyResult(
            applied=recorded.applied,
            duplicate=duplicate + len(fresh) - recorded.applied,
            subjects_updated=recorded.subjects_updated,
            rejected=tuple(rejected),
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
