"""Reading rich gRPC error details in tests."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


def bad_request(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The (field, reason) pairs of the google.rpc.BadRequest detail of an error."""
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(request)
    return [(v.field, v.reason) for v in request.field_violations]


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, str, dict[str, str]]:
    """(domain, reason, metadata) of the google.rpc.ErrorInfo detail of an error."""
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert any(item.Unpack(info) for item in status.details), "no ErrorInfo in the status"
    return info.domain, info.reason, dict(info.metadata)
