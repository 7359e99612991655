"""Cluster rehearsal: the rendered manifests, run as processes, carry events ingest → rules → score → query,
and the portal serves its public pages from the running services.

deploy/k8s/manifests/ (the chart's default render) is read as a cluster would read it: the
migration hook Jobs run first, then every Deployment starts with exactly the command,
environment, ports and mounted files its manifest gives it, becomes ready by its own readiness
probe (a GET of its admin port's /readyz), serves its metrics there,
Services route by their selectors, and finally the `helm test` pod checks every service. Security
is on, as the manifests say: the operator's TLS, JWT-key and service-token Secrets come from a
throwaway PKI (tests/support/pki.py), clients call with TLS and bearer tokens, and the services
call each other over mutual TLS with their own tokens. See tests/support/rehearsal.py for the
few things a cluster provides that are simulated, and how.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.k8s.render import REPO_ROOT
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from kit.principal import Role
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.pki import RehearsalPki, create_rehearsal_pki
from tests.support.rehearsal import Rehearsal, load_manifests
from tests.support.scenario import EXPECTED, SCENARIO, raw, requests

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def operator_secrets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[tuple[str, str], str]]:
    """The Secrets docs/deploy.md tells an operator to create, with the names and keys it gives."""
    if request.param == "sqlite":
        urls = {name: f"sqlite:///{tmp_path / name}.db" for name in ("ingest", "rules", "score", "query")}
    else:
        urls = {name: create_postgres_database() for name in ("ingest", "rules", "score", "query")}
    yield {
        ("egret-database", "ingest-url"): urls["ingest"],
        ("egret-database", "rules-url"): urls["rules"],
        ("egret-database", "score-url"): urls["score"],
        ("egret-database", "score-readonly-url"): urls["score"],
        ("egret-database", "query-url"): urls["query"],
        ("egret-subject-key", "subject-key"): secrets.token_hex(32),
        ("egret-audit-key", "audit-key"): secrets.token_hex(32),
        ("egret-portal-oidc", "client-secret"): secrets.token_urlsafe(24),
        ("egret-portal-session", "session-secret"): secrets.token_urlsafe(32),
    }
    if request.param == "postgresql":
        for url in urls.values():
            drop_postgres_database(url)


@dataclass
class Cluster:
    rehearsal: Rehearsal
    pki: RehearsalPki


@pytest.fixture
def cluster(tmp_path: Path, operator_secrets: dict[tuple[str, str], str]) -> Iterator[Cluster]:
    running = Rehearsal(load_manifests(), operator_secrets, tmp_path / "cluster")
    # cert-manager and the identity provider: the TLS, JWT-key and service-token Secrets.
    pki = create_rehearsal_pki(running)
    try:
        yield Cluster(running, pki)
    finally:
        running.stop()


async def submit_scenario(cluster: Cluster) -> int:
    accepted = 0
    for source, events in requests("rehearsal-").items():
        # Each department with its own token (`sub` = the event source); ingest requires a deadline.
        token = cluster.pki.token(source, Role.DEPARTMENT)
        async with cluster.pki.channel(cluster.rehearsal, "egret-ingest", token) as channel:
            response = await ingest_grpc.IngestServiceStub(channel).SubmitEvents(
                ingest_pb.SubmitEventsRequest(source=source, events=events), timeout=10
            )
        accepted += response.counts.accepted
    return accepted


async def scores(cluster: Cluster) -> dict[str, tuple[int, str, int]]:
    token = cluster.pki.token("rehearsal-reviewer", Role.REVIEWER)
    async with cluster.pki.channel(cluster.rehearsal, "egret-query", token) as channel:
        query = query_grpc.QueryServiceStub(channel)
        found = {}
        for subject in EXPECTED:
            request = query_pb.GetScoreRequest(subject=raw(subject), purpose="subject-request")
            score = (await query.GetScore(request, timeout=5)).score
            found[subject] = (score.score, score.tier, score.entry_count)
        return found


async def wait_for_scores(cluster: Cluster, timeout_s: float = 60.0) -> dict[str, tuple[int, str, int]]:
    expected = {subject: (score, tier, entries) for subject, (score, tier, _, entries) in EXPECTED.items()}
    deadline = time.monotonic() + timeout_s
    found: dict[str, tuple[int, str, int]] = {}
    while time.monotonic() < deadline:
        try:
            found = await scores(cluster)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if found == expected:
            break
        await asyncio.sleep(0.2)
    return found


async def health(cluster: Cluster, service: str, credentials: grpc.ChannelCredentials) -> str:
    """grpc.health.v1 of Service `service`, dialled by name with the given credentials."""
    address = cluster.rehearsal.service_address(service)
    options = [("grpc.ssl_target_name_override", service)]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_the_rendered_manifests_run_the_pipeline_end_to_end(cluster: Cluster) -> None:
    rehearsal = cluster.rehearsal
    # helm install: pre-install hooks (the migration Jobs) first, each must succeed, without
    # any TLS or token keys (migrate does not serve).
    migrations = rehearsal.hook_pods("pre-install")
    assert migrations == [
        "egret-ingest-migrate",
        "egret-rules-migrate",
        "egret-score-migrate",
        "egret-query-migrate",
    ]
    for job in migrations:
        code, log = rehearsal.run_to_completion(job)
        assert code == 0, log

    # Then the Deployments, which must not migrate again, run secure (no EGRET_INSECURE), and
    # must become ready by their own readiness probes: GETs of /readyz on the plain-HTTP admin
    # port the manifests give them (EGRET_ADMIN_ADDRESS, container port "admin").
    deployments = rehearsal.deployments()
    workloads = ("ingest", "portal", "query", "rules", "score")
    assert sorted(deployments) == [f"egret-{name}" for name in workloads]
    for name in deployments:
        rehearsal.start(name)
    for name in deployments:
        rehearsal.wait_ready(name)
    services = [name for name in deployments if name != "egret-portal"]
    for name in services:
        env = rehearsal.environment(rehearsal.pods[name])
        assert (env["EGRET_MIGRATE_ON_START"], env["EGRET_INSECURE"]) == ("false", "false")
        for kind in ("startupProbe", "livenessProbe"):
            code, output = rehearsal.probe(name, kind)
            assert code == 0, (name, kind, output)
            assert output.endswith(": HTTP 200"), (name, kind, output)
        assert "INSECURE" not in rehearsal.pods[name].log_path.read_text(errors="replace").upper()
        # The admin port serves the service's metrics (ready: egret_ready 1) and nothing else.
        status, metrics = rehearsal.http_get(name, "admin", "/metrics")
        assert status == 200, (name, metrics)
        assert re.search(r"^egret_ready(\{[^}]*\})? 1(\.0)?$", metrics, re.MULTILINE), (name, metrics[:2000])
        assert rehearsal.http_get(name, "admin", "/")[0] == 404, name

    # Clients reach ingest and query through their Services, over TLS with bearer tokens;
    # ingest reaches rules and rules reaches score only through the addresses the manifests gave
    # them, over mutual TLS with their service tokens, verifying the callee's certificate.
    accepted = await submit_scenario(cluster)
    assert accepted == len(SCENARIO)
    found = await wait_for_scores(cluster)
    assert found == {subject: (s, tier, n) for subject, (s, tier, _, n) in EXPECTED.items()}, [
        rehearsal.pods[n].log_tail() for n in deployments
    ]

    # What the security wiring refuses: a call without a token, and a client without a
    # certificate on the internal services.
    async with cluster.pki.channel(rehearsal, "egret-query", None) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await query_grpc.QueryServiceStub(channel).GetScore(
                query_pb.GetScoreRequest(subject=raw(next(iter(EXPECTED)))), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    plain_tls = cluster.pki.credentials()
    assert await health(cluster, "egret-ingest", plain_tls) == "SERVING"
    assert await health(cluster, "egret-query", plain_tls) == "SERVING"
    assert await health(cluster, "egret-rules", plain_tls) == "UNAVAILABLE"  # mutual TLS
    assert await health(cluster, "egret-score", plain_tls) == "UNAVAILABLE"

    # The portal: its kubelet HTTP probes pass, and through its Service it serves the public
    # pages, the published rules read from rules with its own token over mutual TLS.
    await check_the_portal(cluster)

    # helm install's post-install hook: the config-apply Job, with its own certificate and
    # token, finds the values' rule set and policy active (rules and score imported them at
    # their first start) and changes nothing.
    (config_apply,) = rehearsal.hook_pods("post-install")
    code, log = await asyncio.to_thread(rehearsal.run_to_completion, config_apply)
    assert code == 0, log
    rules, score = rehearsal.service_address("egret-rules"), rehearsal.service_address("egret-score")
    assert f"rule set on {rules}: unchanged: egret-sample version 2 is active" in log, log
    assert f"policy on {score}: unchanged: version 2026.2 is active" in log, log

    # helm test: the test pod's own command, against the Services, with its client certificate,
    # and the portal's /healthz.
    (test_pod,) = rehearsal.hook_pods("test")
    code, log = await asyncio.to_thread(rehearsal.run_to_completion, test_pod)
    assert code == 0, log
    assert log.count(": SERVING") == 5, log
    assert f"http://{rehearsal.service_address('egret-portal')}/healthz: SERVING" in log, log

    # Pods stop cleanly on SIGTERM within their termination grace period (uvicorn, having
    # finished its requests, re-raises the SIGTERM it caught: the portal ends by that signal).
    codes = rehearsal.stop()
    expected = {**dict.fromkeys(services, 0), "egret-portal": -signal.SIGTERM}
    assert {name: codes[name] for name in deployments} == expected, [
        rehearsal.pods[n].log_tail() for n in deployments
    ]
    assert "Application shutdown complete" in rehearsal.pods["egret-portal"].log_path.read_text()


def published_rule_titles() -> list[str]:
    """The titles of the active rule set the chart mounts for rules (its bundled sample)."""
    ruleset = yaml.safe_load((REPO_ROOT / "deploy/k8s/egret/files/rulesets/sample.yaml").read_text())
    return [str(rule["title"]) for rule in ruleset["rules"]]


async def check_the_portal(cluster: Cluster) -> None:
    rehearsal = cluster.rehearsal
    env = rehearsal.environment(rehearsal.pods["egret-portal"])
    assert env["EGRET_INSECURE"] == "false"
    # The services it calls, resolved through their Services to their pods, over TLS with the
    # portal's own client certificate (rules and score require one).
    for service in ("query", "score", "rules"):
        assert env[f"EGRET_{service.upper()}_ADDRESS"] == rehearsal.service_address(f"egret-{service}")
    for kind in ("startupProbe", "livenessProbe"):
        code, output = rehearsal.probe("egret-portal", kind)
        assert code == 0, (kind, output)
    base = f"http://{rehearsal.service_address('egret-portal')}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        health = await client.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok")
        home = await client.get("/")
        assert home.status_code == 200, home.text
        assert "Content-Security-Policy" in home.headers
        rules = await client.get("/rules", headers={"Cookie": "egret_lang=en"})
        assert rules.status_code == 200, rules.text
    titles = published_rule_titles()
    assert titles
    assert all(title in rules.text for title in titles), rehearsal.pods["egret-portal"].log_tail()
    # None of its calls to the services was refused or failed.
    assert "UNAVAILABLE" not in rehearsal.pods["egret-portal"].log_path.read_text()


def test_the_helm_test_pod_fails_when_a_service_is_down(cluster: Cluster) -> None:
    """The health check is not a rubber stamp: with nothing running it reports failure."""
    rehearsal = cluster.rehearsal
    (test_pod,) = rehearsal.hook_pods("test")
    pod = rehearsal.pods[test_pod]
    # A short deadline: the manifest's own timeout is for a real rollout.
    pod.spec["containers"][0]["args"][0] = "1"
    code, log = rehearsal.run_to_completion(test_pod)
    assert code == 1
    assert log.count("UNAVAILABLE") == 5, log  # the four services and the portal


def test_a_service_without_its_security_secrets_refuses_to_serve(cluster: Cluster) -> None:
    """Security is on by default: without the manifests' TLS and token settings a pod exits 2."""
    rehearsal = cluster.rehearsal
    pod = rehearsal.pods["egret-score"]
    pod.spec["containers"][0]["env"] = [
        e
        for e in pod.spec["containers"][0]["env"]
        if not str(e["name"]).startswith(("EGRET_TLS_", "EGRET_JWT_"))
    ]
    code, log = rehearsal.run_to_completion("egret-score")
    assert code == 2, log
    assert "EGRET_TLS_CERT_FILE is required" in log
