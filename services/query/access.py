"""Who may call QueryService. Subjects read only their own data and benefit providers
check only their own benefits (per-datum checks in the servicer); statistics and bulk
reads are for reviewers, auditors and admins.

Due process: Explain is for the subject itself and the staff who review and audit
(departments submit events and file disputes through score; they get no explanation of
anyone's score). The dispute and repair queues are the reviewers' work, readable by
auditors and admins; a subject lists only its own. Who read a subject's data
(ListAccessLog) is shown to the subject itself and to auditors and admins. The consent in
force (GetConsent) is read by the subject itself and by staff stating a purpose. The
benefits catalogue is published: the portal's public pages read it with a service token
holding egret.public.read."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, allow
from kit.errors import PermissionDenied
from kit.principal import SCOPE_PUBLIC_READ, Principal, Role
from services.query.subjects import current_key

_RPC = "/egret.query.v1.QueryService/"
_STAFF = (Role.REVIEWER, Role.AUDITOR, Role.ADMIN)

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "GetScore": allow(Role.SUBJECT, *_STAFF),
    _RPC + "ListEntries": allow(Role.SUBJECT, *_STAFF, cost=2),
    _RPC + "GetEntry": allow(Role.SUBJECT, *_STAFF),
    # Reads and replays the subject's whole ledger (the corrected view), per page.
    _RPC + "ListScoreHistory": allow(Role.SUBJECT, *_STAFF, cost=5),
    _RPC + "CheckEligibility": allow(Role.BENEFIT_PROVIDER, Role.SUBJECT, *_STAFF),
    _RPC + "BatchGetScores": allow(*_STAFF, cost=10),
    _RPC + "GetTierDistribution": allow(*_STAFF, cost=20),
    # The catalogue is published: the portal's public pages read it with their own token.
    _RPC + "ListBenefits": allow(
        Role.DEPARTMENT,
        Role.SUBJECT,
        Role.BENEFIT_PROVIDER,
        *_STAFF,
        Role.SERVICE,
        service_scope=SCOPE_PUBLIC_READ,
    ),
    _RPC + "GetConsent": allow(Role.SUBJECT, *_STAFF),
    _RPC + "Explain": allow(Role.SUBJECT, *_STAFF, cost=5),
    _RPC + "ListDisputes": allow(Role.SUBJECT, *_STAFF),
    _RPC + "ListRepairApplications": allow(Role.SUBJECT, *_STAFF),
    _RPC + "ListAccessLog": allow(Role.SUBJECT, Role.AUDITOR, Role.ADMIN, cost=2),
}


def require_own_subject(principal: Principal | None, subject_key: str) -> None:
    """A subject may read only its own data; staff roles read any subject's. A subject's
    token names its current key; `subject_key` may be its previous one during a rotation."""
    if (
        principal is not None
        and principal.role is Role.SUBJECT
        and principal.subject_key != current_key(subject_key)
    ):
        raise PermissionDenied("a subject may read only its own data")


def require_own_benefit(principal: Principal | None, provider_id: str) -> None:
    """A benefit provider may check eligibility only for the benefits it provides."""
    if principal is not None and principal.role is Role.BENEFIT_PROVIDER and principal.id != provider_id:
        raise PermissionDenied("a benefit provider may check only its own benefits")
