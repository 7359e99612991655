"""Crashes, restarts, graceful shutdown and tracing across the four processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from devtools.cluster import Cluster
from devtools.population import Origin, Population, PopulationConfig, batch_requests
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret_client.submitter import stream_by_source
from kit.db import create_engine
from services.rules.stores.schema import EmittedOutcome
from tests.support.databases import stored_text
from tests.support.expected_outcomes import expected_outcome_ids
from tests.support.otlp import collector
from tests.support.scenario import SCENARIO, assert_scores_equal_recompute, submit_all
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

# No late arrivals here: with window rules, which events form a window may depend on
# arrival order (docs/rules.md), and this test compares against one in-order evaluation.
POPULATION = PopulationConfig(
    subjects=400, seed=7, duplicate_fraction=0.05, late_fraction=0.0, invalid_events=5
)


def column(cluster: Cluster, service: str, query: str | sa.Executable) -> list[str]:
    """One column of SQL text, or of a statement over a service's tables (whose column
    types read stored digests back as hex)."""
    engine = create_engine(cluster.database_url(service), read_only=True)
    try:
        with engine.connect() as connection:
            statement = sa.text(query) if isinstance(query, str) else query
            return [stored_text(value) for value in connection.scalars(statement)]
    finally:
        engine.dispose()


@pytest.mark.parametrize("victim", ["ingest", "rules", "score", "query"])
async def test_kill_9_mid_stream_then_restart_loses_no_acknowledged_event_and_counts_none_twice(
    cluster: Cluster, victim: str
) -> None:
    population = Population(POPULATION)
    generated = list(population.generate())
    originals = sum(1 for g in generated if g.origin is Origin.ORIGINAL)
    acknowledged = 0
    mid_stream = asyncio.Event()

    def on_ack(_: ingest_pb.StreamEventsRequest, __: ingest_pb.StreamEventsResponse, ___: float) -> None:
        nonlocal acknowledged
        acknowledged += 1
        if acknowledged == 3:  # in the middle of the stream, with batches in flight
            mid_stream.set()

    async def crash_and_restart() -> None:
        await mid_stream.wait()
        cluster.kill(victim)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.start, victim)

    crash = asyncio.create_task(crash_and_restart())
    totals = await stream_by_source(
        cluster.department_channel,
        batch_requests(population.events(), batch_size=50),
        in_flight=4,
        max_retries=30,
        backoff_initial_s=0.1,
        backoff_max_s=1.0,
        on_ack=on_ack,
    )
    await crash
    # Every event sent was acknowledged, once.
    assert totals.events == len(generated)
    assert totals.accepted + totals.duplicate + totals.rejected == totals.events
    assert totals.rejected == POPULATION.invalid_events, [r.event_id for _, r in totals.rejections]
    await asyncio.to_thread(cluster.wait_drained, 120)

    # Nothing lost or doubled at any hop: ingest stored every original once, rules
    # evaluated exactly the stored events, score holds exactly the outcomes rules emitted.
    stored = column(cluster, "ingest", "SELECT source || '/' || event_id FROM ingest_events")
    evaluated = column(cluster, "rules", "SELECT source || '/' || event_id FROM rules_evaluated_events")
    emitted = column(cluster, "rules", sa.select(EmittedOutcome.outcome_id))
    entries = column(cluster, "score", "SELECT entry_id FROM score_ledger")
    assert len(stored) == len(set(stored)) == originals
    assert sorted(evaluated) == sorted(stored)
    assert sorted(entries) == sorted(emitted)
    assert set(entries) == expected_outcome_ids(cluster, population)
    await assert_scores_equal_recompute(cluster)


def test_sigterm_shuts_every_service_down_gracefully(cluster: Cluster) -> None:
    asyncio.run(submit_all(cluster))
    codes = cluster.stop()
    assert codes == {"ingest": 0, "rules": 0, "score": 0, "query": 0}
    for name in ("ingest", "rules", "score", "query"):
        log = cluster.log_path(name).read_text()
        assert '"event": "shutting down"' in log
        assert '"event": "stopped"' in log


def test_a_bad_setting_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRET_")}
    env |= {"EGRET_DATA_DIR": str(tmp_path), "EGRET_MAX_BATCH_SIZE": "0", "EGRET_LISTEN_ADDRESS": "here"}
    result = subprocess.run(
        [sys.executable, "-m", "services.ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "EGRET_SUBJECT_KEY is required but not set" in result.stderr
    assert "EGRET_MAX_BATCH_SIZE=0 is below the minimum 1" in result.stderr
    assert "EGRET_LISTEN_ADDRESS='here' is not a host:port address" in result.stderr


@pytest.fixture
def traced_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, list[object]]]:
    with (
        collector() as (spans, endpoint),
        Cluster(
            tmp_path / "cluster",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "EGRET_RELAY_POLL_SECONDS": "0.05",
            },
        ) as cluster,
    ):
        yield cluster, [spans]


def test_one_trace_follows_a_batch_from_ingest_to_score(traced_cluster: tuple[Cluster, list[object]]) -> None:
    cluster, (spans,) = traced_cluster
    responses = asyncio.run(submit_all(cluster, prefix="traced-"))
    assert all(r.counts.accepted for r in responses)
    cluster.wait_drained(timeout_s=60)
    collected: list[Any] = []
    batches: list[Any] = []
    complete: list[Any] = []

    def every_batch_traced_to_score() -> None:
        collected[:] = spans.snapshot()  # type: ignore[attr-defined]
        batches[:] = [s for s in collected if s.name == "ingest batch"]
        by_trace = {b.trace_id: {s.service for s in collected if s.trace_id == b.trace_id} for b in batches}
        complete[:] = [
            t
            for t, services in by_trace.items()
            if {"egret-ingest", "egret-rules", "egret-score"} <= services
        ]
        assert batches, "no ingest batch spans were exported"
        # A relay sends a claim in one call, in the first batch's trace, linking the others.
        unfollowed = [b.trace_id for b in batches if not _reaches_score(b.trace_id, collected)]
        assert not unfollowed, by_trace

    wait_until(
        every_batch_traced_to_score, what="every batch's trace to reach score", within_s=20, every_s=0.2
    )
    assert complete
    names = {s.name for s in collected if s.trace_id == complete[0]}
    assert {"ingest batch", "ingest→rules relay", "rules evaluate", "rules→score relay"} <= names
    # Spans are per batch, never per event: far fewer spans than events.
    assert len(collected) < 20 * len(batches)
    # Raw subject ids never reach a span.
    raw_ids = {subject for _, _, _, subject, _, _, _ in SCENARIO}
    assert not [s for s in collected for v in s.attributes.values() if any(r in v for r in raw_ids)]


def _reaches_score(trace_id: str, spans: list[Any]) -> bool:
    """Whether a trace, or a trace whose spans link to it (transitively), has score's spans."""
    seen, todo = {trace_id}, [trace_id]
    while todo:
        current = todo.pop()
        if any(s.trace_id == current and s.service == "egret-score" for s in spans):
            return True
        for s in spans:
            if current in s.linked_traces and s.trace_id not in seen:
                seen.add(s.trace_id)
                todo.append(s.trace_id)
    return False
