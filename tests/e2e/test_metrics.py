"""The four services' admin ports during the end-to-end scenario: counters equal what was sent,
the pipeline's lag gauge returns to zero once drained, labels never carry a subject, label sets
stay bounded, and every metric the chart's alerts and dashboard name is really exported."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from devtools.cluster import Cluster
from egret.common.v1 import subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.rules.v1 import backtest_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from kit.principal import Role
from tests.support.events import PERSON, event, resident_id
from tests.support.promql import (
    EXPORTED_METRICS,
    METRICS_BY_SERVICE,
    alert_expressions,
    base_name,
    dashboard_expressions,
    referenced_metrics,
)
from tests.support.purposes import purposed
from tests.support.scrape import Sample, scrape, scrape_until, status, total
from tests.support.waiting import until

pytestmark = pytest.mark.e2e

SERVICES = ("ingest", "rules", "score", "query")
WHEN = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
SUBJECTS = [resident_id(n) for n in range(1, 13)]
# Label names each metric family may carry (the exporter adds otel_scope_*; histograms add le).
SCOPE = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}
# More series than this in one family would mean a label took values from requests or subjects.
MAX_SERIES_PER_FAMILY = 400
# Every label name the services use; each takes its values from a finite set the service knows.
LABELS = SCOPE | {
    *("department", "event_type", "result", "outbox", "rule_set", "rule", "tier", "subject_kind"),
    *("method", "role", "purpose", "certificate", "operation", "state", "pool_name"),
    *("rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code"),
    *("type", "generation", "cpython_gc_generation"),
    # target_info: the resource's attributes.
    *("service_name", "service_instance_id", "telemetry_sdk_language", "telemetry_sdk_name"),
    "telemetry_sdk_version",
}
# An event type no catalogue has: counted as "unknown", never as itself.
BOGUS_TYPE = "made.up.event-type-7f3a"


def _late(n: int, subject: str, days_late: int = 40) -> ingest_pb.Event:
    return event(
        f"late-{n}", "library.book_returned_late", subject, {"days_late": days_late}, occurred_at=WHEN
    )


def _blood(n: int, subject: str) -> ingest_pb.Event:
    return event(f"blood-{n}", "civic.blood_donation", subject, {"ml": 400}, occurred_at=WHEN)


async def _submit(cluster: Cluster, source: str, events: list[ingest_pb.Event]) -> ingest_pb.BatchCounts:
    async with cluster.department_channel(source) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        request = ingest_pb.SubmitEventsRequest(source=source, events=events)
        return (await stub.SubmitEvents(request, timeout=10)).counts


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(
        tmp_path / "cluster",
        env={
            "EGRET_RELAY_POLL_SECONDS": "0.05",
            "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1",
            "EGRET_METRICS_REFRESH_SECONDS": "0.5",
        },
    ) as running:
        yield running


async def test_admin_port_serves_probes_and_nothing_else(cluster: Cluster) -> None:
    for name in SERVICES:
        url = cluster.admin_url(name)
        assert status(url, "/healthz") == 200, name
        assert status(url, "/readyz") == 200, name
        assert status(url, "/metrics") == 200, name
        assert status(url, "/") == 404, name
        assert status(url, "/metrics/../admin") == 404, name
        assert status(url, "/readyz", method="POST") == 405, name
    cluster.stop("score")
    # Stopped: nothing answers any more (the kubelet's probe fails the same way).
    with pytest.raises(OSError):
        scrape(cluster.admin_url("score"))


async def test_every_call_is_counted_with_its_final_status(cluster: Cluster) -> None:
    one = _late(1, SUBJECTS[0])
    async with cluster.channel("ingest", cluster.token("library", Role.DEPARTMENT)) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        await stub.SubmitEvents(ingest_pb.SubmitEventsRequest(source="library", events=[one]), timeout=10)
        for request, code in (
            # Another department's source: refused by the servicer.
            (ingest_pb.SubmitEventsRequest(source="courts", events=[one]), grpc.StatusCode.PERMISSION_DENIED),
            # No events: refused by validation.
            (ingest_pb.SubmitEventsRequest(source="library"), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SubmitEvents(request, timeout=10)
            assert refused.value.code() == code
    async with cluster.channel("ingest", "not-a-token") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ingest_grpc.IngestServiceStub(channel).SubmitEvents(
                ingest_pb.SubmitEventsRequest(source="library", events=[one]), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def counted() -> None:
        # A call is measured when its handler has ended, which may be just after its status
        # reached the client: the scrape waits for it (and fails on a count above one).
        calls = scrape(cluster.admin_url("ingest"))
        count = "rpc_server_duration_milliseconds_count"
        for code in (
            grpc.StatusCode.OK,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNAUTHENTICATED,
        ):
            found = total(calls, count, rpc_method="SubmitEvents", rpc_grpc_status_code=str(code.value[0]))
            assert found == 1, (code, found)
        # The latency histogram counts the same calls.
        buckets = [
            s
            for s in calls
            if s.name == "rpc_server_duration_milliseconds_bucket"
            and s.labels.get("rpc_method") == "SubmitEvents"
            and s.labels["le"] == "+Inf"
        ]
        assert sum(b.value for b in buckets) == 4

    await until(counted, what="each SubmitEvents call counted once, with its final status")


async def test_counters_equal_what_was_sent_and_lag_returns_to_zero(cluster: Cluster) -> None:
    library = [_late(n, s) for n, s in enumerate(SUBJECTS)]
    health = [_blood(n, s) for n, s in enumerate(SUBJECTS[:5])]
    first = await _submit(cluster, "library", library)
    assert first.accepted == len(library)
    await _submit(cluster, "health-commission", health)
    # Sent again: duplicates; the same id with other content: a conflict; a bad value: rejected.
    bogus = event("bogus-1", BOGUS_TYPE, SUBJECTS[1], {}, occurred_at=WHEN)
    again = await _submit(
        cluster,
        "library",
        [*library[:4], _late(0, SUBJECTS[0], days_late=41), _late(99, SUBJECTS[0], 0), bogus],
    )
    assert (again.duplicate, again.conflict, again.rejected) == (4, 1, 2)
    cluster.wait_drained(timeout_s=60)

    ingest = scrape(cluster.admin_url("ingest"))
    events = "egret_ingest_events_total"
    assert total(ingest, events, department="library", result="accepted") == len(library)
    assert total(ingest, events, department="health-commission", result="accepted") == len(health)
    assert total(ingest, events, result="duplicate") == 4
    assert total(ingest, events, result="conflict") == 1
    assert total(ingest, events, result="rejected") == 2
    assert total(ingest, events, event_type="unknown", result="rejected") == 1
    assert total(ingest, events, event_type="library.book_returned_late", result="accepted") == len(library)
    submits = "rpc_server_duration_milliseconds_count"
    assert total(ingest, submits, rpc_method="SubmitEvents", rpc_grpc_status_code="0") == 3

    # Every accepted event was evaluated in some batch; each firing reached score's ledger once.
    rules = scrape(cluster.admin_url("rules"))
    firings = total(rules, "egret_rules_firings_total")
    assert firings == len(library) + len(health)  # the sample rules fire once per such event
    assert total(rules, "egret_rules_firings_total", rule="library.late_return") == len(library)
    assert total(rules, "egret_rules_batches_total") >= 1
    assert total(rules, "egret_rules_active_version") == 2
    # The sample rules have windows: each subject's first batch missed the window cache, which
    # then holds it.
    assert total(rules, "egret_rules_window_cache_reads_total", result="miss") >= 1
    assert total(rules, "egret_rules_window_cache_subjects") >= 1
    assert total(rules, "egret_rules_window_cache_memory_bytes") > 0
    score = scrape(cluster.admin_url("score"))
    assert total(score, "egret_score_outcomes_applied_total") == firings
    assert total(ingest, "egret_outbox_sent_total") == len(library) + len(health)
    assert total(rules, "egret_outbox_sent_total") == firings

    # The lag gauges (refreshed every few seconds) come back to zero once drained.
    for name in ("ingest", "rules"):
        scrape_until(
            cluster.admin_url(name),
            lambda s: (
                total(s, "egret_outbox_waiting") == 0 and total(s, "egret_outbox_oldest_age_seconds") == 0
            ),
        )

    # Reads of subject data are counted by method, role and purpose, with their access records.
    async with cluster.channel("query", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        query = purposed(query_grpc.QueryServiceStub(channel), "subject-request")
        for subject in SUBJECTS[:3]:
            ref = _ref(subject)
            await query.GetScore(query_pb.GetScoreRequest(subject=ref), timeout=5)
    reads = scrape(cluster.admin_url("query"))
    assert total(reads, "egret_query_reads_total", method="GetScore", role="reviewer") == 3
    assert total(reads, "egret_query_access_log_written_total") == 3
    assert total(reads, "egret_query_access_log_failed_total") == 0

    # A backtest replays on rules; tiers are counted in the background on score.
    async with cluster.channel("rules") as channel:
        rules_stub = rules_grpc.RulesServiceStub(channel)
        active = await rules_stub.GetActiveRuleSet(rules_pb.GetActiveRuleSetRequest(), timeout=10)
        request = backtest_pb2.BacktestRuleSetRequest(rule_set_id=active.rule_set.rule_set_id)
        report = await rules_stub.BacktestRuleSet(request, timeout=60)
    assert report.events_replayed == len(library) + len(health)
    rules = scrape(cluster.admin_url("rules"))
    assert total(rules, "egret_rules_backtest_duration_seconds_count") == 1
    assert total(rules, "egret_rules_backtests_running") == 0
    score = scrape_until(
        cluster.admin_url("score"), lambda s: total(s, "egret_score_subjects") == len(SUBJECTS)
    )
    assert total(score, "egret_score_subjects", subject_kind="person") == len(SUBJECTS)

    everything = {name: scrape(cluster.admin_url(name)) for name in SERVICES}
    _assert_no_subject_in_labels(cluster, everything)
    _assert_bounded(everything)
    _assert_chart_reads_only_what_is_exported(everything)


def _ref(subject: str) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(
        subject=subject_pb2.Subject(kind=PERSON, id_scheme="resident-id", id_value=subject)
    )


def _assert_no_subject_in_labels(cluster: Cluster, scraped: dict[str, list[Sample]]) -> None:
    keys = {cluster.pseudonymiser.subject_key("person", "resident-id", s) for s in SUBJECTS}
    forbidden = [*SUBJECTS, *keys, *(k[:16] for k in keys), BOGUS_TYPE]
    for service, samples in scraped.items():
        for sample in samples:
            for label, value in sample.labels.items():
                assert not any(f in value for f in forbidden), (service, sample.name, label, value)


def _assert_chart_reads_only_what_is_exported(scraped: dict[str, list[Sample]]) -> None:
    """Every metric an alert or a dashboard panel reads, and every metric the catalogue
    (docs/operations.md) lists for a service, is in that live scrape."""
    exported = {service: {base_name(s.name) for s in samples} for service, samples in scraped.items()}
    everywhere = set().union(*exported.values())
    wanted = {
        name: referenced_metrics(expr)
        for name, expr in {**alert_expressions(), **dashboard_expressions()}.items()
    }
    for name, metrics in wanted.items():
        assert metrics <= everywhere, (name, sorted(metrics - everywhere))
    for service, catalogue in METRICS_BY_SERVICE.items():
        assert catalogue <= exported[service], (service, sorted(catalogue - exported[service]))
    assert everywhere >= EXPORTED_METRICS


def _assert_bounded(scraped: dict[str, list[Sample]]) -> None:
    for service, samples in scraped.items():
        series: dict[str, set[tuple[tuple[str, str], ...]]] = {}
        for sample in samples:
            assert set(sample.labels) - {"le"} <= LABELS, (service, sample.name, sample.labels)
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            series.setdefault(sample.name, set()).add(labels)
        for name, sets in series.items():
            assert len(sets) <= MAX_SERIES_PER_FAMILY, (service, name, len(sets))
