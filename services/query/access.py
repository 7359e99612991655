"""Who may call QueryService. Subjects read only their own data and benefit providers
check only their own benefits (per-datum checks in the servicer); statistics and bulk
reads are for reviewers, auditors and admins."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, Principal, Role, allow
from kit.errors import InvalidArgument, PermissionDenied, Violation

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


def require_own_subject(principal: Principal | None, subject_key: str) -> None:
    """A subject may read only its own data; staff roles read any subject's."""
    if principal is not None and principal.role is Role.SUBJECT and principal.subject_key != subject_key:
        raise PermissionDenied("a subject may read only its own data")


def require_own_benefit(principal: Principal | None, provider_id: str) -> None:
    """A benefit provider may check eligibility only for the benefits it provides."""
    if principal is not None and principal.role is Role.BENEFIT_PROVIDER and principal.id != provider_id:
        raise PermissionDenied("a benefit provider may check only its own benefits")


def require_stated_purpose(principal: Principal | None, purpose: str) -> None:
    """Benefit providers must say why they ask; the purpose is recorded with the read."""
    if principal is not None and principal.role is Role.BENEFIT_PROVIDER and not purpose.strip():
        raise InvalidArgument(
            "a benefit provider must state the purpose of the check",
            [Violation("purpose", "is required from benefit providers", "REQUIRED")],
        )
