"""Who may call IngestService: departments only, and every call must carry a deadline."""

from __future__ import annotations

from collections.abc import Mapping

from kit.auth import CallPolicy, Role, allow

_RPC = "/egret.ingest.v1.IngestService/"

POLICY: Mapping[str, CallPolicy] = {
    _RPC + "SubmitEvent": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "SubmitEvents": allow(Role.DEPARTMENT, require_deadline=True),
    _RPC + "StreamEvents": allow(Role.DEPARTMENT, require_deadline=True),
}
