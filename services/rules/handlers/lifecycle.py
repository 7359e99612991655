"""The rule-set lifecycle's calls (services.rules.lifecycle), each run on the thread it
needs: validating a rule set compiles it, on the engine's one thread (durable-rules is
not thread-safe); the others only touch the database."""

from __future__ import annotations

from concurrent.futures import Executor

from domain.ruleset.model import RuleSet, RuleSetError
from domain.ruleset.parsing import stored_rule_set
from kit.db import run_blocking
from kit.logging import get_logger
from kit.page_tokens import PageTokens
from services.rules.lifecycle import (
    Activation,
    Actor,
    ChangePage,
    Page,
    RuleSetLifecycle,
    Status,
    StoredRuleSet,
)

log = get_logger(__name__)


class LifecycleHandler:
    """Drafts, publications, activations and retirements, audited by the actor the caller
    is; and the reads of the stored rule sets and their changes."""

    def __init__(self, lifecycle: RuleSetLifecycle, executor: Executor) -> None:
        self._lifecycle = lifecycle
        self._executor = executor

    @property
    def tokens(self) -> PageTokens:
        """Signs the page tokens of this service's list RPCs."""
        return self._lifecycle.tokens

    async def validate(self, source: str) -> RuleSet:
        """The rule set the source describes; raises RuleSetError listing every problem."""
        return await run_blocking(self._executor, self._lifecycle.validate, source)

    async def create_draft(self, source: str, actor: Actor) -> StoredRuleSet:
        stored = await run_blocking(self._executor, self._lifecycle.create_draft, source, actor)
        log.info("rule set draft created", rule_set_id=stored.rule_set_id, name=stored.name, actor=actor.name)
        return stored

    async def publish(self, rule_set_id: int, actor: Actor) -> StoredRuleSet:
        stored = await run_blocking(None, self._lifecycle.publish, rule_set_id, actor)
        log.info(
            "rule set published", rule_set_id=stored.rule_set_id, version=stored.version, actor=actor.name
        )
        return stored

    async def activate(self, rule_set_id: int, actor: Actor) -> Activation:
        activation = await run_blocking(None, self._lifecycle.activate, rule_set_id, actor)
        log.info(
            "rule set activated",
            rule_set_id=activation.rule_set.rule_set_id,
            previous=activation.previous_rule_set_id,
            actor=actor.name,
        )
        return activation

    async def retire(self, rule_set_id: int, actor: Actor) -> StoredRuleSet:
        stored = await run_blocking(None, self._lifecycle.retire, rule_set_id, actor)
        log.info("rule set retired", rule_set_id=stored.rule_set_id, actor=actor.name)
        return stored

    async def rule_sets(
        self, *, name: str | None, status: Status | None, requested_size: int, page_token: str
    ) -> Page:
        return await run_blocking(
            None,
            lambda: self._lifecycle.list(
                name=name, status=status, requested_size=requested_size, page_token=page_token
            ),
        )

    async def get(self, rule_set_id: int) -> tuple[StoredRuleSet, list[str]]:
        """The stored rule set and its rule ids, read back from its source (valid when stored)."""
        stored = await run_blocking(None, self._lifecycle.get, rule_set_id)
        rule_ids = await run_blocking(None, _rule_ids, stored.source)
        return stored, rule_ids

    async def changes(self, *, rule_set_id: int | None, requested_size: int, page_token: str) -> ChangePage:
        return await run_blocking(
            None,
            lambda: self._lifecycle.changes(
                rule_set_id=rule_set_id, requested_size=requested_size, page_token=page_token
            ),
        )

    async def active(self) -> tuple[StoredRuleSet, RuleSet]:
        """The database's active rule set, which every replica converges on at its next batch."""
        stored = await run_blocking(None, self._lifecycle.active)
        return stored, stored_rule_set(stored.source)


def _rule_ids(source: str) -> list[str]:
    try:
        return [r.id for r in stored_rule_set(source).rules]
    except RuleSetError:
        # Stored by an older format that this code no longer reads: still show the rest.
        return []
