"""The privacy proof: raw subject identifiers never reach a log line, a span or a table.

Four services run as processes with debug logging and tracing to an in-memory OTLP
collector. The test submits a synthetic population (raw resident ids and USCCs, including
invalid events), reads scores by raw id through every subject read, files a dispute,
applies for repair and sets consent with subject tokens (whose `sub` carries the raw id),
retracts and corrects events, then stops the services and searches every log file, every
exported span request (byte for byte) and every cell of every table of every database
(for SQLite also the raw database, WAL and journal files) for every raw id it used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from devtools.cluster import Cluster
from devtools.population import Origin, Population, PopulationConfig, batch_requests
from egret.common.v1 import due_process_pb2, event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from egret_client.submitter import stream_by_source
from kit.principal import Role
from kit.protoconv import SUBJECT_KIND_NAMES
from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.otlp import Collector, collector
from tests.support.privacy import Finding, find_in, scan_database, scan_files
from tests.support.purposes import purposed

pytestmark = pytest.mark.e2e

POPULATION = PopulationConfig(subjects=80, seed=23, duplicate_fraction=0.02, invalid_events=6)
# A raw id that is never stored anywhere: looked up, it must leave no trace either.
UNKNOWN = subject_pb2.Subject(
    kind=subject_pb2.SUBJECT_KIND_PERSON, id_scheme="resident-id", id_value="350203198807070015"
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def traced(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Cluster, Collector]]:
    names = ("ingest", "rules", "score", "query")
    urls = {n: create_postgres_database() for n in names} if request.param == "postgresql" else {}
    try:
        with (
            collector() as (spans, endpoint),
            Cluster(
                tmp_path / "cluster",
                database_urls=urls,
                log_level="debug",
                env={
                    "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                    "OTEL_EXPORTER_OTLP_INSECURE": "true",
                    "OTEL_BSP_SCHEDULE_DELAY": "100",
                    "EGRET_RELAY_POLL_SECONDS": "0.05",
                },
            ) as cluster,
        ):
            yield cluster, spans
    finally:
        for url in urls.values():
            drop_postgres_database(url)


async def attempt(call: Awaitable[object]) -> grpc.aio.AioRpcError | None:
    """The call's error, if it failed; refusals are part of what the proof exercises."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    return None


def subject_token(cluster: Cluster, subject: subject_pb2.Subject) -> str:
    kind = SUBJECT_KIND_NAMES[subject.kind]
    return cluster.token(f"{kind}:{subject.id_scheme}:{subject.id_value}", Role.SUBJECT)


