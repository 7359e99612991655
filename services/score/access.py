"""Who may call ScoreService: rules (a service token with the apply scope) delivers
outcomes; admins change the policy, reviewers preview it; auditors verify and read; the
active policy is published to every role and the portal's public token (egret.public.read).
Due process: subjects and departments file disputes, subjects apply for repair, reviewers
take (AssignDispute; admins assign them too) and decide both; consent is
set by its subject or recorded by reviewers and admins. Per-datum checks (own entries,
own events, own consent) are in services.score.due_process."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, allow
from kit.principal import SCOPE_APPLY_CONFIG, SCOPE_APPLY_OUTCOMES, SCOPE_PUBLIC_READ, Role

_RPC = "/egret.score.v1.ScoreService/"

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "ApplyOutcomes": allow(Role.SERVICE, service_scope=SCOPE_APPLY_OUTCOMES),
    # Recompute every score (VerifyScores) or score the population under a draft (PreviewPolicy).
    _RPC + "VerifyScores": allow(Role.ADMIN, Role.AUDITOR, cost=50),
    _RPC + "PreviewPolicy": allow(Role.ADMIN, Role.REVIEWER, cost=50),
    # The chart's config-apply Job activates the policy its values give (services.configapply).
    _RPC + "ActivatePolicy": allow(Role.ADMIN, Role.SERVICE, service_scope=SCOPE_APPLY_CONFIG, cost=10),
    _RPC + "ListPolicies": allow(Role.ADMIN, Role.REVIEWER, Role.AUDITOR),
    # The active policy is published: anyone signed in, the portal's public pages, rules'
    # backtests (they score with it) and the config-apply Job (it compares with it).
    _RPC + "GetActivePolicy": allow(
        Role.ADMIN,
        Role.REVIEWER,
        Role.AUDITOR,
        Role.SUBJECT,
        Role.DEPARTMENT,
        Role.BENEFIT_PROVIDER,
        Role.SERVICE,
        service_scope=(SCOPE_PUBLIC_READ, SCOPE_APPLY_OUTCOMES, SCOPE_APPLY_CONFIG),
    ),
    _RPC + "FileDispute": allow(Role.SUBJECT, Role.DEPARTMENT),
    # A reviewer takes or releases a dispute for itself; an admin assigns one to a reviewer.
    _RPC + "AssignDispute": allow(Role.REVIEWER, Role.ADMIN),
    _RPC + "ResolveDispute": allow(Role.REVIEWER),
    _RPC + "ApplyForRepair": allow(Role.SUBJECT),
    _RPC + "DecideRepair": allow(Role.REVIEWER),
    _RPC + "SetConsent": allow(Role.SUBJECT, Role.REVIEWER, Role.ADMIN),
}
