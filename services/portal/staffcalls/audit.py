"""An auditor's calls: a subject's access log (query's ListAccessLog, purpose `audit`),
the subject named by the identifier the resident gave, which query hashes (the portal
never does, and never logs, traces or links it); and each service's audit chain state
(AuditChainService, kit.audit_chain)."""

from __future__ import annotations

from egret.common.v1 import audit_chain_pb2 as chain_pb
from egret.query.v1 import query_service_pb2 as query_pb
from services.portal import convert
from services.portal import records as r
from services.portal.backend import Backend
from services.portal.staff_records import ChainState
from services.portal.staffcalls import typed_subject

AUDIT = "audit"
ACCESS_PAGE = 100


async def access_log(
    backend: Backend, token: str, *, kind: str, scheme: str, value: str, note: str = "", page_token: str = ""
) -> r.Page[r.AccessRecord]:
    request = query_pb.ListAccessLogRequest(
        subject=typed_subject(kind, scheme, value),
        page_size=ACCESS_PAGE,
        page_token=page_token,
        purpose=AUDIT,
        purpose_note=note,
    )
    response = await backend.call("query", "ListAccessLog", request, token)
    return r.Page(tuple(convert.access_record(a) for a in response.records), response.next_page_token)


async def chain_state(backend: Backend, token: str, service: str) -> ChainState:
    response = await backend.call(
        f"{service}.audit", "VerifyAuditChain", chain_pb.VerifyAuditChainRequest(), token
    )
    return ChainState(
        service=response.service or service,
        intact=response.intact,
        records=response.records,
        last_seq=response.last_seq,
        last_hash=response.last_hash,
        problems=tuple(response.problems),
        anchors_checked=response.anchors_checked,
        verified_at=convert.when(response.verified_at),
    )
