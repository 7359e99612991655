"""Who may call RulesService: ingest (as a service) delivers events; query (as a service)
reads the active rule set; reviewers own the rule sets; auditors read them; admins handle
dead letters."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, Role, allow

_RPC = "/egret.rules.v1.RulesService/"
_READERS = (Role.REVIEWER, Role.AUDITOR, Role.ADMIN)

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "EvaluateEvents": allow(Role.SERVICE),
    _RPC + "GetActiveRuleSet": allow(*_READERS, Role.SERVICE),
    _RPC + "ValidateRuleSet": allow(Role.REVIEWER),
    _RPC + "CreateDraft": allow(Role.REVIEWER),
    _RPC + "PublishRuleSet": allow(Role.REVIEWER),
    _RPC + "ActivateRuleSet": allow(Role.REVIEWER),
    _RPC + "RetireRuleSet": allow(Role.REVIEWER),
    _RPC + "BacktestRuleSet": allow(Role.REVIEWER),
    _RPC + "ListRuleSets": allow(*_READERS),
    # Query (as a service) reads the active rule set's positive rules for Explain.
    _RPC + "GetRuleSet": allow(*_READERS, Role.SERVICE),
    _RPC + "ListRuleSetChanges": allow(*_READERS),
    _RPC + "ListDeadLetters": allow(Role.ADMIN, Role.AUDITOR),
    _RPC + "RedriveDeadLetters": allow(Role.ADMIN),
}
