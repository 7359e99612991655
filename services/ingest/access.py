"""Who may call IngestService: departments only, and every call must carry a deadline.

A department acts only as itself: it submits under its own source and retracts or
corrects only events of its own source. Naming another source is PERMISSION_DENIED,
decided from the request alone before anything is read, so it tells nothing about
whether the other department's event exists.
"""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, allow
from kit.errors import PermissionDenied
from kit.principal import Principal, Role

_RPC = "/egret.ingest.v1.IngestService/"

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "SubmitEvent": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "SubmitEvents": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "StreamEvents": allow(Role.DEPARTMENT, require_deadline=True),
    # A department withdraws or corrects only what it sent itself (require_own_source).
    _RPC + "RetractEvent": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "CorrectEvent": allow(Role.DEPARTMENT, require_deadline=True),
}


def require_own_source(principal: Principal | None, source: str, act: str = "submit as") -> None:
    """A department acts only as itself: the request's source must be its principal."""
    if principal is not None and principal.role is Role.DEPARTMENT and principal.id != source:
        raise PermissionDenied(f"department {principal.id!r} may not {act} source {source!r}")


def acting_department(principal: Principal | None, source: str) -> str:
    """Who retracts, for the record: the authenticated department, else (insecure
    development mode) the source the request names."""
    return principal.loggable_id if principal is not None else source
