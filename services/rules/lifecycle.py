"""The rule-set lifecycle (pure domain): drafts, immutable published versions, the one
active rule set, retirement, and the audit trail of every change.

A stored rule set is a draft, published or retired. "Active" is not a fourth state
of the row but a single pointer to one published rule set, so there is exactly one
active rule set at any time and activating another is one update of that pointer,
committed with its audit row. The evaluator compares the pointer with the rule set it
holds at the start of every batch (services/rules/domain.py), which is how a swap
reaches every replica without a restart.

The version is the one written in the source: it is what every outcome records as
rule id@version, so a reviewer reading a ledger entry finds the exact text. Publishing
requires it to be greater than every published version of the same name, so a name's
versions only increase and (name, version) names one immutable text.

Who made a change comes from the caller: the servicer reads it from the call (the
authenticated principal, else the x-egret-actor metadata) and passes it down as an Actor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, Protocol, TypeAlias

from domain.ruleset.model import RuleSet, RuleSetError
from kit.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from kit.page_tokens import PageTokens

State: TypeAlias = Literal["draft", "published", "retired"]
Status: TypeAlias = Literal["draft", "published", "active", "retired"]
Action: TypeAlias = Literal["create_draft", "publish", "activate", "retire", "import", "redrive"]

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
# Rule-set sources are reviewed by people; anything larger is a mistake or an attack.
MAX_SOURCE_BYTES: Final = 1024 * 1024
MAX_ACTOR_LENGTH: Final = 128
ANONYMOUS: Final = "anonymous"


@dataclass(frozen=True)
class StoredRuleSet:
    rule_set_id: int
    name: str
    version: int
    state: State
    active: bool
    source: str
    source_sha256: str
    created_at: datetime
    created_by: str
    published_at: datetime | None = None
    published_by: str | None = None
    activated_at: datetime | None = None
    activated_by: str | None = None
    retired_at: datetime | None = None
    retired_by: str | None = None

    @property
    def status(self) -> Status:
        return "active" if self.active else self.state


@dataclass(frozen=True)
class Actor:
    """Who makes a change, as the servicer read it from the call: the name recorded with
    it, and the authenticated principal's role (None for a name the caller claims, in
    insecure mode, or for the service itself)."""

    name: str
    role: str | None = None

    @property
    def audit_role(self) -> str:
        """The role rules' audit log names: the principal's, "system" for the service
        itself ("system:..." at start-up), else "unauthenticated"."""
        if self.role is not None:
            return self.role
        return "system" if self.name.startswith("system:") else "unauthenticated"


SYSTEM_IMPORT: Final = Actor("system:import")


@dataclass(frozen=True)
class Change:
    """One audited change: what happened to which rule set, by whom, when. ``role`` is the
    actor's role in the audit log; the change table does not keep it (empty when read back)."""

    rule_set_id: int | None
    action: Action
    actor: str
    at: datetime
    detail: Mapping[str, object] = field(default_factory=dict)
    role: str = ""


@dataclass(frozen=True)
class RecordedChange:
    change_id: int
    change: Change


@dataclass(frozen=True)
class ActivePointer:
    rule_set_id: int
    activated_at: datetime


class LifecycleUnit(Protocol):
    """One transaction over the stored rule sets; everything commits together or not at all."""

    def get(self, rule_set_id: int, *, lock: bool = False) -> StoredRuleSet | None: ...

    def find_published(self, name: str, version: int) -> StoredRuleSet | None: ...

    def latest_published_version(self, name: str) -> int | None: ...

    def active_id(self, *, lock: bool = False) -> int | None: ...

    def add_draft(self, rule_set: RuleSet, source: str, actor: str, now: datetime) -> int: ...

    def mark_published(self, rule_set_id: int, actor: str, now: datetime) -> None: ...

    def set_active(self, rule_set_id: int, actor: str, now: datetime) -> None: ...

    def mark_retired(self, rule_set_id: int, actor: str, now: datetime) -> None: ...

    def record(self, change: Change) -> None: ...


class LifecycleStore(Protocol):
    def unit(self) -> AbstractContextManager[LifecycleUnit]: ...

    def get(self, rule_set_id: int) -> StoredRuleSet | None: ...

    def active(self) -> ActivePointer | None: ...

    def list(
        self, *, after: int | None, limit: int, name: str | None, status: Status | None
    ) -> Sequence[StoredRuleSet]: ...

    def changes(
        self, *, rule_set_id: int | None, after: int | None, limit: int
    ) -> Sequence[RecordedChange]: ...

    def record(self, change: Change) -> None: ...


@dataclass(frozen=True)
class Page:
    items: tuple[StoredRuleSet, ...]
    next_page_token: str


@dataclass(frozen=True)
class ChangePage:
    items: tuple[RecordedChange, ...]
    next_page_token: str


