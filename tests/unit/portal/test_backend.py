"""The portal's gRPC client: refusals keep the service's machine-readable reason, and the
person's reads name no subject (the services take it from the token)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from egret.query.v1 import query_service_pb2 as query_pb
from services.portal.backend import Backend, Caller, ServiceError, SubjectId, _error


def _refusal(*details: Any) -> grpc.aio.AioRpcError:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = status_pb2.Status(code=9, message="too early", details=packed)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    code = grpc.StatusCode.FAILED_PRECONDITION
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "too early")


def test_a_refusal_keeps_the_reason_and_metadata_of_egrets_error_info() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="REPAIR_TOO_EARLY", domain="egret.city", metadata={"earliest_date": "2026-07-31"}
    )
    error = _error(_refusal(info))
    assert (error.code, error.message) == ("FAILED_PRECONDITION", "too early")
    assert error.reason == "REPAIR_TOO_EARLY"
    assert error.metadata == {"earliest_date": "2026-07-31"}
    # Another domain's reason is not Egret's to word.
    other = _error(_refusal(error_details_pb2.ErrorInfo(reason="QUOTA", domain="googleapis.com")))
    assert (other.reason, other.metadata) == ("", {})


class _NoChannel:
    """Stands in for a gRPC channel: the stubs take their methods from it, the test swaps the one called."""

    def _method(self, *_: Any, **__: Any) -> None:
        return None

    unary_unary = unary_stream = stream_unary = stream_stream = _method

    async def close(self) -> None:
        return None


class _Recording:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def __call__(self, request: Any, **_: Any) -> Any:
        self.requests.append(request)
        return query_pb.GetConsentResponse(granted=True, consent_required=True)


async def test_the_persons_reads_leave_the_subject_unset() -> None:
    channel = _NoChannel()
    backend = Backend(query=channel, score=channel)  # type: ignore[arg-type]
    recording = _Recording()
    backend._query.GetConsent = recording  # type: ignore[assignment]
    caller = Caller("token", SubjectId("person", "resident-id", "350200199001011230"))
    state = await backend.consent(caller)
    assert (state.granted, state.required, state.consent) == (True, True, None)
    (request,) = recording.requests
    assert request.subject.WhichOneof("ref") is None
    assert request.purpose == "own-record"
    assert "350200199001011230" not in str(request)
    await channel.close()


def test_service_error_holds_no_reason_by_default() -> None:
    error = ServiceError("UNAVAILABLE", "down")
    with pytest.raises(ServiceError):
        raise error
    assert (error.reason, error.metadata) == ("", {})
