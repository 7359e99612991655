"""Rules split over two shards, each sending to its own score replica on one shared PostgreSQL
database, gives exactly what one rules and one score instance give on SQLite, across processes."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from devtools.cluster import Cluster
from devtools.population import Population, PopulationConfig, batch_requests
from egret.common.v1 import event_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from egret_client.submitter import stream_by_source
from kit.db import create_engine
from kit.packing import unpack
from kit.sharding import shard_of
from services.rules.stores.schema import EvaluatedEvent
from tests.support.databases import create_postgres_database, drop_postgres_database, stored_text
from tests.support.expected_outcomes import expected_outcome_ids
from tests.support.scenario import assert_scores_equal_recompute
from tests.support.scrape import scrape, total

pytestmark = pytest.mark.e2e

# A few thousand events (with duplicates and late arrivals), enough for window rules to fire.
POPULATION = PopulationConfig(subjects=800, seed=11, duplicate_fraction=0.03, late_fraction=0.05)


@dataclass(frozen=True)
class Outcome:
    ledger: frozenset[str]
    scores: dict[str, tuple[int, str, int]]
    evaluated_by: dict[str, frozenset[str]]  # rules process → subject keys it evaluated
    applied_by: dict[str, float]  # score process → outcomes it applied


def read(url: str, query: str | sa.Executable) -> list[tuple[Any, ...]]:
    """Rows of SQL text, or of a statement over a service's tables (whose column types read
    stored digests back as hex)."""
    engine = create_engine(url, read_only=True)
    try:
        with engine.connect() as connection:
            statement = sa.text(query) if isinstance(query, str) else query
            return [tuple(row) for row in connection.execute(statement)]
    finally:
        engine.dispose()


async def run_population(
    data_dir: Path, subject_key: str, rules_shards: int, score_url: str | None = None
) -> tuple[Outcome, Cluster]:
    """The population through a cluster; with `score_url`, as many score replicas as rules
    shards share that database."""
    cluster = Cluster(
        data_dir,
        subject_key=subject_key,
        rules_shards=rules_shards,
        score_replicas=rules_shards if score_url else 1,
        database_urls={"score": score_url} if score_url else None,
        env={"EGRET_RELAY_POLL_SECONDS": "0.05", "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1"},
    )
    with cluster:
        totals = await stream_by_source(
            cluster.department_channel,
            batch_requests(Population(POPULATION).events(), batch_size=200),
            in_flight=4,
        )
        assert totals.rejected == 0
        await asyncio.to_thread(cluster.wait_drained, 180)
        await assert_scores_equal_recompute(cluster)
        if rules_shards > 1:
            await assert_a_misrouted_event_is_refused(cluster)
        score_url = cluster.database_url("score")
        outcome = Outcome(
            ledger=frozenset(stored_text(r[0]) for r in read(score_url, "SELECT entry_id FROM score_ledger")),
            scores={
                stored_text(r[0]): (int(r[1]), str(r[2]), int(r[3]))
                for r in read(score_url, "SELECT subject_key, score, tier, entry_count FROM score_subjects")
            },
            evaluated_by={
                name: frozenset(
                    stored_text(r[0])
                    for r in read(
                        cluster.database_url(name), sa.select(EvaluatedEvent.subject_key).distinct()
                    )
                )
                for name in cluster.rules_names
            },
            applied_by={
                name: total(scrape(cluster.admin_url(name)), "egret_score_outcomes_applied_total")
                for name in cluster.score_names
            },
        )
    return outcome, cluster


async def assert_a_misrouted_event_is_refused(cluster: Cluster) -> None:
    """A caller that sends shard 0's subject to shard 1 is told so, naming the shards."""
    (row,) = read(
        cluster.database_url("ingest"),
        "SELECT subject_key, record FROM ingest_events ORDER BY sequence LIMIT 1",
    )
    subject_key, record = stored_text(row[0]), unpack(bytes(row[1]))
    event = event_pb2.RecordedEvent.FromString(record)
    wrong = f"rules-{1 - shard_of(subject_key, 2)}"
    async with cluster.service_channel(wrong, "ingest") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rules_grpc.RulesServiceStub(channel).EvaluateEvents(
                rules_pb.EvaluateEventsRequest(events=[event]), timeout=10
            )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{wrong[-1]} of 2" in (raised.value.details() or "")


@pytest.fixture
def score_url() -> Iterator[str]:
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.mark.postgres
async def test_two_rules_shards_and_score_replicas_give_the_same_ledger_and_scores_as_one(
    tmp_path: Path, score_url: str
) -> None:
    subject_key = secrets.token_hex(32)  # the same pseudonyms in both runs, so outcome ids compare
    single, single_cluster = await run_population(tmp_path / "one", subject_key, rules_shards=1)
    sharded, _ = await run_population(tmp_path / "two", subject_key, rules_shards=2, score_url=score_url)

    assert len(single.ledger) > 1000
    assert sharded.ledger == single.ledger
    assert sharded.scores == single.scores
    # And both equal an in-process evaluation of every accepted event by one engine.
    assert single.ledger == expected_outcome_ids(single_cluster, Population(POPULATION))

    # The subjects were really split: each shard evaluated only, and all of, its own.
    first, second = sharded.evaluated_by["rules-0"], sharded.evaluated_by["rules-1"]
    assert first
    assert second
    assert not first & second
    assert first | second == single.evaluated_by["rules"]
    assert all(shard_of(key, 2) == 0 for key in first)
    assert all(shard_of(key, 2) == 1 for key in second)

    # Both score replicas wrote to the one ledger, which has each outcome once (the scores
    # above were also recomputed from it, assert_scores_equal_recompute).
    assert set(sharded.applied_by) == {"score-0", "score-1"}
    assert all(applied > 0 for applied in sharded.applied_by.values())
    assert sum(sharded.applied_by.values()) == len(sharded.ledger)
