"""Security on every call: TLS, mutual TLS between services, bearer tokens, per-RPC roles,
per-datum checks and rate limits, with the four real servers on loopback.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2

from contracts.score_store import ScoreAuditLog
from devtools.localpki import ISSUER, LocalPki, create_local_pki
from egret.common.v1 import subject_pb2
from egret.ingest.v1 import ingest_service_pb2
from egret.query.v1 import query_service_pb2
from egret.rules.v1 import backtest_pb2, rules_service_pb2
from egret.score.v1 import score_service_pb2
from kit.interceptors import bearer_token
from kit.principal import SERVICE_SCOPES, Role
from kit.tokens import issue_token
from services.ingest import access as ingest_access
from services.ingest import bootstrap as ingest_bootstrap
from services.ingest.servicer import IngestServicer
from services.query import access as query_access
from services.query import bootstrap as query_bootstrap
from services.query.servicer import QueryServicer
from services.rules import access as rules_access
from services.rules import bootstrap as rules_bootstrap
from services.rules.servicer import RulesServicer
from services.score import access as score_access
from services.score import bootstrap as score_bootstrap
from services.score.servicer import ScoreServicer
from tests.support.ingest import ingest_settings
from tests.support.query import query_settings
from tests.support.rules import rules_settings
from tests.support.score import score_settings
from tests.support.security import DESCRIPTORS, principal_for, request_for, secured
from tests.support.servers import running

SERVICERS = {
    "ingest": IngestServicer,
    "rules": RulesServicer,
    "score": ScoreServicer,
    "query": QueryServicer,
}
POLICIES = {
    "ingest": ingest_access.POLICY,
    "rules": rules_access.POLICY,
    "score": score_access.POLICY,
    "query": query_access.POLICY,
}


@dataclass
class Secure:
    pki: LocalPki
    addresses: dict[str, str]
    calls: list[str]

    def channel(self, name: str, token: str | None) -> grpc.aio.Channel:
        """TLS (with the operator's client certificate, which rules and score require)."""
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca_file.read_bytes(),
            private_key=self.pki.key_file("operator").read_bytes(),
            certificate_chain=self.pki.cert_file("operator").read_bytes(),
        )
        interceptors = bearer_token(token) if token is not None else None
        return grpc.aio.secure_channel(self.addresses[name], tls, interceptors=interceptors)


