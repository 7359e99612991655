"""Who may call IngestService: departments only, and every call must carry a deadline."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, Principal, Role, allow
from kit.errors import PermissionDenied

_RPC = "/egret.ingest.v1.IngestService/"

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "SubmitEvent": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "SubmitEvents": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "StreamEvents": allow(Role.DEPARTMENT, require_deadline=True),
}


def require_own_source(principal: Principal | None, source: str) -> None:
    """A department submits only as itself: the request's source must be its principal."""
    if principal is not None and principal.role is Role.DEPARTMENT and principal.id != source:
        raise PermissionDenied(f"department {principal.id!r} may not submit as source {source!r}")
