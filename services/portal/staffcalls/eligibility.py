"""A benefit provider's call: a subject's eligibility for one of its own benefits (query's
CheckEligibility), the subject named by the identifier the applicant gave, which query
hashes (the portal never does, and never logs, traces or links it), read with the stated
purpose. The catalogue comes from Backend.benefits with the provider's own token."""

from __future__ import annotations

from egret.query.v1 import query_service_pb2 as query_pb
from services.portal import convert
from services.portal import records as r
from services.portal.backend import Backend
from services.portal.staffcalls import typed_subject

ELIGIBILITY_CHECK = "eligibility-check"


async def check(
    backend: Backend,
    token: str,
    *,
    kind: str,
    scheme: str,
    value: str,
    benefit_id: str,
    purpose: str = ELIGIBILITY_CHECK,
    note: str = "",
) -> r.Eligibility:
    request = query_pb.CheckEligibilityRequest(
        subject=typed_subject(kind, scheme, value), benefit_id=benefit_id, purpose=purpose, purpose_note=note
    )
    response = await backend.call("query", "CheckEligibility", request, token)
    return convert.eligibility(benefit_id, response)
