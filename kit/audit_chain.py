"""The audit chain's state, for the `verify-audit` command and for the gRPC read every
service serves (egret.common.v1.AuditChainService, registered by kit.server like health):
the whole log walked under the service's keys, with the anchors given and the automatic
ones of EGRET_AUDIT_ANCHOR_FILE (kit.audit, kit.audit_anchors; docs/security.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from egret.common.v1 import audit_chain_pb2 as pb
from egret.common.v1 import audit_chain_pb2_grpc as pb_grpc
from kit.audit import ChainReport, audit_keys, parse_anchor, verify
from kit.audit_anchors import read_anchors
from kit.auth import CallPolicy, allow
from kit.db import create_engine, make_session_factory
from kit.errors import InvalidArgument, Violation
from kit.logging import get_logger
from kit.metrics import gauge, meter
from kit.principal import Role
from kit.protoconv import to_timestamp
from kit.settings import CommonSettings

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditChainService"].full_name
MAX_ANCHORS = 100
# Walking the whole log is a long read: auditors and admins only, and it costs like one.
POLICY: Mapping[str, CallPolicy] = {
    f"/{SERVICE_NAME}/VerifyAuditChain": allow(Role.AUDITOR, Role.ADMIN, cost=20),
}


@dataclass(frozen=True)
class ChainState:
    report: ChainReport
    # The anchor file's problems and the chain's.
    problems: tuple[str, ...]
    # Anchors checked: the given ones and the automatic ones.
    anchors_checked: int
    automatic: int

    @property
    def intact(self) -> bool:
        return not self.problems


def check(
    common: CommonSettings, engine: Engine, log_model: Any, head: Any, anchors: Sequence[tuple[int, str]] = ()
) -> ChainState:
    """Verify the service's audit chain on `engine` (blocking)."""
    automatic: tuple[tuple[int, str], ...] = ()
    file_problems: tuple[str, ...] = ()
    if common.audit.anchor_file is not None:
        found = read_anchors(common.audit.anchor_file, common.service)
        automatic, file_problems = found.anchors, found.problems
    with make_session_factory(engine)() as session:
        report = verify(
            session, log_model, head, keys=audit_keys(common.audit), anchors=[*anchors, *automatic]
        )
    return ChainState(
        report, (*file_problems, *report.problems), len(anchors) + len(automatic), len(automatic)
    )


class AuditChainServicer(pb_grpc.AuditChainServiceServicer):
    """VerifyAuditChain on a read-only engine of its own, made on the first call (the
    service's pool serves its own calls meanwhile); `close` disposes of it."""

    def __init__(self, common: CommonSettings, log_model: Any, head: Any) -> None:
        self._common = common
        self._log = log_model
        self._head = head
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()
        # The last walk's verdict (a call's or the periodic one's), for egret_audit_chain_intact.
        self._intact: bool | None = None
        gauge(
            meter("egret.audit"),
            "egret.audit.chain.intact",
            lambda: None if self._intact is None else float(self._intact),
            description="1 when the last walk of the audit chain found it intact, 0 when broken",
        )

    async def _check(self, anchors: Sequence[tuple[int, str]] = ()) -> ChainState:
        async with self._lock:  # one walk of the log at a time
            if self._engine is None:
                self._engine = create_engine(self._common.database_url, read_only=True, pool_size=1)
            state = await asyncio.to_thread(check, self._common, self._engine, self._log, self._head, anchors)
        self._intact = state.intact
        if not state.intact:
            log.error("audit chain BROKEN", problems=list(state.problems[:10]), records=state.report.records)
        return state

    async def verify_periodically(self, stopping: asyncio.Event) -> None:
        """Walk the chain every EGRET_AUDIT_VERIFY_SECONDS (a service background loop)."""
        interval = self._common.audit.verify_interval_s
        while interval > 0 and not stopping.is_set():
            try:
                await self._check()
            except Exception as exc:  # the database away: health reports it; the verdict stays
                log.warning("audit chain check failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)

    def register(self, server: Any) -> None:
        pb_grpc.add_AuditChainServiceServicer_to_server(self, server)

    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: Any
    ) -> pb.VerifyAuditChainResponse:
        if len(request.anchors) > MAX_ANCHORS:
            raise InvalidArgument(
                "too many anchors", [Violation("anchors", f"at most {MAX_ANCHORS} anchors", "TOO_MANY")]
            )
        anchors = []
        for index, text in enumerate(request.anchors):
            try:
                anchors.append(parse_anchor(text))
            except ValueError as exc:
                raise InvalidArgument(
                    "malformed anchor", [Violation(f"anchors[{index}]", str(exc))]
                ) from None
        state = await self._check(anchors)
        log.info("audit chain verified", intact=state.intact, records=state.report.records)
        return pb.VerifyAuditChainResponse(
            service=self._common.service,
            intact=state.intact,
            records=state.report.records,
            last_seq=state.report.last_seq,
            last_hash=state.report.last_hash if state.report.records else "",
            problems=state.problems[:100],
            anchors_checked=state.anchors_checked,
            verified_at=to_timestamp(datetime.now(UTC)),
        )

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
