"""What a refused call says, decoded: the status code and message plus the rich details
Egret attaches in the `grpc-status-details-bin` trailer as a google.rpc.Status
(google.rpc.BadRequest field violations, ErrorInfo reasons, RetryInfo delays).

Field paths in violations run from the root of the request message, in proto field
names, with `[i]` for list indices: `event.subject.id_scheme` for SubmitEvent,
`events[3].attributes.days_late` for the fourth event of SubmitEvents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Violation:
    field: str
    description: str
    reason: str = ""


@dataclass(frozen=True)
class ErrorReport:
    """One refused call, in terms a program and a person can both use."""

    code: grpc.StatusCode
    message: str
    violations: tuple[Violation, ...] = ()
    # google.rpc.ErrorInfo: a stable UPPER_SNAKE_CASE reason and its domain ("egret.city").
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    # google.rpc.RetryInfo: how long to wait before trying again.
    retry_after_s: float | None = None

    def lines(self) -> list[str]:
        """The report in words, one line per fact, for a terminal or a log."""
        head = f"{self.code.name}: {self.message}"
        out = [f"{head} [{self.reason}]" if self.reason else head]
        out += [f"  {v.field or '(request)'}: {v.description}" + (f" ({v.reason})" if v.reason else "")
                for v in self.violations]  # fmt: skip
        if self.retry_after_s is not None:
            out.append(f"  retry after {self.retry_after_s:g} s")
        return out


def error_report(error: grpc.RpcError) -> ErrorReport:
    """Decode a refused call (grpc.RpcError or grpc.aio.AioRpcError)."""
    call: Any = error  # both shapes offer code(), details() and trailing_metadata()
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    trailers: Sequence[tuple[str, Any]] = tuple(call.trailing_metadata() or ())
    blob = next((value for key, value in trailers if key == STATUS_DETAILS_KEY), None)
    if not isinstance(blob, bytes):
        return ErrorReport(code, message)
    status = status_pb2.Status.FromString(blob)
    violations: list[Violation] = []
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_after_s: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [Violation(v.field, v.description, v.reason) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorReport(
        code, status.message or message, tuple(violations), reason, domain, metadata, retry_after_s
    )
