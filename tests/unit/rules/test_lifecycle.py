"""The rule-set lifecycle and failure isolation, pure: no database, no gRPC."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from domain.ruleset.model import EngineEvent, Firing, RuleSet, RuleSetError
from domain.ruleset.parsing import rule_set_from_yaml
from kit.errors import FailedPrecondition, InvalidArgument, NotFound
from kit.page_tokens import PageTokens
from services.rules.batch import in_evaluation_order, isolate
from services.rules.evaluated import Evaluated, EvaluationFailure, RuleEngineError, RuleEvaluationError
from services.rules.lifecycle import (
    ActivePointer,
    Actor,
    Change,
    RecordedChange,
    RuleSetLifecycle,
    Status,
    StoredRuleSet,
    decode_page_token,
    rule_set_violations,
    source_sha256,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
SOURCE = """\
name: unit
version: {version}
rules:
  - id: r
    title: R
    event_types: [t]
    points: -1
    category: c
    severity: minor
    legal_basis: l
    reason: because
"""


class MemoryUnit:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def get(self, rule_set_id: int, *, lock: bool = False) -> StoredRuleSet | None:
        row = self.store.rows.get(rule_set_id)
        return None if row is None else replace(row, active=row.rule_set_id == self.store.active_id)

    def find_published(self, name: str, version: int) -> StoredRuleSet | None:
        return next(
            (
                self.get(r.rule_set_id)
                for r in self.store.rows.values()
                if (r.name, r.version) == (name, version) and r.published_at is not None
            ),
            None,
        )

    def latest_published_version(self, name: str) -> int | None:
        versions = [r.version for r in self.store.rows.values() if r.name == name and r.published_at]
        return max(versions, default=None)

    def active_id(self, *, lock: bool = False) -> int | None:
        return self.store.active_id

    def add_draft(self, rule_set: RuleSet, source: str, actor: str, now: datetime) -> int:
        rule_set_id = len(self.store.rows) + 1
        self.store.rows[rule_set_id] = StoredRuleSet(
            rule_set_id,
            rule_set.name,
            rule_set.version,
            "draft",
            False,
            source,
            source_sha256(source),
            now,
            actor,
        )
        return rule_set_id

    def mark_published(self, rule_set_id: int, actor: str, now: datetime) -> None:
        row = self.store.rows[rule_set_id]
        self.store.rows[rule_set_id] = replace(row, state="published", published_at=now, published_by=actor)

    def set_active(self, rule_set_id: int, actor: str, now: datetime) -> None:
        self.store.active_id = rule_set_id
        row = self.store.rows[rule_set_id]
        self.store.rows[rule_set_id] = replace(row, activated_at=now, activated_by=actor)

    def mark_retired(self, rule_set_id: int, actor: str, now: datetime) -> None:
        row = self.store.rows[rule_set_id]
        self.store.rows[rule_set_id] = replace(row, state="retired", retired_at=now, retired_by=actor)

    def record(self, change: Change) -> None:
        self.store.log.append(change)


class MemoryStore:
    def __init__(self) -> None:
        self.rows: dict[int, StoredRuleSet] = {}
        self.active_id: int | None = None
        self.log: list[Change] = []

    @contextmanager
    def unit(self) -> Iterator[MemoryUnit]:
        # All or nothing, like the database transaction.
        saved = (dict(self.rows), self.active_id, list(self.log))
        try:
            yield MemoryUnit(self)
        except BaseException:
            self.rows, self.active_id, self.log = saved
            raise

    def get(self, rule_set_id: int) -> StoredRuleSet | None:
        return MemoryUnit(self).get(rule_set_id)

    def active(self) -> ActivePointer | None:
        return None if self.active_id is None else ActivePointer(self.active_id, NOW)

    def list(
        self, *, after: int | None, limit: int, name: str | None, status: Status | None
    ) -> Sequence[StoredRuleSet]:
        rows = [self.get(i) for i in sorted(self.rows) if after is None or i > after]
        return [r for r in rows if r is not None and (status is None or r.status == status)][:limit]

    def changes(self, *, rule_set_id: int | None, after: int | None, limit: int) -> Sequence[RecordedChange]:
        return [RecordedChange(i + 1, c) for i, c in enumerate(self.log)][:limit]

    def record(self, change: Change) -> None:
        self.log.append(change)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def lifecycle(store: MemoryStore) -> RuleSetLifecycle:
    return RuleSetLifecycle(
        store, validate=rule_set_from_yaml, clock=lambda: NOW, tokens=PageTokens.development()
    )


def test_the_file_is_imported_once_then_the_database_wins(
    lifecycle: RuleSetLifecycle, store: MemoryStore
) -> None:
    imported, fresh = lifecycle.ensure_active(SOURCE.format(version=1))
    assert fresh
    assert imported.status == "active"
    again, fresh_again = lifecycle.ensure_active(SOURCE.format(version=7))
    assert not fresh_again
    assert again.rule_set_id == imported.rule_set_id
    assert [c.action for c in store.log] == ["import"]


def test_an_import_never_overwrites_a_published_version_with_other_text(
    lifecycle: RuleSetLifecycle, store: MemoryStore
) -> None:
    draft = lifecycle.create_draft(SOURCE.format(version=1), Actor("alice"))
    lifecycle.publish(draft.rule_set_id, Actor("alice"))
    with pytest.raises(FailedPrecondition, match="different source"):
        lifecycle.ensure_active(SOURCE.format(version=1) + "# edited\n")
    assert store.active_id is None
    assert [c.action for c in store.log] == ["create_draft", "publish"]


def test_each_step_checks_the_state_and_records_who(lifecycle: RuleSetLifecycle, store: MemoryStore) -> None:
    first = lifecycle.create_draft(SOURCE.format(version=1), Actor("alice")).rule_set_id
    with pytest.raises(FailedPrecondition, match="only a published"):
        lifecycle.activate(first, Actor("bob"))
    lifecycle.publish(first, Actor("bob"))
    with pytest.raises(FailedPrecondition, match="only a draft"):
        lifecycle.publish(first, Actor("bob"))
    assert lifecycle.activate(first, Actor("carol")).previous_rule_set_id is None
    assert lifecycle.activate(first, Actor("carol")).previous_rule_set_id is None  # no-op, not recorded
    with pytest.raises(FailedPrecondition, match="is active"):
        lifecycle.retire(first, Actor("dave"))
    older = lifecycle.create_draft(SOURCE.format(version=1), Actor("alice")).rule_set_id
    with pytest.raises(FailedPrecondition, match="must be greater"):
        lifecycle.publish(older, Actor("bob"))
    with pytest.raises(NotFound):
        lifecycle.publish(99, Actor("bob"))
    assert [(c.action, c.actor) for c in store.log] == [
        ("create_draft", "alice"),
        ("publish", "bob"),
        ("activate", "carol"),
        ("create_draft", "alice"),
    ]


def test_a_change_carries_the_role_the_audit_log_names(
    lifecycle: RuleSetLifecycle, store: MemoryStore
) -> None:
    lifecycle.ensure_active(SOURCE.format(version=1))
    lifecycle.create_draft(SOURCE.format(version=2), Actor("alice", "admin"))
    lifecycle.create_draft(SOURCE.format(version=3), Actor("bob"))
    assert [(c.actor, c.role) for c in store.log] == [
        ("system:import", "system"),
        ("alice", "admin"),
        ("bob", "unauthenticated"),
    ]


def test_an_invalid_draft_reports_every_problem_as_a_field() -> None:
    with pytest.raises(RuleSetError) as raised:
        rule_set_from_yaml("name: ''\nversion: 0\nrules: []\n")
    assert [v.field for v in rule_set_violations(raised.value)] == [
        "source.name",
        "source.version",
        "source.rules",
    ]
    with pytest.raises(InvalidArgument) as invalid:
        RuleSetLifecycle(
            MemoryStore(), validate=rule_set_from_yaml, clock=lambda: NOW, tokens=PageTokens.development()
        ).create_draft("{", Actor("a"))
    assert [v.field for v in invalid.value.violations] == ["source"]


def test_page_tokens_page_their_own_query_only(lifecycle: RuleSetLifecycle) -> None:
    for version in (1, 2, 3):
        lifecycle.create_draft(SOURCE.format(version=version), Actor("alice"))
    first = lifecycle.list(name=None, status=None, requested_size=2, page_token="")
    rest = lifecycle.list(name=None, status=None, requested_size=2, page_token=first.next_page_token)
    assert len(first.items) + len(rest.items) == 3
    assert rest.next_page_token == ""
    for misuse in (
        lambda: lifecycle.list(name=None, status="draft", requested_size=2, page_token=first.next_page_token),
        lambda: lifecycle.changes(rule_set_id=None, requested_size=2, page_token=first.next_page_token),
        lambda: lifecycle.list(name=None, status=None, requested_size=2, page_token="not-a-token"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            misuse()
        assert [v.reason for v in refused.value.violations] == ["INVALID_PAGE_TOKEN"]
    tokens = lifecycle.tokens
    assert decode_page_token(tokens, "", bound_to={}) is None
    with pytest.raises(InvalidArgument):
        decode_page_token(tokens, tokens.encode("42", bound_to={}), bound_to={})


def event(key: str, subject: str, minute: int = 0) -> EngineEvent:
    return EngineEvent(key, subject, "person", "t", NOW.replace(minute=minute), {})


def firing_for(e: EngineEvent) -> Firing:
    return Firing(
        "r",
        "s",
        1,
        "",
        "",
        "",
        (e.key,),
        e.subject_key,
        "person",
        -1,
        "c",
        "minor",
        "",
        False,
        NOW,
        e.key,
        NOW,
    )


def test_isolate_removes_the_named_events_and_evaluates_the_rest() -> None:
    events = [event("a/1", "s1"), event("a/2", "s1"), event("a/3", "s2")]

    def run(batch: Sequence[EngineEvent]) -> Evaluated:
        if any(e.key == "a/2" for e in batch):
            raise RuleEvaluationError([EvaluationFailure("a/2", "r", "division by zero")])
        return Evaluated([firing_for(e) for e in batch])

    result, failures = isolate(run, events)
    assert [f.outcome_id for f in result.firings] == ["a/1", "a/3"]
    assert failures == {"a/2": "[r] division by zero"}


def test_isolate_narrows_an_unexplained_failure_to_its_subject() -> None:
    events = [event("a/1", "s1"), event("a/2", "s2"), event("a/3", "s2")]

    def run(batch: Sequence[EngineEvent]) -> Evaluated:
        if any(e.subject_key == "s2" for e in batch):
            raise RuleEngineError("durable-rules failed")
        return Evaluated([firing_for(e) for e in batch])

    result, failures = isolate(run, events)
    assert [f.outcome_id for f in result.firings] == ["a/1"]
    assert set(failures) == {"a/2", "a/3"}
    assert "durable-rules failed" in failures["a/2"]


def test_evaluation_order_is_event_time_then_key_without_repeats_or_done() -> None:
    late, early, again = event("b/1", "s", minute=5), event("a/9", "s", minute=1), event("b/1", "s", minute=5)
    assert [e.key for e in in_evaluation_order([late, early, again, event("c/1", "s")], {"c/1"})] == [
        "a/9",
        "b/1",
    ]
