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
