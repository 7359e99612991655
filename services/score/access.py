"""Who may call ScoreService: rules (as a service) delivers outcomes; admins change the
policy, reviewers preview it; auditors verify and read."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, Role, allow

_RPC = "/egret.score.v1.ScoreService/"

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "ApplyOutcomes": allow(Role.SERVICE),
    _RPC + "VerifyScores": allow(Role.ADMIN, Role.AUDITOR),
    _RPC + "PreviewPolicy": allow(Role.ADMIN, Role.REVIEWER),
    _RPC + "ActivatePolicy": allow(Role.ADMIN),
    _RPC + "ListPolicies": allow(Role.ADMIN, Role.REVIEWER, Role.AUDITOR),
}
