"""End-to-end fixtures: the four services as separate processes (devtools.cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.cluster import Cluster
from tests.support.databases import create_postgres_database, drop_postgres_database

pytestmark = pytest.mark.e2e

SERVICES = ("ingest", "rules", "score", "query")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_urls(backend: str) -> Iterator[dict[str, str]]:
    """Per-service databases: {} means the cluster's own SQLite files."""
    if backend == "sqlite":
        yield {}
        return
    urls = {name: create_postgres_database() for name in ("ingest", "rules", "score", "query")}
    try:
        yield urls
    finally:
        for url in urls.values():
            drop_postgres_database(url)


@pytest.fixture
def cluster(tmp_path: Path, database_urls: dict[str, str]) -> Iterator[Cluster]:
    with Cluster(
        tmp_path / "cluster",
        database_urls=database_urls,
        env={"EGRET_RELAY_POLL_SECONDS": "0.05", "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1"},
    ) as running:
        yield running
