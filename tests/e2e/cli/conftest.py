"""The `egret` command against the four real services: one cluster per test module (SQLite),
its client config written as `make run` writes it, and the installed console script run
as a person runs it (a process per command, output and exit code checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.client_config import default_identities, write_client_config
from devtools.cluster import Cluster

pytestmark = pytest.mark.e2e

# A valid resident id (check character included) for the subject profile.
RESIDENT_ID = "11010519491231002X"
EGRET = str(Path(sys.executable).with_name("egret"))


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass(frozen=True)
class Egret:
    """Runs `egret --config <the cluster's config> ARGS…`."""

    config: Path
    cluster: Cluster
    cwd: Path

    def __call__(self, *args: str, input_text: str | None = None, timeout_s: float = 120.0) -> Result:
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "EGRET_CONFIG": str(self.config)}
        env.pop("EGRET_PROFILE", None)
        done = subprocess.run(
            [EGRET, *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=self.cwd,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(
        tmp_path_factory.mktemp("cli") / "cluster",
        env={"EGRET_RELAY_POLL_SECONDS": "0.05", "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1"},
    ) as running:
        running.wait_healthy()
        yield running


@pytest.fixture(scope="module")
def egret(cli_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Egret:
    directory = tmp_path_factory.mktemp("client")
    config = write_client_config(cli_cluster, directory, default_identities(RESIDENT_ID))
    return Egret(config, cli_cluster, directory)
