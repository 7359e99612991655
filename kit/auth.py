"""May this caller make this call: per-RPC authorization, decided before any handler work.

Authorization is default-deny: an RPC not in the service's policy is refused for every
role. The gate authenticates the bearer token (kit.tokens), checks role and scope, the
call's deadline and the caller's rate (kit.rate_limit); the interceptor (kit.interceptors)
then binds the principal (kit.principal) for the servicer's per-datum checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kit.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated, Violation
from kit.principal import Principal, Role
from kit.rate_limit import RateLimiter
from kit.tokens import TokenVerifier


@dataclass(frozen=True)
class CallPolicy:
    """Who may call one RPC, and what else the call needs."""

    roles: frozenset[Role]
    # Ingest calls must carry a deadline, so a stuck department cannot hold work forever.
    require_deadline: bool = False
    # The scopes of which a `service` principal must hold one (kit.principal.SCOPE_*).
    service_scopes: frozenset[str] = frozenset()
    # What one call takes from the caller's rate-limit bucket (RateLimiter), and each
    # further message of a request stream too: about the work it makes, in units of a
    # simple read of one subject (docs/security.md, "Limits").
    cost: float = 1.0


def allow(
    *roles: Role,
    require_deadline: bool = False,
    service_scope: str | tuple[str, ...] = (),
    cost: float = 1.0,
) -> CallPolicy:
    """`service_scope`: the scope (or any of the scopes) a `service` caller must hold."""
    scopes = frozenset((service_scope,) if isinstance(service_scope, str) else service_scope)
    if (Role.SERVICE in roles) != bool(scopes):
        raise ValueError("an RPC open to services names the scope they need, and only then")
    if not cost > 0:
        raise ValueError("an RPC costs something")
    return CallPolicy(frozenset(roles), require_deadline, scopes, cost)


# Health checks and reflection answer anyone: probes and tooling carry no tokens.
PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass
class Gate:
    """Admits a call or refuses it before any handler work.

    `verifier=None` is insecure mode (explicitly configured, loudly logged): calls are
    admitted without a principal, but deadlines are still required where the policy
    says so.
    """

    verifier: TokenVerifier | None
    policy: Mapping[str, CallPolicy]
    limiter: RateLimiter | None = None

    def admit(
        self, method: str, metadata: Mapping[str, str | bytes], time_remaining: float | None
    ) -> Principal | None:
        """The caller's principal, checked in a fixed order so that what a refusal says
        never depends on what else is wrong with the call: the token
        (UNAUTHENTICATED), then the role and scope (PERMISSION_DENIED), then the call's
        own shape, its deadline (INVALID_ARGUMENT), then the rate (RESOURCE_EXHAUSTED).
        A caller without a valid token learns nothing about the RPC's other rules."""
        if method in PUBLIC_METHODS:
            return None
        principal = self._authenticated(metadata)
        rule = self.policy.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} is not open to any caller")
        if principal is not None:
            self._authorize(principal, rule, method)
        if rule.require_deadline and time_remaining is None:
            raise InvalidArgument(
                f"a deadline is required: every {_service_of(method)} call must carry one "
                "(a timeout on the call, sent as grpc-timeout)",
                [Violation("grpc-timeout", "set a deadline (timeout) on the call", "REQUIRED")],
            )
        if principal is not None:
            self._charge(principal, rule.cost)
        return principal

    def _authenticated(self, metadata: Mapping[str, str | bytes]) -> Principal | None:
        """The principal of the call's bearer token; None in insecure mode only."""
        if self.verifier is None:
            return None
        header = metadata.get("authorization")
        if not isinstance(header, str) or not header.lower().startswith("bearer "):
            raise Unauthenticated("a bearer token is required")
        return self.verifier.verify(header[7:].strip())

    @staticmethod
    def _authorize(principal: Principal, rule: CallPolicy, method: str) -> None:
        name = method.rsplit("/", 1)[-1]
        if principal.role not in rule.roles:
            raise PermissionDenied(f"role {principal.role.value} may not call {name}")
        if principal.role is Role.SERVICE and not rule.service_scopes & set(principal.scopes):
            raise PermissionDenied(
                f"service {principal.id} lacks scope {' or '.join(sorted(rule.service_scopes))} for {name}"
            )

    def readmit(self, method: str, principal: Principal | None) -> None:
        """Before each message of a request stream after it opened: the token must still be
        accepted (UNAUTHENTICATED once it has expired) and the message is charged like a
        call (RESOURCE_EXHAUSTED beyond the rate)."""
        if principal is None:
            return
        left = self.seconds_left(principal)
        if left is not None and left <= 0:
            raise Unauthenticated("token expired")
        self._charge(principal, self.policy[method].cost)

    def seconds_left(self, principal: Principal | None) -> float | None:
        """How long `principal`'s token is still accepted; None when there is no token."""
        if principal is None or principal.valid_until is None or self.verifier is None:
            return None
        return principal.valid_until - self.verifier.clock()

    def _charge(self, principal: Principal, cost: float) -> None:
        if self.limiter is not None:
            wait = self.limiter.acquire(principal.loggable_id, cost)
            if wait > 0:
                raise ResourceExhausted(f"rate limit of {principal.loggable_id} reached", retry_after_s=wait)


def _service_of(method: str) -> str:
    """`IngestService` for `/egret.ingest.v1.IngestService/SubmitEvent`."""
    return method.lstrip("/").partition("/")[0].rsplit(".", 1)[-1]
