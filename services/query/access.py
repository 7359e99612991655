"""Who may call QueryService. Subjects read only their own data and benefit providers
check only their own benefits (per-datum checks in the servicer); statistics and bulk
reads are for reviewers, auditors and admins."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, Role, allow

_RPC = "/egret.query.v1.QueryService/"
_STAFF = (Role.REVIEWER, Role.AUDITOR, Role.ADMIN)

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "GetScore": allow(Role.SUBJECT, *_STAFF),
    _RPC + "ListEntries": allow(Role.SUBJECT, *_STAFF),
    _RPC + "GetEntry": allow(Role.SUBJECT, *_STAFF),
    _RPC + "ListScoreHistory": allow(Role.SUBJECT, *_STAFF),
    _RPC + "CheckEligibility": allow(Role.BENEFIT_PROVIDER, Role.SUBJECT, *_STAFF),
    _RPC + "BatchGetScores": allow(*_STAFF),
    _RPC + "GetTierDistribution": allow(*_STAFF),
    _RPC + "ListBenefits": allow(Role.DEPARTMENT, Role.SUBJECT, Role.BENEFIT_PROVIDER, *_STAFF),
}
