"""The Node.js example client (examples/node) against the four services as processes: built
from the protos with buf and ts-proto, it submits events as a department, decodes a refusal's
rich error details and reads a score as a reviewer, over TLS with bearer tokens from files.

Node and npm come from the system, the example's packages from `make setup` (npm ci, from
the lockfile); the test installs them itself only when that install is missing or stale.
Without node or npm the test skips, and fails on CI (CI set), where make setup installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from devtools.cluster import REPO_ROOT, Cluster
from kit.principal import Role
from tests.support.events import resident_id
from tests.support.tools import tool_missing

pytestmark = pytest.mark.e2e

EXAMPLE = REPO_ROOT / "examples" / "node"
LOCKFILE = EXAMPLE / "package-lock.json"
# npm ci writes this last; older than the lockfile means the packages are stale.
INSTALLED = EXAMPLE / "node_modules" / ".package-lock.json"
SUBJECT = resident_id(4242)


def npm_command() -> str:
    """npm's path; skip without node or npm (fail on CI, where make setup installs them)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        tool_missing("the Node example needs node and npm: apt-get install nodejs npm, then make setup")
    return npm


def run_npm(npm: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(
        [npm, *args],
        cwd=EXAMPLE,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    command = " ".join(args)
    assert done.returncode == 0, f"npm {command} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def npm() -> str:
    """npm, with the example installed (npm ci, npm's cache first, only when make setup's
    install is missing or older than the lockfile) and built (buf generate, then tsc)."""
    npm = npm_command()
    if not INSTALLED.exists() or INSTALLED.stat().st_mtime < LOCKFILE.stat().st_mtime:
        run_npm(npm, "ci", "--prefer-offline", "--no-audit", "--no-fund")
    run_npm(npm, "run", "build")
    return npm


@pytest.fixture
def sqlite_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The four services on SQLite: what this test proves is the client, not the store."""
    with Cluster(tmp_path / "cluster", env={"EGRET_RELAY_POLL_SECONDS": "0.05"}) as running:
        yield running


def example_env(cluster: Cluster, tokens: Path, *, department_token: str) -> dict[str, str]:
    """The example's settings (examples/node/README.md) for this cluster, with the operator's
    client certificate so the optional mutual-TLS path is used too."""
    pki = cluster.pki
    assert pki is not None
    tokens.mkdir(exist_ok=True)
    files = {"department": department_token, "reviewer": cluster.token("node-reviewer", Role.REVIEWER)}
    for role, token in files.items():
        (tokens / f"{role}.token").write_text(token)
        (tokens / f"{role}.token").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRET_")}
    env.update(
        EGRET_INGEST_ADDRESS=cluster.address("ingest"),
        EGRET_QUERY_ADDRESS=cluster.address("query"),
        EGRET_CA_FILE=str(pki.ca_file),
        EGRET_CLIENT_CERT_FILE=str(pki.cert_file("operator")),
        EGRET_CLIENT_KEY_FILE=str(pki.key_file("operator")),
        EGRET_DEPARTMENT_TOKEN_FILE=str(tokens / "department.token"),
        EGRET_REVIEWER_TOKEN_FILE=str(tokens / "reviewer.token"),
        EGRET_DEPARTMENT="library",
        EGRET_SUBJECT_ID=SUBJECT,
        EGRET_PURPOSE="subject-request",
        EGRET_SCORE_WAIT_SECONDS="60",
    )
    return env


def start(npm: str, env: Mapping[str, str]) -> tuple[int, list[dict[str, Any]], str]:
    """`npm start`: its exit status, its JSON lines and everything it printed."""
    done = subprocess.run(
        [npm, "--silent", "start"],
        cwd=EXAMPLE,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, lines, f"{done.stdout}\n{done.stderr}"


def steps(lines: list[dict[str, Any]], step: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["step"] == step]


def names_attribute(violation: Mapping[str, str], attribute: str) -> bool:
    # The path's prefix (from the event or from the request root) is not this test's concern.
    return re.search(rf"\b{attribute}$", violation["field"]) is not None


def test_node_client_submits_decodes_error_details_and_reads_the_score(
    npm: str, sqlite_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = sqlite_cluster
    department = cluster.token("library", Role.DEPARTMENT)
    env = example_env(cluster, tmp_path / "tokens", department_token=department)
    code, lines, output = start(npm, env)
    assert code == 0, output

    submitted = steps(lines, "submit")
    assert [line["status"] for line in submitted] == ["EVENT_STATUS_ACCEPTED"] * 3 + ["EVENT_STATUS_REJECTED"]
    assert all(line["violations"] == [] for line in submitted[:3]), output
    rejected = submitted[3]["violations"]
    assert any(names_attribute(v, "days_late") and v["reason"] == "OUT_OF_RANGE" for v in rejected), output
    assert any(names_attribute(v, "shelf") and v["reason"] == "UNKNOWN" for v in rejected), output
    assert steps(lines, "submit_counts") == [
        {"step": "submit_counts", "accepted": 3, "duplicate": 0, "rejected": 1, "conflict": 0}
    ]

    (refusal,) = steps(lines, "error_details")
    assert (refusal["code"], refusal["has_details"]) == ("INVALID_ARGUMENT", True), output
    (bad_request,) = [d for d in refusal["details"] if d["type"] == "google.rpc.BadRequest"]
    violations = bad_request["field_violations"]
    assert any(names_attribute(v, "days_late") for v in violations), output
    assert any(names_attribute(v, "shelf") for v in violations), output

    # One late return of more than 30 days: the sample rules take 3 of the base 1000 points.
    (score,) = steps(lines, "score")
    assert (score["score"], score["entry_count"], score["purpose"]) == (997, 1, "subject-request"), output
    assert score["subject_key"] == cluster.pseudonymiser.subject_key("person", "resident-id", SUBJECT)
    assert steps(lines, "done") == [{"step": "done", "ok": True}]

    # A token of the wrong role: the example reports the refusal and exits non-zero.
    not_a_department = cluster.token("node-reviewer", Role.REVIEWER)
    env = example_env(cluster, tmp_path / "wrong", department_token=not_a_department)
    code, lines, output = start(npm, env)
    assert code == 1, output
    (done,) = steps(lines, "done")
    assert done["ok"] is False
    assert done["unexpected"]["code"] == "PERMISSION_DENIED", output