def spy_on(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Record every handler that runs, so a denied call can be shown to have run none."""
    for name, servicer in SERVICERS.items():
        for rpc in DESCRIPTORS[name].methods_by_name:
            original = getattr(servicer, rpc)
            label = f"{name}.{rpc}"
            if inspect.isasyncgenfunction(original):

                def stream(original: Any = original, label: str = label) -> Callable[..., Any]:
                    async def handler(self: Any, *args: Any) -> AsyncIterator[Any]:
                        calls.append(label)
                        async for item in original(self, *args):
                            yield item

                    return handler

                monkeypatch.setattr(servicer, rpc, stream())
            else:

                def unary(original: Any = original, label: str = label) -> Callable[..., Any]:
                    async def handler(self: Any, *args: Any) -> Any:
                        calls.append(label)
                        return await original(self, *args)

                    return handler

                monkeypatch.setattr(servicer, rpc, unary())


@pytest.fixture
async def secure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Secure]:
    pki = create_local_pki(tmp_path / "pki")
    calls: list[str] = []
    spy_on(monkeypatch, calls)
    url = {name: f"sqlite:///{tmp_path / name}.db" for name in SERVICERS}
    addresses: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        addresses["score"] = await stack.enter_async_context(
            running(
                secured(score_settings(url["score"], tmp_path), pki, "score"),
                score_bootstrap.build,
                score_bootstrap.MIGRATIONS,
            )
        )
        addresses["rules"] = await stack.enter_async_context(
            running(
                secured(rules_settings(url["rules"], tmp_path, addresses["score"]), pki, "rules"),
                rules_bootstrap.build,
                rules_bootstrap.MIGRATIONS,
            )
        )
        addresses["ingest"] = await stack.enter_async_context(
            running(
                secured(ingest_settings(url["ingest"], tmp_path, addresses["rules"]), pki, "ingest"),
                ingest_bootstrap.build,
                ingest_bootstrap.MIGRATIONS,
            )
        )
        addresses["query"] = await stack.enter_async_context(
            running(
                secured(query_settings(url["score"], tmp_path), pki, "query"),
                query_bootstrap.build,
                query_bootstrap.MIGRATIONS,
            )
        )
        yield Secure(pki, addresses, calls)


def matrix() -> Iterator[tuple[str, str, Role]]:
    for name, descriptor in DESCRIPTORS.items():
        for rpc in descriptor.methods_by_name:
            for role in Role:
                yield name, rpc, role


async def call(channel: grpc.aio.Channel, name: str, rpc: str, request: Any) -> grpc.StatusCode:
    method = DESCRIPTORS[name].methods_by_name[rpc]
    path = f"/{DESCRIPTORS[name].full_name}/{rpc}"
    try:
        if method.client_streaming:
            stream: Any = channel.stream_stream(path, request_serializer=lambda m: m.SerializeToString())
            async for _ in stream(iter([request]), timeout=5):
                pass
        else:
            await channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString())(
                request, timeout=5
            )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_every_role_may_call_exactly_the_rpcs_its_policy_grants(secure: Secure) -> None:
    outcomes: dict[tuple[str, str, Role], grpc.StatusCode] = {}
    channels = {}
    # The service token here holds every service scope, so that the role decides alone;
    # which scope opens which RPC is the next test's.
    every_scope = tuple(sorted({s for scopes in SERVICE_SCOPES.values() for s in scopes}))
    for role in Role:
        scopes = every_scope if role is Role.SERVICE else ()
        token = secure.pki.token(principal_for(role), role, scopes=scopes)
        channels[role] = {name: secure.channel(name, token) for name in DESCRIPTORS}
    try:
        for name, rpc, role in matrix():
            before = len(secure.calls)
            code = await call(channels[role][name], name, rpc, request_for(name, rpc, role))
            outcomes[(name, rpc, role)] = code
            allowed = role in POLICIES[name][f"/{DESCRIPTORS[name].full_name}/{rpc}"].roles
            if allowed:
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (
                    name,
                    rpc,
                    role,
                    code,
                )
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (name, rpc, role, code)
                assert len(secure.calls) == before, f"{name}.{rpc} ran a handler for a denied {role.value}"
    finally:
        for by_name in channels.values():
            for channel in by_name.values():
                await channel.close()
    # Every RPC of every service is in the policy (default deny would hide a forgotten one).
    for name, descriptor in DESCRIPTORS.items():
        assert {f"/{descriptor.full_name}/{rpc}" for rpc in descriptor.methods_by_name} == set(POLICIES[name])
    assert len(outcomes) == sum(len(d.methods_by_name) for d in DESCRIPTORS.values()) * len(Role)


async def test_each_service_token_opens_only_the_rpcs_of_its_own_scopes(secure: Secure) -> None:
    expected = {
        "ingest": {"rules.EvaluateEvents"},
        # Rules' backtests score with score's active policy.
        "rules": {"score.ApplyOutcomes", "score.GetActivePolicy"},
        "query": {"rules.GetActiveRuleSet", "rules.GetRuleSet"},
        "score": set(),
        # The portal's public pages: published, non-personal data only (the active rule set,
        # never a draft or another version by id).
        "portal": {"query.ListBenefits", "score.GetActivePolicy", "rules.GetActiveRuleSet"},
        # The chart's config-apply Job: what makes a rule set and a policy active, and the
        # reads it compares with; no backtest, retirement or other version's source.
        "config-apply": {
            "rules.GetActiveRuleSet",
            "rules.ValidateRuleSet",
            "rules.CreateDraft",
            "rules.PublishRuleSet",
            "rules.ActivateRuleSet",
            "rules.ListRuleSets",
            "score.ActivatePolicy",
            "score.GetActivePolicy",
        },
    }
    open_to_services = [
        (name, rpc)
        for name, descriptor in DESCRIPTORS.items()
        for rpc in descriptor.methods_by_name
        if Role.SERVICE in POLICIES[name][f"/{descriptor.full_name}/{rpc}"].roles
    ]
    assert sorted(f"{n}.{r}" for n, r in open_to_services) == sorted(set().union(*expected.values()))
    for caller, allowed in expected.items():
        token = secure.pki.service_token(caller)
        for name, rpc in open_to_services:
            before = len(secure.calls)
            async with secure.channel(name, token) as channel:
                code = await call(channel, name, rpc, request_for(name, rpc, Role.SERVICE))
            if f"{name}.{rpc}" in allowed:
                assert code != grpc.StatusCode.PERMISSION_DENIED, (caller, name, rpc, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (caller, name, rpc, code)
                assert len(secure.calls) == before, f"{name}.{rpc} ran a handler for {caller}'s token"
    # A service token without scopes (an old one, or one the IdP issued wrongly) opens nothing.
    async with secure.channel("score", secure.pki.token("egret-rules", Role.SERVICE)) as channel:
        code = await call(
            channel, "score", "ApplyOutcomes", request_for("score", "ApplyOutcomes", Role.SERVICE)
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def _other_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _audience_token(pki: LocalPki) -> str:
    key = serialization.load_pem_private_key((pki.directory / "jwt-private.pem").read_bytes(), None)
    return issue_token(key, issuer=ISSUER, audience="another-system", subject="library", role=Role.DEPARTMENT)


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda pki: None, "a bearer token is required"),
        (lambda pki: pki.token("library", Role.DEPARTMENT, lifetime_s=-120), "token expired"),
        (
            lambda pki: issue_token(
                _other_key(), issuer=ISSUER, audience="egret", subject="library", role=Role.DEPARTMENT
            ),
            "token signature is invalid",
        ),
        (_audience_token, "token is for another audience"),
    ],
)
async def test_missing_expired_forged_and_foreign_tokens_are_unauthenticated(
    secure: Secure, make_token: Callable[[LocalPki], str | None], reason: str
) -> None:
    async with secure.channel("ingest", make_token(secure.pki)) as channel:
        stub: Any = channel.unary_unary(
            "/egret.ingest.v1.IngestService/SubmitEvents", request_serializer=lambda m: m.SerializeToString()
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub(ingest_service_pb2.SubmitEventsRequest(source="library"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert raised.value.details() == reason
    assert secure.calls == []


async def call_without_deadline(channel: grpc.aio.Channel, name: str, rpc: str) -> grpc.aio.AioRpcError:
    method = DESCRIPTORS[name].methods_by_name[rpc]
    call_it: Any = channel.unary_unary(
        f"/{DESCRIPTORS[name].full_name}/{rpc}", request_serializer=lambda m: m.SerializeToString()
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call_it(message_factory.GetMessageClass(method.input_type)())
    return raised.value


async def test_each_service_authenticates_then_authorizes_then_asks_for_the_deadline(secure: Secure) -> None:
    """The order of refusals on the real servers: a call with neither token nor deadline is
    UNAUTHENTICATED, with a token of the wrong role PERMISSION_DENIED, and only a caller the
    RPC is open to hears about the deadline (ingest requires one on every call)."""
    wrong_role = {"ingest": Role.REVIEWER, "rules": Role.DEPARTMENT, "score": Role.DEPARTMENT}
    first_rpc = {"ingest": "SubmitEvents", "rules": "ListRuleSets", "score": "ListPolicies"}
    for name, rpc in [*first_rpc.items(), ("query", "GetTierDistribution")]:
        async with secure.channel(name, None) as channel:
            refused = await call_without_deadline(channel, name, rpc)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, (name, refused)
        role = wrong_role.get(name, Role.DEPARTMENT)
        async with secure.channel(name, secure.pki.token(principal_for(role), role)) as channel:
            refused = await call_without_deadline(channel, name, rpc)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, (name, refused)
    async with secure.channel("ingest", secure.pki.token("library", Role.DEPARTMENT)) as channel:
        refused = await call_without_deadline(channel, "ingest", "SubmitEvents")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a deadline is required" in (refused.details() or "")
    status = status_pb2.Status.FromString(dict(refused.trailing_metadata() or ())["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.reason) for v in bad_request.field_violations] == [("grpc-timeout", "REQUIRED")]
    assert secure.calls == []


async def test_every_service_answers_v1_reflection_without_a_token(secure: Secure) -> None:
    """Tools ask grpc.reflection.v1 first and carry no token: each TLS port answers it."""
    for name, descriptor in DESCRIPTORS.items():
        async with secure.channel(name, None) as channel:
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (listed,) = [r async for r in info(iter([request]), timeout=5)]
        assert descriptor.full_name in {s.name for s in listed.list_services_response.service}, name


async def test_a_department_may_submit_only_as_itself(secure: Secure) -> None:
    async with secure.channel("ingest", secure.pki.token("metro", Role.DEPARTMENT)) as channel:
        submit: Any = channel.unary_unary(
            "/egret.ingest.v1.IngestService/SubmitEvents", request_serializer=lambda m: m.SerializeToString()
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await submit(ingest_service_pb2.SubmitEventsRequest(source="library"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not submit as source 'library'" in (raised.value.details() or "")


async def test_a_subject_reads_only_its_own_score(secure: Secure) -> None:
    token = secure.pki.token("person:resident-id:350200199001011230", Role.SUBJECT)
    get = "/egret.query.v1.QueryService/GetScore"

    def ref(value: str) -> query_service_pb2.GetScoreRequest:
        request = query_service_pb2.GetScoreRequest()
        request.subject.subject.kind = subject_pb2.SUBJECT_KIND_PERSON
        request.subject.subject.id_scheme = "resident-id"
        request.subject.subject.id_value = value
        return request

    async with secure.channel("query", token) as channel:
        stub: Any = channel.unary_unary(get, request_serializer=lambda m: m.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub(ref("350200198502023454"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as own:
            await stub(ref("350200199001011230"), timeout=5)
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert own.value.code() == grpc.StatusCode.NOT_FOUND  # allowed; nothing recorded yet


async def test_a_subject_token_names_its_subject_canonically_and_only_a_known_one(secure: Secure) -> None:
    # Issue 12: a token written "...234x" must read the records of "...234X", and a token
    # naming an unknown kind or scheme, or a wrong check character, names nobody.
    get = "/egret.query.v1.QueryService/GetScore"
    request = query_service_pb2.GetScoreRequest()
    request.subject.subject.kind = subject_pb2.SUBJECT_KIND_PERSON
    request.subject.subject.id_scheme = "resident-id"
    request.subject.subject.id_value = "35020019920202234X"
    codes = {}
    for sub in (
        "person:resident-id:35020019920202234x",
        "person:Resident-ID:3502 0019 9202 0223 4X",
        "robot:resident-id:35020019920202234X",
        "person:shoe-size:42",
        "organization:resident-id:35020019920202234X",
        "person:resident-id:350200199202022345",
    ):
        async with secure.channel("query", secure.pki.token(sub, Role.SUBJECT)) as channel:
            stub: Any = channel.unary_unary(get, request_serializer=lambda m: m.SerializeToString())
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub(request, timeout=5)
            codes[sub] = raised.value.code()
    assert list(codes.values()) == [
        grpc.StatusCode.NOT_FOUND,  # its own subject; nothing recorded yet
        grpc.StatusCode.NOT_FOUND,
        *[grpc.StatusCode.UNAUTHENTICATED] * 4,
    ]


async def test_a_client_certificate_from_another_ca_cannot_reach_an_internal_service(
    secure: Secure, tmp_path: Path
) -> None:
    stranger = trustme.CA().issue_cert("127.0.0.1")
    tls = grpc.ssl_channel_credentials(
        root_certificates=secure.pki.ca_file.read_bytes(),
        private_key=stranger.private_key_pem.bytes(),
        certificate_chain=b"".join(b.bytes() for b in stranger.cert_chain_pems),
    )
    token = bearer_token(secure.pki.service_token_file("ingest").read_text().strip())
    async with grpc.aio.secure_channel(secure.addresses["rules"], tls, interceptors=token) as channel:
        code = await call(channel, "rules", "EvaluateEvents", rules_service_pb2.EvaluateEventsRequest())
    assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake is refused
    async with grpc.aio.insecure_channel(secure.addresses["ingest"]) as plaintext:
        code = await call(plaintext, "ingest", "SubmitEvents", ingest_service_pb2.SubmitEventsRequest())
    assert code == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port
    async with secure.pki.service_channel(secure.addresses["rules"], "ingest") as channel:
        code = await call(channel, "rules", "EvaluateEvents", rules_service_pb2.EvaluateEventsRequest())
    assert code == grpc.StatusCode.OK  # the real service certificate and token pass
    assert secure.calls == ["rules.EvaluateEvents"]


async def test_a_principal_over_its_rate_gets_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    pki = create_local_pki(tmp_path / "pki")
    settings = secured(
        ingest_settings(f"sqlite:///{tmp_path / 'ingest.db'}", tmp_path, "127.0.0.1:9"),
        pki,
        "ingest",
        rate_per_second=0.5,
        rate_burst=2.0,
    )
    async with (
        running(settings, ingest_bootstrap.build, ingest_bootstrap.MIGRATIONS) as address,
        pki.channel(address, pki.token("library", Role.DEPARTMENT)) as channel,
    ):
        submit: Any = channel.unary_unary(
            "/egret.ingest.v1.IngestService/SubmitEvents", request_serializer=lambda m: m.SerializeToString()
        )
        codes = []
        for _ in range(3):
            try:
                await submit(ingest_service_pb2.SubmitEventsRequest(source="library"), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
                last = error
    assert codes == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ]
    details = dict(last.trailing_metadata() or ())["grpc-status-details-bin"]
    retry = error_details_pb2.RetryInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 2.0


async def test_a_benefit_provider_checks_only_its_own_benefits_and_states_a_purpose(secure: Secure) -> None:
    def check(benefit_id: str, purpose: str) -> query_service_pb2.CheckEligibilityRequest:
        request = query_service_pb2.CheckEligibilityRequest(benefit_id=benefit_id, purpose=purpose)
        request.subject.subject_key = "a" * 64
        return request

    async with secure.channel("query", secure.pki.token("library", Role.BENEFIT_PROVIDER)) as channel:
        codes = [
            await call(channel, "query", "CheckEligibility", check(benefit, purpose))
            for benefit, purpose in (
                ("metro.discount", "eligibility-check"),  # the metro's benefit, not the library's
                ("library.deposit_free", ""),  # no purpose stated
                ("library.deposit_free", "deposit waiver at the loan desk"),  # free text, no code
                ("library.deposit_free", "eligibility-check"),
            )
        ]
    assert codes == [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,  # allowed; the subject has no score yet
    ]


async def test_reads_of_subject_data_in_rules_and_score_state_a_code_their_role_may_state(
    secure: Secure, tmp_path: Path
) -> None:
    """Backtests, dead letters and verification name subjects only for a purpose the
    caller's role may state (config/purposes.yaml), and record who read them."""
    backtest = backtest_pb2.BacktestRuleSetRequest(rule_set_id=1, purpose="operations")  # admins, auditors
    async with secure.channel("rules", secure.pki.token("rita", Role.REVIEWER)) as channel:
        assert await call(channel, "rules", "BacktestRuleSet", backtest) == grpc.StatusCode.INVALID_ARGUMENT
    async with secure.channel("rules", secure.pki.token("ada", Role.AUDITOR)) as channel:
        letters = [
            await call(
                channel, "rules", "ListDeadLetters", rules_service_pb2.ListDeadLettersRequest(purpose=p)
            )
            for p in ("rule-backtest", "operations", "")
        ]
    assert letters == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.OK]
    async with secure.channel("score", secure.pki.token("ada", Role.AUDITOR)) as channel:
        verified = [
            await call(channel, "score", "VerifyScores", score_service_pb2.VerifyScoresRequest(purpose=p))
            for p in ("dispute-review", "audit")
        ]
    assert verified == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'score'}.db")
    try:
        with engine.connect() as connection:
            recorded = connection.execute(
                sa.select(ScoreAuditLog.role, ScoreAuditLog.purpose, ScoreAuditLog.detail).where(
                    ScoreAuditLog.action == "read:VerifyScores"
                )
            ).all()
    finally:
        engine.dispose()
    # Nothing to verify yet: one record stating the purpose, with no subject.
    assert [(r.role, r.purpose, json.loads(r.detail)["subjects"]) for r in recorded] == [
        ("auditor", "audit", 0)
    ]
