"""Cluster rehearsal: the rendered manifests, run as processes, carry events ingest → rules → score → query.

deploy/k8s/manifests/ (the chart's default render) is read as a cluster would read it: the
migration hook Jobs run first, then every Deployment starts with exactly the command,
environment, ports and mounted files its manifest gives it, Services route by their selectors,
and finally the `helm test` pod checks every service. See tests/deploy/rehearsal.py for the
few things a cluster provides that are simulated, and how.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from tests.deploy.rehearsal import Rehearsal, load_manifests
from tests.e2e.test_pipeline import EXPECTED, SCENARIO, raw, requests
from tests.support.databases import create_postgres_database, drop_postgres_database

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def operator_secrets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[tuple[str, str], str]]:
    """The Secrets docs/deploy.md tells an operator to create, with the names and keys it gives."""
    if request.param == "sqlite":
        urls = {name: f"sqlite:///{tmp_path / name}.db" for name in ("ingest", "rules", "score")}
    else:
        urls = {name: create_postgres_database() for name in ("ingest", "rules", "score")}
    yield {
        ("egret-database", "ingest-url"): urls["ingest"],
        ("egret-database", "rules-url"): urls["rules"],
        ("egret-database", "score-url"): urls["score"],
        ("egret-database", "score-readonly-url"): urls["score"],
        ("egret-subject-key", "subject-key"): secrets.token_hex(32),
    }
    if request.param == "postgresql":
        for url in urls.values():
            drop_postgres_database(url)


@pytest.fixture
def rehearsal(tmp_path: Path, operator_secrets: dict[tuple[str, str], str]) -> Iterator[Rehearsal]:
    running = Rehearsal(load_manifests(), operator_secrets, tmp_path / "cluster")
    try:
        yield running
    finally:
        running.stop()


async def submit_scenario(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        accepted = 0
        for source, events in requests("rehearsal-").items():
            response = await stub.SubmitEvents(
                ingest_pb.SubmitEventsRequest(source=source, events=events), timeout=10
            )
            accepted += response.counts.accepted
        return accepted


async def scores(address: str) -> dict[str, tuple[int, str, int]]:
    async with grpc.aio.insecure_channel(address) as channel:
        query = query_grpc.QueryServiceStub(channel)
        found = {}
        for subject in EXPECTED:
            score = (await query.GetScore(query_pb.GetScoreRequest(subject=raw(subject)), timeout=5)).score
            found[subject] = (score.score, score.tier, score.entry_count)
        return found


async def wait_for_scores(address: str, timeout_s: float = 60.0) -> dict[str, tuple[int, str, int]]:
    expected = {subject: (score, tier, entries) for subject, (score, tier, _, entries) in EXPECTED.items()}
    deadline = time.monotonic() + timeout_s
    found: dict[str, tuple[int, str, int]] = {}
    while time.monotonic() < deadline:
        try:
            found = await scores(address)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if found == expected:
            break
        await asyncio.sleep(0.2)
    return found


async def test_the_rendered_manifests_run_the_pipeline_end_to_end(rehearsal: Rehearsal) -> None:
    # helm install: pre-install hooks (the migration Jobs) first, each must succeed.
    migrations = rehearsal.hook_pods("pre-install")
    assert migrations == ["egret-ingest-migrate", "egret-rules-migrate", "egret-score-migrate"]
    for job in migrations:
        code, log = rehearsal.run_to_completion(job)
        assert code == 0, log

    # Then the Deployments, which must not migrate again, and must become ready by their own probes.
    deployments = rehearsal.deployments()
    assert sorted(deployments) == ["egret-ingest", "egret-query", "egret-rules", "egret-score"]
    for name in deployments:
        rehearsal.start(name)
    for name in deployments:
        rehearsal.wait_ready(name)
    for name in deployments:
        assert rehearsal.environment(rehearsal.pods[name])["EGRET_MIGRATE_ON_START"] == "false"

    # Clients reach ingest and query through their Services; ingest reaches rules and rules
    # reaches score only through the addresses the manifests gave them.
    accepted = await submit_scenario(rehearsal.service_address("egret-ingest"))
    assert accepted == len(SCENARIO)
    found = await wait_for_scores(rehearsal.service_address("egret-query"))
    assert found == {subject: (s, tier, n) for subject, (s, tier, _, n) in EXPECTED.items()}

    # helm test: the test pod's own command, against the Services, passes.
    (test_pod,) = rehearsal.hook_pods("test")
    code, log = await asyncio.to_thread(rehearsal.run_to_completion, test_pod)
    assert code == 0, log
    assert log.count(": SERVING") == 4, log

    # Pods stop cleanly on SIGTERM within their termination grace period.
    codes = rehearsal.stop()
    assert {name: codes[name] for name in deployments} == dict.fromkeys(deployments, 0), [
        rehearsal.pods[n].log_tail() for n in deployments
    ]


def test_the_helm_test_pod_fails_when_a_service_is_down(rehearsal: Rehearsal) -> None:
    """The health check is not a rubber stamp: with nothing running it reports failure."""
    (test_pod,) = rehearsal.hook_pods("test")
    pod = rehearsal.pods[test_pod]
    # A short deadline: the manifest's own timeout is for a real rollout.
    pod.spec["containers"][0]["args"][0] = "1"
    code, log = rehearsal.run_to_completion(test_pod)
    assert code == 1
    assert log.count("UNAVAILABLE") == 4, log
