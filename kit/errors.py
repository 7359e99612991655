"""Domain errors every service raises; kit.interceptors maps them to gRPC statuses.

Pure Python on purpose: domain code raises these without importing grpc.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The google.rpc.ErrorInfo domain of every reason Egret's services give (kit.interceptors).
ERROR_DOMAIN = "egret.city"


@dataclass(frozen=True)
class Violation:
    """One problem with one field, as google.rpc.BadRequest.FieldViolation. What a caller
    receives names the field from the root of its request message, in proto field names,
    `[i]` for an index and `.key` for a map key (`events[3].attributes.days_late`;
    errors.proto): domain code names fields relative to what it checks, and whoever puts
    that into a request `prefixed`s it."""

    field: str
    description: str
    reason: str = "INVALID"

    def prefixed(self, prefix: str) -> Violation:
        field = f"{prefix}.{self.field}" if self.field else prefix
        return Violation(field, self.description, self.reason)


class DomainError(Exception):
    """Base of the errors a service reports to its caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed (INVALID_ARGUMENT with field violations)."""

    def __init__(self, message: str, violations: Sequence[Violation] = ()) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


class NotFound(DomainError):
    """The named thing does not exist (NOT_FOUND)."""


class AlreadyExists(DomainError):
    """The request conflicts with something already recorded (ALREADY_EXISTS)."""

    def __init__(self, message: str, reason: str = "ALREADY_EXISTS") -> None:
        super().__init__(message)
        self.reason = reason


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the request (FAILED_PRECONDITION).

    `reason` (UPPER_SNAKE_CASE) and `metadata` reach the caller as a google.rpc.ErrorInfo,
    so a client can tell refusals apart and word them itself; the message stays for people.
    """

    def __init__(self, message: str, reason: str = "", metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


class PermissionDenied(DomainError):
    """The caller may not do this (PERMISSION_DENIED)."""


class Unavailable(DomainError):
    """A dependency is down; the caller should retry (UNAVAILABLE)."""


class Unauthenticated(DomainError):
    """No valid credentials (UNAUTHENTICATED). The message is safe to return and log."""


class ResourceExhausted(DomainError):
    """A limit was hit (RESOURCE_EXHAUSTED); the caller may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
