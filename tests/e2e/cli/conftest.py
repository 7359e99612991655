"""The `egret` command against the four real services: one cluster per test module (SQLite)
and its client config written as `make run` writes it (tests.support.cli runs the command)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.client_config import default_identities, write_client_config
from devtools.cluster import Cluster
from tests.support.cli import RESIDENT_ID, Egret

pytestmark = pytest.mark.e2e


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
