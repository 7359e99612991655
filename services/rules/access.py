"""Who may call RulesService: ingest (a service token with the evaluate scope) delivers
events; query (a service token with the read scope) reads the active rule set and the
versions its outcomes name; the portal (the public read scope) reads the active rule set
only; reviewers own the rule sets and run backtests; auditors read both; admins handle
dead letters, run backtests of stored rule sets (config/purposes.yaml lets them state
rule-backtest; a backtest changes nothing live) and cancel any (a reviewer cancels only
the backtests it started: the servicer checks that, BacktestJobs.cancel)."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, allow
from kit.principal import (
    SCOPE_APPLY_CONFIG,
    SCOPE_EVALUATE_EVENTS,
    SCOPE_PUBLIC_READ,
    SCOPE_READ_RULE_SETS,
    Role,
)

_RPC = "/egret.rules.v1.RulesService/"
_READERS = (Role.REVIEWER, Role.AUDITOR, Role.ADMIN)

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "EvaluateEvents": allow(Role.SERVICE, service_scope=SCOPE_EVALUATE_EVENTS),
    # Published: the portal's public rules page reads it too (its source included).
    _RPC + "GetActiveRuleSet": allow(
        *_READERS, Role.SERVICE, service_scope=(SCOPE_READ_RULE_SETS, SCOPE_PUBLIC_READ, SCOPE_APPLY_CONFIG)
    ),
    # A reviewer's, and the chart's config-apply Job's for the rule set its values give
    # (services.configapply): the same calls, checks and audit records.
    _RPC + "ValidateRuleSet": allow(Role.REVIEWER, Role.SERVICE, service_scope=SCOPE_APPLY_CONFIG, cost=10),
    _RPC + "CreateDraft": allow(Role.REVIEWER, Role.SERVICE, service_scope=SCOPE_APPLY_CONFIG, cost=10),
    _RPC + "PublishRuleSet": allow(Role.REVIEWER, Role.SERVICE, service_scope=SCOPE_APPLY_CONFIG),
    _RPC + "ActivateRuleSet": allow(Role.REVIEWER, Role.SERVICE, service_scope=SCOPE_APPLY_CONFIG),
    _RPC + "RetireRuleSet": allow(Role.REVIEWER),
    # Replays the recorded history: the dearest call of all.
    _RPC + "BacktestRuleSet": allow(Role.REVIEWER, Role.ADMIN, cost=50),
    # The same replay, in the background.
    _RPC + "StartBacktest": allow(Role.REVIEWER, Role.ADMIN, cost=50),
    # Its starter's (a reviewer) or, to free the instance's one backtest slot, an admin's.
    _RPC + "CancelBacktest": allow(Role.REVIEWER, Role.ADMIN),
    _RPC + "GetBacktest": allow(*_READERS),
    _RPC + "ListBacktests": allow(*_READERS),
    _RPC + "ListRuleSets": allow(*_READERS, Role.SERVICE, service_scope=SCOPE_APPLY_CONFIG),
    # Query (as a service) reads the active rule set's positive rules for Explain.
    _RPC + "GetRuleSet": allow(*_READERS, Role.SERVICE, service_scope=SCOPE_READ_RULE_SETS),
    _RPC + "ListRuleSetChanges": allow(*_READERS),
    _RPC + "ListDeadLetters": allow(Role.ADMIN, Role.AUDITOR),
    _RPC + "RedriveDeadLetters": allow(Role.ADMIN, cost=10),
}