@dataclass(frozen=True)
class Activation:
    rule_set: StoredRuleSet
    previous_rule_set_id: int | None


def rule_set_violations(error: RuleSetError) -> list[Violation]:
    """One field violation per problem, the field being "source" and the problem's path.

    domain.ruleset.parsing writes each problem as "<path>: <message>" when it has a path inside
    the document (name, version, rules[i] (id).field...), otherwise as plain text.
    """
    violations = []
    for problem in error.errors:
        path, separator, message = problem.partition(": ")
        if separator and path.split("[", 1)[0].split(" ", 1)[0] in ("name", "version", "rules"):
            violations.append(Violation(f"source.{path}", message, "INVALID_RULE_SET"))
        else:
            violations.append(Violation("source", problem, "INVALID_RULE_SET"))
    return violations


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(
            "invalid page size", [Violation("page_size", "must not be negative", "OUT_OF_RANGE")]
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def decode_page_token(tokens: PageTokens, token: str, *, bound_to: Mapping[str, object]) -> int | None:
    """The id a page ended at, or None for the first page (kit.page_tokens checks the token)."""
    after = tokens.decode(token, bound_to=bound_to)
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
        raise InvalidArgument(
            "invalid page token",
            [Violation("page_token", "is not a page token of this query", "INVALID_PAGE_TOKEN")],
        )
    return after


def actor_name(value: str | None) -> str:
    """The recorded actor: the caller's claim, trimmed, or "anonymous"."""
    actor = (value or "").strip()
    if not actor:
        return ANONYMOUS
    if len(actor) > MAX_ACTOR_LENGTH or not actor.isprintable():
        raise InvalidArgument(
            "invalid actor",
            [
                Violation(
                    "x-egret-actor",
                    f"must be printable text of at most {MAX_ACTOR_LENGTH} characters",
                    "INVALID_ACTOR",
                )
            ],
        )
    return actor


class RuleSetLifecycle:
    """Draft → published → (active) → retired, each step checked and audited in one transaction."""

    def __init__(
        self,
        store: LifecycleStore,
        *,
        validate: Callable[[str], RuleSet],
        clock: Callable[[], datetime],
        tokens: PageTokens,
    ) -> None:
        # validate parses the source and compiles it for the engine, so that what
        # durable-rules would refuse is refused here, before anyone can activate it.
        self._store = store
        self._validate = validate
        self._clock = clock
        # Signs the page tokens of this service's list RPCs (kit.page_tokens).
        self.tokens = tokens

    def validate(self, source: str) -> RuleSet:
        """The rule set the source describes; raises RuleSetError listing every problem."""
        if len(source.encode()) > MAX_SOURCE_BYTES:
            raise RuleSetError([f"the source is larger than {MAX_SOURCE_BYTES} bytes"])
        return self._validate(source)

    def create_draft(self, source: str, actor: Actor) -> StoredRuleSet:
        try:
            rule_set = self.validate(source)
        except RuleSetError as error:
            raise InvalidArgument("invalid rule set", rule_set_violations(error)) from error
        now = self._clock()
        with self._store.unit() as unit:
            rule_set_id = unit.add_draft(rule_set, source, actor.name, now)
            unit.record(
                Change(
                    rule_set_id,
                    "create_draft",
                    actor.name,
                    now,
                    {
                        "name": rule_set.name,
                        "version": rule_set.version,
                        "source_sha256": source_sha256(source),
                    },
                    actor.audit_role,
                )
            )
            return _required(unit.get(rule_set_id), rule_set_id)

    def publish(self, rule_set_id: int, actor: Actor) -> StoredRuleSet:
        now = self._clock()
        with self._store.unit() as unit:
            stored = _required(unit.get(rule_set_id, lock=True), rule_set_id)
            if stored.state != "draft":
                raise FailedPrecondition(
                    f"rule set {rule_set_id} is {stored.status}; only a draft can be published"
                )
            latest = unit.latest_published_version(stored.name)
            if latest is not None and stored.version <= latest:
                raise FailedPrecondition(
                    f"{stored.name} version {stored.version} must be greater than its latest "
                    f"published version {latest}: raise the version in the source and create a new draft"
                )
            unit.mark_published(rule_set_id, actor.name, now)
            unit.record(
                Change(
                    rule_set_id,
                    "publish",
                    actor.name,
                    now,
                    {"name": stored.name, "version": stored.version},
                    actor.audit_role,
                )
            )
            return _required(unit.get(rule_set_id), rule_set_id)

    def activate(self, rule_set_id: int, actor: Actor) -> Activation:
        now = self._clock()
        with self._store.unit() as unit:
            previous = unit.active_id(lock=True)
            stored = _required(unit.get(rule_set_id, lock=True), rule_set_id)
            if stored.active:
                # A retried call must not fail, and nothing changed, so nothing is recorded.
                return Activation(stored, None)
            if stored.state != "published":
                raise FailedPrecondition(
                    f"rule set {rule_set_id} is {stored.status}; only a published rule set can be activated"
                )
            unit.set_active(rule_set_id, actor.name, now)
            unit.record(
                Change(
                    rule_set_id,
                    "activate",
                    actor.name,
                    now,
                    {"name": stored.name, "version": stored.version, "previous_rule_set_id": previous},
                    actor.audit_role,
                )
            )
            return Activation(_required(unit.get(rule_set_id), rule_set_id), previous)

    def retire(self, rule_set_id: int, actor: Actor) -> StoredRuleSet:
        now = self._clock()
        with self._store.unit() as unit:
            unit.active_id(lock=True)  # serialises with a concurrent activation of this rule set
            stored = _required(unit.get(rule_set_id, lock=True), rule_set_id)
            if stored.active:
                raise FailedPrecondition(
                    f"rule set {rule_set_id} is active; activate another rule set before retiring it"
                )
            if stored.state == "retired":
                raise FailedPrecondition(f"rule set {rule_set_id} is already retired")
            unit.mark_retired(rule_set_id, actor.name, now)
            unit.record(
                Change(
                    rule_set_id,
                    "retire",
                    actor.name,
                    now,
                    {"name": stored.name, "version": stored.version, "from": stored.state},
                    actor.audit_role,
                )
            )
            return _required(unit.get(rule_set_id), rule_set_id)

    def ensure_active(self, source: str, actor: Actor = SYSTEM_IMPORT) -> tuple[StoredRuleSet, bool]:
        """At start-up: import and activate `source` unless a rule set is already active.

        Returns the active rule set and whether it was imported now. Once a rule set is
        active, the database is the source of truth and the file is ignored.
        """
        now = self._clock()
        with self._store.unit() as unit:
            active = unit.active_id(lock=True)
            if active is not None:
                return _required(unit.get(active), active), False
            rule_set = self.validate(source)
            existing = unit.find_published(rule_set.name, rule_set.version)
            if existing is not None and existing.source_sha256 != source_sha256(source):
                raise FailedPrecondition(
                    f"{rule_set.name} version {rule_set.version} is already published with different "
                    "source; raise the version in the rule-set file or activate a rule set through the API"
                )
            if existing is not None and existing.state == "retired":
                raise FailedPrecondition(
                    f"{rule_set.name} version {rule_set.version} is retired; it cannot be activated again"
                )
            if existing is None:
                rule_set_id = unit.add_draft(rule_set, source, actor.name, now)
                unit.mark_published(rule_set_id, actor.name, now)
            else:
                rule_set_id = existing.rule_set_id
            unit.set_active(rule_set_id, actor.name, now)
            unit.record(
                Change(
                    rule_set_id,
                    "import",
                    actor.name,
                    now,
                    {
                        "name": rule_set.name,
                        "version": rule_set.version,
                        "source_sha256": source_sha256(source),
                    },
                    actor.audit_role,
                )
            )
            return _required(unit.get(rule_set_id), rule_set_id), True

    def record_redrive(self, actor: Actor, detail: Mapping[str, object]) -> None:
        """Dead letters are no rule set's, but redriving them emits outcomes: audited too."""
        self._store.record(Change(None, "redrive", actor.name, self._clock(), detail, actor.audit_role))

    def get(self, rule_set_id: int) -> StoredRuleSet:
        return _required(self._store.get(rule_set_id), rule_set_id)

    def active(self) -> StoredRuleSet:
        pointer = self._store.active()
        if pointer is None:
            raise FailedPrecondition("no rule set is active")
        return self.get(pointer.rule_set_id)

    def list(self, *, name: str | None, status: Status | None, requested_size: int, page_token: str) -> Page:
        limit = page_size(requested_size)
        binding = {"method": "ListRuleSets", "name": name, "status": status}
        after = decode_page_token(self.tokens, page_token, bound_to=binding)
        rows = list(self._store.list(after=after, limit=limit + 1, name=name, status=status))
        more = len(rows) > limit
        rows = rows[:limit]
        token = self.tokens.encode(rows[-1].rule_set_id, bound_to=binding) if more else ""
        return Page(tuple(rows), token)

    def changes(self, *, rule_set_id: int | None, requested_size: int, page_token: str) -> ChangePage:
        limit = page_size(requested_size)
        binding = {"method": "ListRuleSetChanges", "rule_set_id": rule_set_id}
        after = decode_page_token(self.tokens, page_token, bound_to=binding)
        rows = list(self._store.changes(rule_set_id=rule_set_id, after=after, limit=limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        token = self.tokens.encode(rows[-1].change_id, bound_to=binding) if more else ""
        return ChangePage(tuple(rows), token)


def _required(stored: StoredRuleSet | None, rule_set_id: int) -> StoredRuleSet:
    if stored is None:
        raise NotFound(f"no rule set {rule_set_id}")
    return stored