async def exercise(cluster: Cluster, population: Population) -> set[str]:
    """Drive every path that handles a raw id; return the raw ids used."""
    generated = list(population.generate())
    raw_ids = {g.event.subject.id_value for g in generated if g.event.subject.id_value}
    raw_ids.add(UNKNOWN.id_value)
    totals = await stream_by_source(
        cluster.department_channel, batch_requests(population.events(), batch_size=40), in_flight=2
    )
    assert totals.rejected == POPULATION.invalid_events
    await asyncio.to_thread(cluster.wait_drained, 120)

    busiest = population.busiest_subjects(4)
    originals = [g for g in generated if g.origin is Origin.ORIGINAL]

    # A department retracts one event and corrects another (the replacement names the
    # subject by raw id again).
    retracted, corrected = originals[0], originals[1]
    async with cluster.department_channel(retracted.source) as channel:
        await ingest_grpc.IngestServiceStub(channel).RetractEvent(
            ingest_pb.RetractEventRequest(
                ref=event_pb2.EventRef(source=retracted.source, event_id=retracted.event.event_id),
                reason="reported against the wrong person",
            ),
            timeout=10,
        )
    async with cluster.department_channel(corrected.source) as channel:
        replacement = ingest_pb.Event()
        replacement.CopyFrom(corrected.event)
        replacement.event_id = f"{corrected.event.event_id}-corrected"
        await ingest_grpc.IngestServiceStub(channel).CorrectEvent(
            ingest_pb.CorrectEventRequest(
                ref=event_pb2.EventRef(source=corrected.source, event_id=corrected.event.event_id),
                reason="wrong station code",
                replacement=replacement,
            ),
            timeout=10,
        )
    await asyncio.to_thread(cluster.wait_drained, 120)

    reviewer = cluster.token("privacy-reviewer", Role.REVIEWER)
    async with cluster.channel("query", reviewer) as channel:
        query = purposed(query_grpc.QueryServiceStub(channel), "subject-request")
        for synthetic in busiest:
            ref = subject_pb2.SubjectRef(subject=synthetic.proto())
            await query.GetScore(
                query_pb.GetScoreRequest(subject=ref, purpose_note="privacy test"), timeout=10
            )
            await query.BatchGetScores(query_pb.BatchGetScoresRequest(subjects=[ref]), timeout=10)
            await query.ListScoreHistory(query_pb.ListScoreHistoryRequest(subject=ref), timeout=10)
            await query.ListScoreHistory(
                query_pb.ListScoreHistoryRequest(subject=ref, as_corrected=True), timeout=10
            )
            page = await query.ListEntries(query_pb.ListEntriesRequest(subject=ref), timeout=10)
            for entry in page.entries[:2]:
                await query.GetEntry(query_pb.GetEntryRequest(entry_id=entry.entry_id), timeout=10)
            await query.Explain(query_pb.ExplainRequest(subject=ref), timeout=10)
            await query.ListDisputes(query_pb.ListDisputesRequest(subject=ref), timeout=10)
        # Lookups that fail must not echo the raw id either.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await query.GetScore(
                query_pb.GetScoreRequest(subject=subject_pb2.SubjectRef(subject=UNKNOWN)), timeout=10
            )
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert UNKNOWN.id_value not in (missing.value.details() or "")

    provider = cluster.token("metro", Role.BENEFIT_PROVIDER)
    async with cluster.channel("query", provider) as channel:
        for synthetic in busiest:
            error = await attempt(
                query_grpc.QueryServiceStub(channel).CheckEligibility(
                    query_pb.CheckEligibilityRequest(
                        subject=subject_pb2.SubjectRef(subject=synthetic.proto()),
                        benefit_id="metro.discount",
                        purpose="eligibility-check",
                        purpose_note="fare discount at gate 4",
                    ),
                    timeout=10,
                )
            )
            if error is not None:  # e.g. an organization: not a kind the benefit serves
                assert error.code() is not grpc.StatusCode.INTERNAL
                assert synthetic.proto().id_value not in (error.details() or "")

    # The subject itself, with a token whose `sub` is its raw id: reads, consent, a dispute
    # and a repair application.
    person = next(s for s in busiest if s.proto().kind == subject_pb2.SUBJECT_KIND_PERSON)
    token = subject_token(cluster, person.proto())
    own = subject_pb2.SubjectRef(subject=person.proto())
    async with cluster.channel("query", token) as channel:
        query = query_grpc.QueryServiceStub(channel)
        await query.GetScore(query_pb.GetScoreRequest(subject=own), timeout=10)
        await query.Explain(query_pb.ExplainRequest(subject=own), timeout=10)
        await query.ListAccessLog(query_pb.ListAccessLogRequest(subject=own), timeout=10)
        entries = (await query.ListEntries(query_pb.ListEntriesRequest(subject=own), timeout=10)).entries
    async with cluster.channel("score", token) as channel:
        score = score_grpc.ScoreServiceStub(channel)
        await score.SetConsent(score_pb.SetConsentRequest(granted=True), timeout=10)
        counting = [e for e in entries if e.status == query_pb.ENTRY_STATUS_ACTIVE]
        if counting:
            await score.FileDispute(
                score_pb.FileDisputeRequest(entry_id=counting[0].entry_id, statement="not me"), timeout=10
            )
        for entry in counting[1:]:
            if entry.points < 0:
                error = await attempt(
                    score.ApplyForRepair(
                        score_pb.ApplyForRepairRequest(entry_id=entry.entry_id, evidence="paid the fine"),
                        timeout=10,
                    )
                )
                if error is not None:  # before the severity's minimum period: refused
                    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
                    assert person.proto().id_value not in (error.details() or "")
                break
    async with cluster.channel("score", reviewer) as channel:
        # A reviewer decides what was filed.
        async with cluster.channel("query", reviewer) as query_channel:
            listed = await query_grpc.QueryServiceStub(query_channel).ListDisputes(
                query_pb.ListDisputesRequest(
                    status=due_process_pb2.DISPUTE_STATUS_OPEN, purpose="dispute-review"
                ),
                timeout=10,
            )
        for dispute in listed.disputes:
            await score_grpc.ScoreServiceStub(channel).ResolveDispute(
                score_pb.ResolveDisputeRequest(
                    dispute_id=dispute.dispute_id,
                    decision=due_process_pb2.DISPUTE_DECISION_OVERTURN,
                    reason="the department confirmed the mistake",
                ),
                timeout=10,
            )
    await asyncio.to_thread(cluster.wait_drained, 120)
    return raw_ids


def test_no_raw_subject_id_reaches_a_log_a_span_or_a_table(traced: tuple[Cluster, Collector]) -> None:
    cluster, spans = traced
    population = Population(POPULATION)
    raw_ids = asyncio.run(exercise(cluster, population))
    assert len(raw_ids) > POPULATION.subjects // 2
    needles = {r.encode() for r in raw_ids}

    # Let the batch span processors export, then stop every service (flushing logs).
    asyncio.run(asyncio.sleep(1.0))
    cluster.stop()
    exported = spans.raw_snapshot()
    assert exported, "no spans were exported"

    findings: list[Finding] = []
    logs = [cluster.log_path(name) for name in cluster.services]
    assert all(path.stat().st_size > 0 for path in logs)
    findings += scan_files(logs, needles)
    for i, request in enumerate(exported):
        findings += find_in(request, needles, f"span export #{i}")
    tables = 0
    for name in cluster.services:
        found, scanned = scan_database(cluster.database_url(name), needles)
        findings += found
        tables += scanned
    assert tables >= 20  # every service's tables, outboxes and audit logs were searched
    assert findings == []

    # The scan is able to find what it looks for: the population's own requests hold them.
    sample = next(iter(population.events()))[1].SerializeToString()
    assert find_in(sample, needles, "control")


def test_the_scanner_finds_a_planted_raw_id(tmp_path: Path) -> None:
    """A control for the proof above: a raw id planted in a log, a table and a blob is found."""
    raw = b"35020319900101123X"
    log = tmp_path / "x.log"
    log.write_bytes(b'{"event": "oops", "subject": "' + raw + b'"}\n')
    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (a TEXT, b BLOB)"))
        connection.execute(sa.text("INSERT INTO t VALUES ('clean', :b)"), {"b": b"\x0a\x12" + raw})
    engine.dispose()
    assert scan_files([log], {raw})
    found, tables = scan_database(url, {raw})
    assert tables == 1
    assert any("table t" in f.where for f in found)
