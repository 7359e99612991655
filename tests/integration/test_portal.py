"""The portal against the real services: the four services as processes (devtools.cluster,
security on), the local OpenID provider (devtools.oidc_provider) and the portal application
in process. A resident signs in through the real OpenID flow (authorization code, PKCE,
state, nonce), reads what query gives their own token, files a dispute that score records,
sees a reviewer's decision and read, and signs out at the provider."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from devtools.cluster import Cluster, free_port
from devtools.localpki import PORTAL
from devtools.oidc.config import Client, sample_accounts
from devtools.oidc_provider import RunningProvider, running, verifier_env, write_jwks
from egret.common.v1 import due_process_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from services.portal import pages, signin, signin_pages, web
from services.portal.bootstrap import build
from services.portal.resident import contest as contest_pages
from services.portal.settings import PortalSettings
from tests.support.logs import capture
from tests.support.scenario import ALICE, BOB, EXPECTED, raw, submit_all

pytestmark = pytest.mark.e2e

PUBLIC_URL = "http://127.0.0.1:8080"
CLIENT_ID = "egret-portal"


@dataclass
class World:
    cluster: Cluster
    provider: RunningProvider
    settings: PortalSettings


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("portal")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    jwks = tmp / "oidc-jwks.json"
    cluster = Cluster(
        tmp / "cluster",
        env={
            **verifier_env(issuer, jwks),
            "EGRET_RELAY_POLL_SECONDS": "0.05",
            "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1",
        },
    )
    assert cluster.pki is not None
    pki = cluster.pki
    write_jwks(pki.directory, jwks)
    secret = tmp / "client.secret"
    secret.write_text("portal-client-secret")
    (tmp / "session.key").write_text("a-session-secret-of-at-least-32-bytes-long")
    client = Client(
        CLIENT_ID, "portal-client-secret", (f"{PUBLIC_URL}/auth/callback",), (f"{PUBLIC_URL}/signed-out",)
    )
    with (
        running(pki.directory, [client], port=port, accounts=sample_accounts(resident_id=ALICE)) as provider,
        cluster,
    ):
        settings = PortalSettings.from_env(
            {
                "EGRET_PORTAL_PUBLIC_URL": PUBLIC_URL,
                "EGRET_PORTAL_INSECURE_HTTP": "true",
                "EGRET_PORTAL_SESSION_SECRET_FILE": str(tmp / "session.key"),
                "EGRET_PORTAL_OIDC_ISSUER": provider.issuer,
                "EGRET_PORTAL_OIDC_CLIENT_ID": CLIENT_ID,
                "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE": str(secret),
                "EGRET_QUERY_ADDRESS": cluster.address("query"),
                "EGRET_SCORE_ADDRESS": cluster.address("score"),
                "EGRET_RULES_ADDRESS": cluster.address("rules"),
                "EGRET_TLS_CA_FILE": str(pki.ca_file),
                # Score requires a client certificate: the local PKI's portal certificate, and
                # its portal token (egret.public.read, rules' read scope) for the public pages.
                "EGRET_TLS_CERT_FILE": str(pki.cert_file(PORTAL)),
                "EGRET_TLS_KEY_FILE": str(pki.key_file(PORTAL)),
                "EGRET_SERVICE_TOKEN_FILE": str(pki.service_token_file(PORTAL)),
            }
        )
        yield World(cluster, provider, settings)


@pytest.fixture(scope="module")
def populated(world: World) -> World:
    asyncio.run(submit_all(world.cluster))
    world.cluster.wait_drained(timeout_s=60)
    return world


@pytest.fixture
def portal(populated: World) -> Iterator[TestClient]:
    with TestClient(build(populated.settings), base_url=PUBLIC_URL) as client:
        yield client


def sign_in(portal: TestClient, account: str = "resident", password: str = "egret") -> httpx.Client:
    """The browser's part of the flow: the portal sends it to the provider, the person signs
    in there, the provider sends it back with a code. Returns the provider-side browser."""
    start = portal.get("/signin?next=/credit", follow_redirects=False)
    assert start.status_code == 302
    authorize = start.headers["location"]
    assert "code_challenge_method=S256" in authorize
    assert "nonce=" in authorize
    assert "state=" in authorize
    browser = httpx.Client()
    page = browser.get(authorize)
    assert page.status_code == 200
    transaction = re.search(r'name="transaction" value="([^"]+)"', page.text)
    assert transaction
    action = authorize.split("?", 1)[0]
    back = browser.post(
        action,
        data={"transaction": transaction.group(1), "account": account, "password": password},
        follow_redirects=False,
    )
    assert back.status_code == 303
    callback = back.headers["location"]
    assert callback.startswith(f"{PUBLIC_URL}/auth/callback?")
    landed = portal.get(callback.removeprefix(PUBLIC_URL), follow_redirects=False)
    assert landed.status_code == 303, landed.text
    assert landed.headers["location"] == "/credit"
    return browser


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match
    return match.group(1)


def fare_entry_id(portal: TestClient) -> str:
    listing = portal.get("/entries").text
    ids: list[str] = re.findall(r'href="/entries/([0-9a-f]{32})"', listing)
    assert ids
    for entry_id in ids:
        if "transport.metro_fare_evasion" in portal.get(f"/entries/{entry_id}").text:
            return entry_id
    raise AssertionError("no fare evasion entry")


def test_a_resident_signs_in_reads_disputes_and_sees_the_decision_and_who_looked(
    portal: TestClient,
    populated: World,
    span_exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = populated.cluster
    logged = [capture(monkeypatch, module) for module in (signin, contest_pages, web, signin_pages, pages)]
    sign_in(portal)
    portal.get("/language/en")
    credit = portal.get("/credit")
    assert credit.status_code == 200, credit.text
    expected = EXPECTED[ALICE][0]
    assert f'<dd class="score">{expected:,}</dd>' in credit.text
    assert "Score policy 2026.2" in credit.text
    assert "Chen Jing" in credit.text  # the provider's display name

    fare = fare_entry_id(portal)
    entry = portal.get(f"/entries/{fare}")
    assert "Urban Rail Transit Operation Management Provisions" in entry.text
    assert "Lianban" in entry.text  # the evidence snapshot
    # A general entry may be repaired 90 days after the event; this one is a month old.
    repair = portal.get(f"/entries/{fare}/repair")
    assert "Too early: you can apply for repair of this entry from" in repair.text

    # Dispute: form, check, confirm; score records it.
    token = csrf_of(portal.get(f"/entries/{fare}/dispute").text)
    assert (
        portal.post(f"/entries/{fare}/dispute", data={"csrf_token": token, "statement": ""}).status_code
        == 400
    )
    confirm = portal.post(
        f"/entries/{fare}/dispute", data={"csrf_token": token, "statement": "I had a ticket"}
    )
    assert "Check your dispute" in confirm.text
    filed = portal.post(
        f"/entries/{fare}/dispute",
        data={"csrf_token": token, "statement": "I had a ticket", "confirm": "yes"},
        follow_redirects=False,
    )
    assert filed.status_code == 303
    contest = portal.get("/contest").text
    assert "Your dispute has been filed" in contest
    assert "Open: waiting for a decision" in contest
    # The consent in force, read by the resident's own token naming no subject.
    assert "Your consent now" in contest
    assert "You have not given or withdrawn consent." in contest
    assert "Disputed" in portal.get(f"/entries/{fare}").text

    # A reviewer reads the entry for the dispute and overturns it (the existing RPCs).
    async def review() -> None:
        reviewer = cluster.token("reviewer-wang", Role.REVIEWER)
        async with cluster.channel("query", reviewer) as channel:
            query = query_grpc.QueryServiceStub(channel)
            await query.GetEntry(
                query_pb.GetEntryRequest(entry_id=fare, purpose="dispute-review"), timeout=10
            )
            disputes = await query.ListDisputes(
                query_pb.ListDisputesRequest(subject=raw(ALICE), purpose="dispute-review"), timeout=10
            )
        async with cluster.channel("score", reviewer) as channel:
            await score_grpc.ScoreServiceStub(channel).ResolveDispute(
                score_pb.ResolveDisputeRequest(
                    dispute_id=disputes.disputes[0].dispute_id,
                    decision=due_process_pb2.DISPUTE_DECISION_OVERTURN,
                    reason="the gate log shows a valid ticket",
                ),
                timeout=10,
            )

    asyncio.run(review())
    after = portal.get("/credit").text
    assert f'<dd class="score">{expected + 10:,}</dd>' in after
    assert "Decided: the entry was withdrawn" in portal.get("/contest").text
    looked = portal.get("/access").text
    assert "Credit office reviewer" in looked
    assert "Reviewing a dispute you filed" in looked
    assert "You reading your own data" in looked  # the portal's own reads state own-record

    history = portal.get("/history").text
    assert 'src="/history/chart.svg?lang=en"' in history
    chart = portal.get("/history/chart.svg?lang=en")
    assert chart.headers["content-type"] == "image/svg+xml"
    assert "As known at the time" in chart.text
    assert "Dispute" in history
    assert "I had a ticket" not in history  # statements are not history notes

    # The same pages in Chinese.
    portal.get("/language/zh_Hans")
    assert "我的信用" in portal.get("/credit").text

    # No raw identifier in any URL, log line of the portal, or span; the lines were seen.
    signin_lines, route_lines, request_lines, *_ = logged
    assert "signed in" in [line["event"] for line in signin_lines]
    assert "dispute filed" in [line["event"] for line in route_lines]
    assert {"/credit", "/contest"} <= {line["route"] for line in request_lines}
    assert ALICE not in repr(logged)
    for span in span_exporter.get_finished_spans():
        assert ALICE not in span.name
        assert ALICE not in repr(dict(span.attributes or {}))


def test_an_entry_of_someone_else_is_not_found_and_a_forged_form_does_nothing(
    portal: TestClient, populated: World
) -> None:
    cluster = populated.cluster

    async def bobs_entry() -> str:
        async with cluster.channel("query", cluster.token("reviewer-wang", Role.REVIEWER)) as channel:
            listed = await query_grpc.QueryServiceStub(channel).ListEntries(
                query_pb.ListEntriesRequest(subject=raw(BOB), purpose="subject-request"), timeout=10
            )
        return str(listed.entries[0].entry_id)

    other = asyncio.run(bobs_entry())
    sign_in(portal)
    portal.get("/language/en")
    response = portal.get(f"/entries/{other}")
    assert response.status_code == 404
    assert "We could not find this among your data" in response.text
    forged = portal.post(
        f"/entries/{other}/dispute", data={"csrf_token": "forged", "statement": "x", "confirm": "yes"}
    )
    assert forged.status_code == 403
    assert portal.get("/download/my-credit-data.json").status_code == 200


def test_public_pages_read_the_running_services(portal: TestClient) -> None:
    portal.get("/language/en")
    rules = portal.get("/rules").text
    assert "rule set egret-sample" in rules
    assert "Drunk driving" in rules
    # Policy and catalogue from score and query, read with the portal's own token.
    tiers = portal.get("/tiers").text
    assert "Score policy 2026.2, in force since" in tiers
    assert "cannot be read" not in tiers
    catalogue = portal.get("/catalogue").text
    assert "Borrow books without paying a deposit" in catalogue
    assert "cannot be read" not in catalogue
    how = portal.get("/how-it-works").text
    assert "within 20 days" in how


def test_sign_out_ends_the_session_here_and_at_the_provider(portal: TestClient, populated: World) -> None:
    browser = sign_in(portal)
    assert portal.get("/credit", follow_redirects=False).status_code == 200
    token = csrf_of(portal.get("/credit").text)
    out = portal.post("/signout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303
    assert out.headers["location"].startswith(populated.provider.issuer + "/logout?")
    assert "id_token_hint=" in out.headers["location"]
    browser.get(out.headers["location"])
    assert portal.get("/credit", follow_redirects=False).headers["location"].startswith("/signin")


def test_a_staff_account_is_told_this_site_is_for_residents(portal: TestClient) -> None:
    sign_in(portal, account="reviewer")
    response = portal.get("/credit")
    assert response.status_code == 403


def test_the_business_representative_sees_the_organisations_credit(portal: TestClient) -> None:
    sign_in(portal, account="business")
    # The sample business has no events in this scenario: no score yet, said in words.
    response = portal.get("/credit")
    assert response.status_code == 200
    assert "信用办尚无您的记录" in response.text
