"""Channels to Egret's services, as a production client should open them.

Each channel gets TLS from the profile, the bearer token from its token source on every
call, a deadline on every call that sets none (ingest refuses calls without one), and a
gRPC service config whose retry policy re-sends the idempotent calls on UNAVAILABLE with
exponential back-off. The token travels in an interceptor rather than call credentials:
destroying a channel that holds a Python metadata plugin can deadlock (grpc/grpc#42247).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from egret.common.v1 import audit_chain_pb2_grpc
from egret.ingest.v1 import ingest_service_pb2_grpc
from egret.query.v1 import query_service_pb2_grpc
from egret.rules.v1 import rules_service_pb2_grpc
from egret.score.v1 import score_service_pb2_grpc
from egret_client.profile import SERVICES, Profile, ProfileError
from egret_client.tokens import TokenSource, token_source

# Seconds: unary calls, and streams (a backfill stream lives long; it resends on break).
DEFAULT_DEADLINE_S = 30.0
STREAM_DEADLINE_S = 3600.0
_STREAMING = frozenset({"/egret.ingest.v1.IngestService/StreamEvents"})
# Long by nature: a synchronous backtest replays history (StartBacktest is the better call).
_LONG = {"/egret.rules.v1.RulesService/BacktestRuleSet": 3600.0}

# Calls whose repetition has no further effect: reads, and ingest's writes (idempotent by
# (source, event_id)); gRPC retries them when the server said UNAVAILABLE.
IDEMPOTENT: Mapping[str, tuple[str, ...]] = {
    "egret.ingest.v1.IngestService": ("SubmitEvent", "SubmitEvents", "RetractEvent", "CorrectEvent"),
    "egret.rules.v1.RulesService": (
        "GetActiveRuleSet", "ValidateRuleSet", "ListRuleSets", "GetRuleSet", "ListRuleSetChanges",
        "ListDeadLetters", "GetBacktest", "ListBacktests",
    ),
    "egret.score.v1.ScoreService": ("VerifyScores", "PreviewPolicy", "ListPolicies", "GetActivePolicy"),
    "egret.query.v1.QueryService": (
        "GetScore", "BatchGetScores", "GetTierDistribution", "ListScoreHistory", "CheckEligibility",
        "ListBenefits", "ListEntries", "GetEntry", "Explain", "ListDisputes", "ListRepairApplications",
        "ListAccessLog", "GetConsent",
    ),
    "egret.common.v1.AuditChainService": ("VerifyAuditChain",),
}  # fmt: skip

RETRY_POLICY: Mapping[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> str:
    """The gRPC service config (JSON) every channel carries: the retry policy above."""
    names = [
        {"service": service, "method": method}
        for service, methods in IDEMPOTENT.items()
        for method in methods
    ]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


def default_deadline(method: str) -> float:
    if method in _STREAMING:
        return STREAM_DEADLINE_S
    return _LONG.get(method, DEFAULT_DEADLINE_S)


def _method_name(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _CallDefaults:
    """Adds the token and, when the call sets none, the default deadline."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    async def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        token = await self._tokens.token()
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        timeout = details.timeout if details.timeout is not None else default_deadline(_method_name(details))
        return details._replace(metadata=metadata, timeout=timeout)


# grpc.aio files an interceptor under the first call shape it implements only, so each
# shape gets its own class.
class _UnaryUnary(_CallDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _UnaryStream(_CallDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _StreamUnary(_CallDefaults, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(await self._details(client_call_details), requests)


class _StreamStream(_CallDefaults, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), requests)


def interceptors(tokens: TokenSource) -> list[grpc.aio.ClientInterceptor]:
    return [_UnaryUnary(tokens), _UnaryStream(tokens), _StreamUnary(tokens), _StreamStream(tokens)]


def credentials(profile: Profile) -> grpc.ChannelCredentials:
    """TLS against the profile's CA (else the system's roots), with its client certificate if set."""

    def read(path: Any) -> bytes | None:
        if path is None:
            return None
        try:
            return bytes(path.read_bytes())
        except OSError as exc:
            raise ProfileError(f"profile {profile.name!r}: cannot read {path}: {exc}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(profile.ca_file),
        private_key=read(profile.key_file),
        certificate_chain=read(profile.cert_file),
    )


def open_channel(
    profile: Profile,
    service: str,
    tokens: TokenSource | None = None,
    options: Mapping[str, Any] | None = None,
) -> grpc.aio.Channel:
    """A channel to `service` with the profile's TLS, tokens, deadlines and retries."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    chosen = {
        "grpc.service_config": service_config(),
        "grpc.enable_retries": 1,
        "grpc.keepalive_time_ms": 60_000,
        **(options or {}),
    }
    intercept = interceptors(tokens if tokens is not None else token_source(profile))
    target = profile.endpoint(service)
    if profile.insecure:
        return grpc.aio.insecure_channel(target, options=list(chosen.items()), interceptors=intercept)
    return grpc.aio.secure_channel(
        target, credentials(profile), options=list(chosen.items()), interceptors=intercept
    )


class Connection:
    """One channel per service, opened on first use; `async with` closes them."""

    def __init__(self, profile: Profile, tokens: TokenSource | None = None) -> None:
        self.profile = profile
        self._tokens = tokens if tokens is not None else token_source(profile)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(self.profile, service, self._tokens)
        return self._channels[service]

    @property
    def ingest(self) -> ingest_service_pb2_grpc.IngestServiceAsyncStub:
        return ingest_service_pb2_grpc.IngestServiceStub(self.channel("ingest"))

    @property
    def rules(self) -> rules_service_pb2_grpc.RulesServiceAsyncStub:
        return rules_service_pb2_grpc.RulesServiceStub(self.channel("rules"))

    @property
    def score(self) -> score_service_pb2_grpc.ScoreServiceAsyncStub:
        return score_service_pb2_grpc.ScoreServiceStub(self.channel("score"))

    @property
    def query(self) -> query_service_pb2_grpc.QueryServiceAsyncStub:
        return query_service_pb2_grpc.QueryServiceStub(self.channel("query"))

    def audit_chain(self, service: str) -> audit_chain_pb2_grpc.AuditChainServiceAsyncStub:
        return audit_chain_pb2_grpc.AuditChainServiceStub(self.channel(service))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()
