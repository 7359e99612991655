"""The portal's calls to query, score and rules: a thin gRPC client.

Every call about a person carries **that person's own access token** (bearer metadata), so
the services' role checks, purpose rules, consent gates and access log apply exactly as to
any other caller: the portal can never see more than the person could with their token.
Every read that has a purpose field states `own-record` (config/purposes.yaml), the code a
subject reading its own data may state, so the access log the person sees names it. The
person's reads leave the subject unset: the services take it from the token, so the raw id
never travels in a request.

The public pages' reads (the active rule set, policy and benefits catalogue) carry the
portal's own token (EGRET_SERVICE_TOKEN_FILE, scope egret.public.read) when one is
configured, never a person's. That token and the TLS files are read again when they change
(kit.security.channel_credentials, as every service does; docs/security.md, "Rotation
without restart").

Errors come back as `ServiceError` (code name, message, field violations, and the
service's machine-readable reason with its metadata), so routes and views never import grpc.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from egret.common.v1 import audit_chain_pb2_grpc as audit_chain_grpc
from egret.common.v1 import subject_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.errors import ERROR_DOMAIN
from kit.interceptors import PeerCredentials, Token, open_channel
from services.portal import convert
from services.portal import records as r

# The purpose a subject states when reading its own data (config/purposes.yaml).
OWN_RECORD = "own-record"
PAGE_SIZE = 50
# Whole-history reads (history, download) stop after this many pages of 500.
MAX_PAGES = 20
# Public reads change rarely (an activation); a short cache keeps the public pages cheap.
PUBLIC_CACHE_S = 60.0

T = TypeVar("T")
# An unset SubjectRef: the subject the person's token names (query resolves it).
_MYSELF = subject_pb2.SubjectRef()


@dataclass(frozen=True)
class Violation:
    field: str
    reason: str
    description: str


class ServiceError(Exception):
    """A service refused or failed a call: the gRPC code's name, its message, field
    violations, and the reason (google.rpc.ErrorInfo of Egret's domain) with its metadata."""

    def __init__(
        self,
        code: str,
        message: str,
        violations: tuple[Violation, ...] = (),
        reason: str = "",
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.violations = violations
        self.reason = reason
        self.metadata = dict(metadata)


@dataclass(frozen=True)
class SubjectId:
    """Who a subject principal is, as its token names it: never logged, traced or put in a URL."""

    kind: str
    scheme: str
    value: str

    def __repr__(self) -> str:  # never print the raw id, even by accident
        return f"SubjectId(kind={self.kind!r}, scheme={self.scheme!r}, value=<hidden>)"


@dataclass(frozen=True)
class Caller:
    """The signed-in person: their access token, and the subject it names."""

    token: str
    subject: SubjectId

    def __repr__(self) -> str:
        return f"Caller(subject={self.subject!r}, token=<hidden>)"


def _error(exc: grpc.aio.AioRpcError) -> ServiceError:
    violations: list[Violation] = []
    reason, metadata = "", ()
    details = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
    if isinstance(details, bytes):
        try:
            status = status_pb2.Status.FromString(details)
            for item in status.details:
                bad = error_details_pb2.BadRequest()
                info = error_details_pb2.ErrorInfo()
                if item.Unpack(bad):
                    violations += [Violation(v.field, v.reason, v.description) for v in bad.field_violations]
                elif item.Unpack(info) and info.domain == ERROR_DOMAIN:
                    reason, metadata = info.reason, tuple(sorted(info.metadata.items()))
        except Exception:
            violations, reason, metadata = [], "", ()
    return ServiceError(exc.code().name, exc.details() or "", tuple(violations), reason, metadata)


class Backend:
    """Channels to query, score and (optionally) rules and ingest, shared by every request.
    Of ingest the portal calls its audit chain's state only (the auditors' page)."""

    def __init__(
        self,
        *,
        query: grpc.aio.Channel,
        score: grpc.aio.Channel,
        rules: grpc.aio.Channel | None = None,
        ingest: grpc.aio.Channel | None = None,
        public_token: Token | None = None,
        deadline_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channels = [c for c in (query, score, rules, ingest) if c is not None]
        self._query = query_grpc.QueryServiceStub(query)
        self._score = score_grpc.ScoreServiceStub(score)
        self._rules = rules_grpc.RulesServiceStub(rules) if rules is not None else None
        # The stubs the staff console's calls name (services.portal.staffcalls).
        self._stubs: dict[str, Any] = {"query": self._query, "score": self._score}
        if self._rules is not None:
            self._stubs["rules"] = self._rules
        # Every service serves its audit chain's state (kit.audit_chain): "<service>.audit".
        for name, channel in (("query", query), ("score", score), ("rules", rules), ("ingest", ingest)):
            if channel is not None:
                self._stubs[f"{name}.audit"] = audit_chain_grpc.AuditChainServiceStub(channel)
        self._public_token = public_token
        self._deadline_s = deadline_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Any]] = {}

    @classmethod
    def connect(
        cls,
        *,
        query_address: str,
        score_address: str,
        rules_address: str | None,
        credentials: PeerCredentials | None,
        ingest_address: str | None = None,
        deadline_s: float,
    ) -> Backend:
        """Channels with `credentials`' TLS (kit.channels renews them when it is a reader);
        its token, the portal's own, goes on the public reads only."""
        # No token on the channels: each call carries the token of whoever it is for.
        tls = PeerCredentials(credentials.tls) if credentials is not None else None
        return cls(
            query=open_channel(query_address, tls),
            score=open_channel(score_address, tls),
            rules=open_channel(rules_address, tls) if rules_address else None,
            ingest=open_channel(ingest_address, tls) if ingest_address else None,
            public_token=credentials.token if credentials is not None else None,
            deadline_s=deadline_s,
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    # -- calls -----------------------------------------------------------------------------

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, token: Token | None) -> T:
        # The portal's own token is a reader: the call carries the one on disk now.
        bearer = token() if callable(token) else token
        metadata = (("authorization", f"Bearer {bearer}"),) if bearer else ()
        try:
            return await method(request, metadata=metadata, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    def serves(self, stub: str) -> bool:
        """Whether the portal has a channel for `stub` (see `call`)."""
        return stub in self._stubs

    async def call(self, stub: str, method: str, request: Any, token: str) -> Any:
        """RPC `method` of `stub` ("query", "score", "rules") with a staff member's own token:
        the staff console's calls (services.portal.staffcalls) build the requests and read the
        answers; the service decides. UNAVAILABLE if the portal has no channel for it."""
        if stub not in self._stubs:
            raise ServiceError("UNAVAILABLE", f"the portal has no channel for {stub}")
        return await self._call(getattr(self._stubs[stub], method), request, token)

    # -- the signed-in person's own data ---------------------------------------------------

    async def explain(self, caller: Caller) -> r.Explanation:
        request = query_pb.ExplainRequest(subject=_MYSELF, purpose=OWN_RECORD)
        response = await self._call(self._query.Explain, request, caller.token)
        return convert.explanation(response.explanation)

    async def entries(
        self, caller: Caller, page_token: str = "", page_size: int = PAGE_SIZE
    ) -> r.Page[r.Entry]:
        request = query_pb.ListEntriesRequest(
            subject=_MYSELF, page_size=page_size, page_token=page_token, purpose=OWN_RECORD
        )
        response = await self._call(self._query.ListEntries, request, caller.token)
        return r.Page(tuple(convert.entry(e) for e in response.entries), response.next_page_token)

    async def all_entries(self, caller: Caller) -> tuple[r.Entry, ...]:
        return await self._all(lambda token: self.entries(caller, token, 500))

    async def entry(self, caller: Caller, entry_id: str) -> r.Entry:
        request = query_pb.GetEntryRequest(entry_id=entry_id, purpose=OWN_RECORD)
        response = await self._call(self._query.GetEntry, request, caller.token)
        return convert.entry(response.entry)

    async def history_page(
        self, caller: Caller, *, as_corrected: bool, page_token: str = "", page_size: int = 500
    ) -> r.Page[r.ScoreChange]:
        request = query_pb.ListScoreHistoryRequest(
            subject=_MYSELF,
            page_size=page_size,
            page_token=page_token,
            purpose=OWN_RECORD,
            as_corrected=as_corrected,
        )
        response = await self._call(self._query.ListScoreHistory, request, caller.token)
        return r.Page(tuple(convert.score_change(c) for c in response.changes), response.next_page_token)

    async def history(self, caller: Caller, *, as_corrected: bool) -> tuple[r.ScoreChange, ...]:
        """Every change, newest first (at most MAX_PAGES pages)."""
        return await self._all(
            lambda token: self.history_page(caller, as_corrected=as_corrected, page_token=token)
        )

    async def benefits(self, token: Token | None) -> tuple[r.Benefit, ...]:
        async def page(page_token: str) -> r.Page[r.Benefit]:
            request = query_pb.ListBenefitsRequest(page_size=500, page_token=page_token)
            response = await self._call(self._query.ListBenefits, request, token)
            return r.Page(tuple(convert.benefit(b) for b in response.benefits), response.next_page_token)

        return await self._all(page)

    async def eligibility(self, caller: Caller, benefit_id: str) -> r.Eligibility:
        request = query_pb.CheckEligibilityRequest(subject=_MYSELF, benefit_id=benefit_id, purpose=OWN_RECORD)
        response = await self._call(self._query.CheckEligibility, request, caller.token)
        return convert.eligibility(benefit_id, response)

    async def access_log(
        self, caller: Caller, page_token: str = "", page_size: int = PAGE_SIZE
    ) -> r.Page[r.AccessRecord]:
        request = query_pb.ListAccessLogRequest(
            subject=_MYSELF, page_size=page_size, page_token=page_token, purpose=OWN_RECORD
        )
        response = await self._call(self._query.ListAccessLog, request, caller.token)
        return r.Page(tuple(convert.access_record(a) for a in response.records), response.next_page_token)

    async def all_access_records(self, caller: Caller) -> tuple[r.AccessRecord, ...]:
        return await self._all(lambda token: self.access_log(caller, token, 500))

    async def disputes(self, caller: Caller) -> tuple[r.Dispute, ...]:
        async def page(page_token: str) -> r.Page[r.Dispute]:
            request = query_pb.ListDisputesRequest(
                subject=_MYSELF, page_size=500, page_token=page_token, purpose=OWN_RECORD
            )
            response = await self._call(self._query.ListDisputes, request, caller.token)
            return r.Page(tuple(convert.dispute(d) for d in response.disputes), response.next_page_token)

        return await self._all(page)

    async def repairs(self, caller: Caller) -> tuple[r.Repair, ...]:
        async def page(page_token: str) -> r.Page[r.Repair]:
            request = query_pb.ListRepairApplicationsRequest(
                subject=_MYSELF, page_size=500, page_token=page_token, purpose=OWN_RECORD
            )
            response = await self._call(self._query.ListRepairApplications, request, caller.token)
            return r.Page(tuple(convert.repair(a) for a in response.applications), response.next_page_token)

        return await self._all(page)

    # -- the person's acts (score) ---------------------------------------------------------

    async def file_dispute(self, caller: Caller, entry_id: str, statement: str) -> r.Dispute:
        request = score_pb.FileDisputeRequest(entry_id=entry_id, statement=statement)
        response = await self._call(self._score.FileDispute, request, caller.token)
        return convert.dispute(response.dispute)

    async def apply_for_repair(
        self, caller: Caller, entry_id: str, evidence: str, evidence_uri: str
    ) -> r.Repair:
        request = score_pb.ApplyForRepairRequest(
            entry_id=entry_id, evidence=evidence, evidence_uri=evidence_uri
        )
        response = await self._call(self._score.ApplyForRepair, request, caller.token)
        return convert.repair(response.application)

    async def consent(self, caller: Caller) -> r.ConsentState:
        request = query_pb.GetConsentRequest(subject=_MYSELF, purpose=OWN_RECORD)
        response = await self._call(self._query.GetConsent, request, caller.token)
        return convert.consent_state(response)

    async def set_consent(self, caller: Caller, granted: bool) -> r.Consent:
        # An empty subject_key: the caller's own consent (the only one a subject may set).
        request = score_pb.SetConsentRequest(granted=granted)
        response = await self._call(self._score.SetConsent, request, caller.token)
        return convert.consent(response.consent)

    # -- public reads ----------------------------------------------------------------------

    async def rule_set(self) -> r.PublishedRuleSet:
        if self._rules is None:
            raise ServiceError("UNAVAILABLE", "no rules address is configured (EGRET_RULES_ADDRESS)")
        rules = self._rules

        async def load() -> r.PublishedRuleSet:
            active = await self._call(
                rules.GetActiveRuleSet, rules_pb.GetActiveRuleSetRequest(), self._public_token
            )
            summary = active.rule_set
            return convert.published_rule_set(
                summary.name, summary.version, convert.when(summary.activated_at), active.source
            )

        return await self._cached("rules", load)

    async def policy(self) -> r.PublishedPolicy:
        async def load() -> r.PublishedPolicy:
            active = await self._call(
                self._score.GetActivePolicy, score_pb.GetActivePolicyRequest(), self._public_token
            )
            return convert.published_policy(active.policy_yaml, convert.when(active.activated_at))

        return await self._cached("policy", load)

    async def public_benefits(self) -> tuple[r.Benefit, ...]:
        return await self._cached("benefits", lambda: self.benefits(self._public_token))

    # -- helpers ---------------------------------------------------------------------------

    async def _cached(self, key: str, load: Callable[[], Awaitable[T]]) -> T:
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < PUBLIC_CACHE_S:
            return hit[1]  # type: ignore[no-any-return]
        value = await load()
        self._cache[key] = (now, value)
        return value

    @staticmethod
    async def _all(page: Callable[[str], Awaitable[r.Page[T]]]) -> tuple[T, ...]:
        items: list[T] = []
        token = ""
        for _ in range(MAX_PAGES):
            got = await page(token)
            items += got.items
            token = got.next_page_token
            if not token:
                break
        return tuple(items)


async def gather_settled(*calls: Awaitable[T]) -> list[T | ServiceError]:
    """Run calls at once; a refused one yields its ServiceError instead of failing the rest."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    settled: list[T | ServiceError] = []
    for result in results:
        if isinstance(result, ServiceError):
            settled.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            settled.append(result)
    return settled
