"""End to end pipeline benchmark: streaming ingest through rules and score, against raw durable-rules.

    python -m bench.pipeline [--events N] [--postgres URL] [--json PATH]

Starts the four services as processes (SQLite in a temporary directory, or one fresh
PostgreSQL database per service), streams N synthetic events through
IngestService.StreamEvents and reports:

- end to end throughput: first send until both outboxes are drained (every accepted
  event is in the ledger);
- acknowledgement latency per batch (write → ack, i.e. validated and committed);
- event → visible latency for a sample of events whose rules fire on every event:
  from the send of the event's batch until QueryService.ListEntries shows an entry
  naming the event;
- the raw durable-rules rate over the same accepted events in this process, and the
  ratio of the two, which is what the service machinery (validation, pseudonymising,
  durable outboxes, gRPC hops, the ledger) costs on top of the bare engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from bench.meter import (
    Profiler,
    ServerMeter,
    counter,
    cpu_seconds,
    load_average,
    machine,
    percentile,
    row_writes,
    stored_bytes,
)
from devtools.cluster import SERVICES, UNLIMITED, Cluster
from devtools.population import (
    GeneratedEvent,
    Origin,
    Population,
    PopulationConfig,
    batch_requests,
    subjects_for_events,
)
from domain.ruleset.model import EngineEvent
from domain.ruleset.parsing import load_rule_set
from egret.common.v1 import event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2
from egret.query.v1 import query_service_pb2, query_service_pb2_grpc
from egret.score.v1 import score_service_pb2, score_service_pb2_grpc
from egret_client.submitter import StreamTotals, stream_by_source
from kit.principal import Role
from kit.protoconv import to_datetime
from kit.pseudonym import Pseudonymiser
from services.rules.engine import run_raw

# Event types whose sample rules fire on every single event (DOMAIN.md's table), so that
# every sampled event must show up as an entry; positive ones first because they stay
# visible for the whole two years of generated event time.
VISIBLE_TYPES = (
    "transport.bike.parked_in_fence",
    "civic.blood_donation",
    "traffic.red_light",
    "transport.metro.fare_evasion",
)
# Any key gives the bare engine the same work: subjects stay apart under every key.
RAW_SUBJECT_KEY = "bench-raw-durable-rules-subject-key-0123456789"
# Visibility polling backs off from 20 ms to 1 s per sampled event; to 100 ms when paced
# (--rate), where visibility is a latency to report, not a backlog to wait out.
FIRST_POLL_S, POLL_GROWTH, MAX_POLL_S, MAX_POLL_PACED_S = 0.02, 1.5, 1.0, 0.1
_KINDS = {subject_pb2.SUBJECT_KIND_PERSON: "person", subject_pb2.SUBJECT_KIND_ORGANIZATION: "organization"}


@dataclass
class _Sample:
    batch_id: str
    source: str
    event_id: str
    subject: subject_pb2.Subject
    sent_at: float = 0.0
    visible_after_s: float | None = None
    # ListEntries calls made, and the wait before the poll that saw it.
    polls: int = 0
    resolution_s: float = 0.0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events to stream (default 50000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=4, help="batches awaiting acknowledgement")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="events per second offered, paced per batch (default 0: as fast as acknowledged)",
    )
    parser.add_argument(
        "--samples", type=int, default=20, help="events to time until visible in query (default 20)"
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="server URL; one fresh database per service is made"
    )
    parser.add_argument(
        "--rules-shards", type=int, default=1, help="rules processes, each with its own database (default 1)"
    )
    parser.add_argument(
        "--score-replicas", type=int, default=1, help="score processes on one shared database (default 1)"
    )
    parser.add_argument("--ruleset", type=Path, default=Path("config/rulesets/sample.yaml"))
    parser.add_argument(
        "--data-dir", type=Path, help="logs and SQLite files (default: a temporary directory)"
    )
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    parser.add_argument("--skip-raw", action="store_true", help="skip the raw durable-rules measurement")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record a py-spy profile of each service while the stream runs: DIR/SERVICE.svg",
    )
    parser.add_argument(
        "--profile-format",
        choices=sorted(Profiler.FORMATS),
        default="flamegraph",
        help="py-spy's output with --profile: flamegraph (the default), speedscope or raw stacks",
    )
    parser.add_argument(
        "--observability",
        choices=("on", "off", "compare"),
        default="on",
        help="metrics on (the default, as deployed), off (EGRET_METRICS=false), or compare: "
        "alternating runs off and on (--repeats each) and their throughput ratio",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per setting with --observability compare"
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every service, e.g. EGRET_RELAY_BATCH_SIZE=2000 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        args.service_env = dict(item.split("=", 1) for item in args.service_env)
    except ValueError:
        parser.error("--service-env takes NAME=VALUE")
    if args.events < 1:
        parser.error("--events must be at least 1")
    if args.rules_shards < 1 or args.score_replicas < 1:
        parser.error("--rules-shards and --score-replicas must be at least 1")
    return args


class PostgresDatabases:
    """One fresh database per service on the given server, dropped afterwards."""

    def __init__(self, server_url: str, databases: Sequence[str] = SERVICES) -> None:
        url = sa.make_url(server_url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        self._server = url
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        prefix = f"egret_bench_{stamp}_{os.getpid()}"
        self.names = {name: f"{prefix}_{name.replace('-', '_')}" for name in databases}

    def _admin(self) -> sa.Engine:
        return sa.create_engine(self._server, isolation_level="AUTOCOMMIT")

    def create(self) -> dict[str, str]:
        engine = self._admin()
        try:
            with engine.connect() as connection:
                for name in self.names.values():
                    connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return {
            service: self._server.set(database=name).render_as_string(hide_password=False)
            for service, name in self.names.items()
        }

    def meter(self) -> ServerMeter:
        return ServerMeter(self._server.render_as_string(hide_password=False), list(self.names.values()))

    def drop(self) -> None:
        engine = self._admin()
        try:
            with engine.connect() as connection:
                for name in self.names.values():
                    connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()


def _build(
    args: argparse.Namespace,
) -> tuple[list[ingest_service_pb2.StreamEventsRequest], list[GeneratedEvent]]:
    """The whole stream as requests, built before timing so generation is not measured."""
    config = PopulationConfig(
        subjects=subjects_for_events(args.events),
        seed=args.seed,
        now=datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
        max_events=args.events,
    )
    generated = list(Population(config).generate())
    requests = list(batch_requests(((g.source, g.event) for g in generated), batch_size=args.batch_size))
    return requests, generated


def _pick_samples(
    requests: Sequence[ingest_service_pb2.StreamEventsRequest], count: int
) -> dict[str, _Sample]:
    candidates = [
        _Sample(request.batch_id, request.source, event.event_id, event.subject)
        for request in requests
        for event in request.events
        if event.event_type in VISIBLE_TYPES
    ]
    # First occurrences only: a duplicate resend would time the original's entry.
    seen: set[tuple[str, str]] = set()
    unique = []
    for sample in candidates:
        if (sample.source, sample.event_id) not in seen:
            seen.add((sample.source, sample.event_id))
            unique.append(sample)
    step = max(1, len(unique) // max(1, count))
    return {f"{s.source}/{s.event_id}": s for s in unique[::step][:count]}


async def _visible(
    stub: query_service_pb2_grpc.QueryServiceAsyncStub,
    sample: _Sample,
    limit: asyncio.Semaphore,
    timeout_s: float,
    max_poll_s: float,
) -> None:
    """Poll query until an entry names the sampled event. The wait between polls grows
    (from FIRST_POLL_S by POLL_GROWTH up to `max_poll_s`), so sampling stays a small load on query
    however long the pipeline takes; each figure is late by at most the last wait, which is
    stored with it (`resolution_s`)."""
    ref = subject_pb2.SubjectRef(subject=sample.subject)
    deadline = time.perf_counter() + timeout_s
    wait = FIRST_POLL_S
    while time.perf_counter() < deadline:
        async with limit:
            token = ""
            found = False
            try:
                while True:
                    sample.polls += 1
                    page = await stub.ListEntries(
                        query_service_pb2.ListEntriesRequest(
                            subject=ref, page_size=500, page_token=token, purpose="operations"
                        ),
                        timeout=10,
                    )
                    if any(
                        r.source == sample.source and r.event_id == sample.event_id
                        for entry in page.entries
                        for r in entry.event_refs
                    ):
                        found = True
                        break
                    token = page.next_page_token
                    if not token:
                        break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        if found:
            sample.visible_after_s = time.perf_counter() - sample.sent_at
            return
        sample.resolution_s = wait
        await asyncio.sleep(wait)
        wait = min(max_poll_s, wait * POLL_GROWTH)


async def _run_stream(
    cluster: Cluster,
    requests: list[ingest_service_pb2.StreamEventsRequest],
    samples: dict[str, _Sample],
    args: argparse.Namespace,
) -> tuple[StreamTotals, float]:
    by_batch: dict[str, list[_Sample]] = {}
    for sample in samples.values():
        by_batch.setdefault(sample.batch_id, []).append(sample)
    pollers: list[asyncio.Task[None]] = []
    limit = asyncio.Semaphore(8)
    max_poll_s = MAX_POLL_PACED_S if args.rate > 0 else MAX_POLL_S
    async with cluster.channel("query") as query:
        stub = query_service_pb2_grpc.QueryServiceStub(query)

        def on_ack(
            request: ingest_service_pb2.StreamEventsRequest,
            _response: ingest_service_pb2.StreamEventsResponse,
            latency_s: float,
        ) -> None:
            sent_at = time.perf_counter() - latency_s
            for sample in by_batch.get(request.batch_id, []):
                sample.sent_at = sent_at
                pollers.append(asyncio.create_task(_visible(stub, sample, limit, 300.0, max_poll_s)))

        source = _paced(requests, args.rate) if args.rate > 0 else requests
        totals = await stream_by_source(
            cluster.department_channel, source, in_flight=args.in_flight, on_ack=on_ack
        )
        await asyncio.to_thread(cluster.wait_drained, args.drain_timeout)
        drained_at = time.perf_counter()
        await asyncio.gather(*pollers)
    assert totals.first_send_at is not None
    return totals, drained_at - totals.first_send_at


async def _paced(
    requests: Sequence[ingest_service_pb2.StreamEventsRequest], rate: float
) -> AsyncIterator[ingest_service_pb2.StreamEventsRequest]:
    """The requests at `rate` events per second: each batch sent when the events before it
    are due, so latencies are measured below the pipeline's capacity, not in its queue."""
    start = time.perf_counter()
    sent = 0
    for request in requests:
        delay = start + sent / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield request
        sent += len(request.events)


async def _verify(cluster: Cluster) -> tuple[int, int]:
    """Score's VerifyScores once drained: (subjects recomputed from their whole ledgers,
    mismatches with their stored rows)."""
    async with cluster.channel("score", cluster.token("bench-auditor", Role.AUDITOR)) as channel:
        verified = await score_service_pb2_grpc.ScoreServiceStub(channel).VerifyScores(
            score_service_pb2.VerifyScoresRequest(max_mismatches=10, purpose="audit"), timeout=600
        )
    return int(verified.subjects_checked), int(verified.mismatch_count)


def _engine_events(generated: Sequence[GeneratedEvent], subject_key: str) -> list[EngineEvent]:
    pseudonyms = Pseudonymiser(key=subject_key.encode(), key_id="k1")
    events = []
    for item in generated:
        if item.origin is not Origin.ORIGINAL:
            continue
        event = item.event
        kind = _KINDS[event.subject.kind]
        events.append(
            EngineEvent(
                key=f"{item.source}/{event.event_id}",
                subject_key=pseudonyms.subject_key(kind, event.subject.id_scheme, event.subject.id_value),
                subject_kind=kind,
                event_type=event.event_type,
                occurred_at=to_datetime(event.occurred_at),
                attributes={name: _scalar(value) for name, value in event.attributes.items()},
            )
        )
    return events


def _scalar(value: event_pb2.AttributeValue) -> Any:
    member = value.WhichOneof("value")
    if member == "timestamp_value":
        return to_datetime(value.timestamp_value)
    return getattr(value, member) if member else None


def _raw_rate(ruleset: Path, generated: Sequence[GeneratedEvent], subject_key: str) -> dict[str, Any]:
    rule_set = load_rule_set(ruleset)
    events = _engine_events(generated, subject_key)
    started = time.perf_counter()
    fired = run_raw(rule_set, events)
    elapsed = time.perf_counter() - started
    return {
        "events": len(events),
        "seconds": elapsed,
        "events_per_s": len(events) / elapsed,
        "outcomes": fired,
    }


@dataclass
class _Run:
    totals: StreamTotals
    end_to_end_s: float
    # CPU seconds over the run: each service process (rules-1, score-0 with shards and
    # replicas), "client" (this process: the stream and the visibility sampling) and, on
    # PostgreSQL, "postgres" (the server's backends of the run's databases and its shared
    # processes: bench.meter.ServerMeter).
    cpu: dict[str, float]
    # The service each process runs: "rules" for rules-1.
    service_of: dict[str, str]
    # Bytes per table of each service's database once drained (indexes included).
    stored: dict[str, dict[str, int]]
    # On PostgreSQL: rows inserted, updated, deleted and commits per service's database.
    writes: dict[str, dict[str, int]]
    # Score's VerifyScores once drained: subjects checked, mismatches.
    verified: tuple[int, int]
    # Rules' window cache (every shard), with metrics on: subjects' history reads by result.
    window_cache_reads: dict[str, float] | None


def _measured_run(
    args: argparse.Namespace,
    requests: list[ingest_service_pb2.StreamEventsRequest],
    samples: dict[str, _Sample],
    *,
    metrics: bool,
) -> _Run:
    """One cluster, one stream: the totals, first send → drained seconds, the CPU seconds
    of every process involved (read before the services stop) and what the stores hold."""
    for sample in samples.values():
        sample.sent_at, sample.visible_after_s, sample.polls, sample.resolution_s = 0.0, None, 0, 0.0
    rules = ("rules",) if args.rules_shards == 1 else tuple(f"rules-{i}" for i in range(args.rules_shards))
    databases = ("score", *rules, "ingest", "query")
    postgres = PostgresDatabases(args.postgres, databases) if args.postgres else None
    database_urls = postgres.create() if postgres else {}
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="egret-bench-"))
    env = {**UNLIMITED, "EGRET_METRICS": "true" if metrics else "false", **args.service_env}
    cluster = Cluster(
        data_dir,
        database_urls=database_urls,
        log_level="warning",
        env=env,
        rules_shards=args.rules_shards,
        score_replicas=args.score_replicas,
    )
    profiler = Profiler(args.profile, output_format=args.profile_format) if args.profile else None
    writes: dict[str, dict[str, int]] = {}
    try:
        cluster.start()
        database = "postgresql" if args.postgres else "sqlite"
        print(f"cluster up ({database}, metrics {'on' if metrics else 'off'}); streaming ...")
        pids = {name: cluster.pid(name) for name in cluster.services}
        if profiler:
            profiler.start(pids)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        server = postgres.meter() if postgres else None
        if server:
            server.start()
        client_before = time.process_time()
        totals, end_to_end_s = asyncio.run(_run_stream(cluster, requests, samples, args))
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        cpu["client"] = time.process_time() - client_before
        if server:
            cpu["postgres"] = server.seconds()
            server.close()
        if profiler:
            for path in profiler.stop():
                print(f"profile: {path}")
        verified = asyncio.run(_verify(cluster))
        stored = {name: stored_bytes(cluster.database_url(name)) for name in databases}
        cache_reads = (
            {
                result: sum(
                    counter(cluster.admin_url(r), "egret_rules_window_cache_reads_total", result=result)
                    for r in rules
                )
                for result in ("hit", "miss")
            }
            if metrics
            else None
        )
    finally:
        if profiler:
            profiler.stop()
        cluster.close(remove_data_dir=args.data_dir is None)
        if postgres:
            try:
                writes = {name: row_writes(database_urls[name]) for name in databases}
            finally:
                postgres.drop()
    service_of = {name: cluster.service_of(name) for name in pids}
    return _Run(totals, end_to_end_s, cpu, service_of, stored, writes, verified, cache_reads)


def _per_event(cpu: dict[str, float], events: int) -> dict[str, float]:
    return {name: round(seconds / max(events, 1) * 1e6, 1) for name, seconds in cpu.items()}


def _by_service(per_event: dict[str, float], service_of: dict[str, str]) -> dict[str, float]:
    """Per-process figures summed per service (rules-0 + rules-1 as rules)."""
    summed: dict[str, float] = {}
    for name, us in per_event.items():
        service = service_of.get(name, name)
        summed[service] = round(summed.get(service, 0.0) + us, 1)
    return summed


def _pipeline_us(per_event: dict[str, float]) -> float:
    """CPU µs per event of everything but query, which serves only the visibility sampling here."""
    return round(sum(v for name, v in per_event.items() if name != "query"), 1)


def _storage(stored: dict[str, dict[str, int]], accepted: int) -> dict[str, Any]:
    """Bytes per accepted event, per service and table."""
    per = max(accepted, 1)
    return {
        name: {
            "bytes_per_event": round(sum(tables.values()) / per, 1),
            "tables": {t: round(b / per, 1) for t, b in sorted(tables.items(), key=lambda kv: -kv[1]) if b},
        }
        for name, tables in stored.items()
    }


def _compare_observability(
    args: argparse.Namespace,
    requests: list[ingest_service_pb2.StreamEventsRequest],
    samples: dict[str, _Sample],
    figures: dict[str, Any],
) -> int:
    """Alternate runs with metrics off and on (off first), so drift of a shared machine falls
    on both; report the median throughput of each and the on/off ratio."""
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        for metrics in (False, True):
            load_before = os.getloadavg()[0]
            run = _measured_run(args, requests, samples, metrics=metrics)
            runs.append(
                {
                    "metrics": metrics,
                    "events_per_s": round(run.totals.events / run.end_to_end_s, 1),
                    "cpu_us_per_event": _by_service(_per_event(run.cpu, run.totals.events), run.service_of),
                    "loadavg_1m_before": round(load_before, 2),
                }
            )
            print(
                f"  metrics {'on ' if metrics else 'off'}: {runs[-1]['events_per_s']:,.0f} events/s, "
                f"CPU µs/event {runs[-1]['cpu_us_per_event']}"
            )

    def median(metrics: bool, pick: Any) -> float:
        return float(statistics.median(pick(r) for r in runs if r["metrics"] is metrics))

    on = median(True, lambda r: r["events_per_s"])
    off = median(False, lambda r: r["events_per_s"])
    cpu_on = median(True, lambda r: _pipeline_us(r["cpu_us_per_event"]))
    cpu_off = median(False, lambda r: _pipeline_us(r["cpu_us_per_event"]))
    figures["observability"] = {
        "runs": runs,
        "events_per_s_on": on,
        "events_per_s_off": off,
        "throughput_ratio_on_off": round(on / off, 3),
        "cpu_us_per_event_on": round(cpu_on, 1),
        "cpu_us_per_event_off": round(cpu_off, 1),
    }
    print(f"\nmetrics on/off throughput: {on:,.0f} / {off:,.0f} events/s = {on / off:.3f}")
    print(
        f"pipeline CPU per event (client included, query left out): on {cpu_on:.0f} µs, off {cpu_off:.0f} µs"
    )
    _write(args.json, figures)
    return 0


def _write(path: Path | None, figures: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {path}")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    figures: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.pipeline", *sys.argv[1:]]),
        "machine": machine(),
        "database": "postgresql" if args.postgres else "sqlite",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"command: {figures['command']}")
    m = figures["machine"]
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram_gib']} GiB RAM, Python {m['python']}")

    print(f"building {args.events} events ...")
    requests, generated = _build(args)
    samples = _pick_samples(requests, args.samples)

    if args.observability == "compare":
        return _compare_observability(args, requests, samples, figures)
    load_before = load_average()
    run = _measured_run(args, requests, samples, metrics=args.observability == "on")
    totals, end_to_end_s = run.totals, run.end_to_end_s
    figures["topology"] = {"rules_shards": args.rules_shards, "score_replicas": args.score_replicas}
    figures["service_env"] = args.service_env
    figures["cpu_us_per_process_event"] = _per_event(run.cpu, totals.events)
    figures["cpu_us_per_event"] = _by_service(figures["cpu_us_per_process_event"], run.service_of)
    figures["pipeline_cpu_us_per_event"] = _pipeline_us(figures["cpu_us_per_event"])
    figures["loadavg_before"] = load_before
    figures["loadavg"] = load_average()
    figures["stored"] = _storage(run.stored, totals.accepted)
    figures["verify"] = {"subjects_checked": run.verified[0], "mismatches": run.verified[1]}
    if run.window_cache_reads is not None:
        figures["rules_window_cache_reads"] = run.window_cache_reads
    if run.writes:
        figures["database_writes_per_event"] = {
            name: {what: round(n / max(totals.accepted, 1), 2) for what, n in counts.items()}
            for name, counts in run.writes.items()
        }
    figures["visibility_sampling"] = {
        "polls": sum(s.polls for s in samples.values()),
        "query_cpu_us_per_event": figures["cpu_us_per_event"]["query"],
        "resolution_ms_max": _ms(max((s.resolution_s for s in samples.values()), default=0.0)),
    }

    visible = [s.visible_after_s for s in samples.values() if s.visible_after_s is not None]
    figures["stream"] = {
        "events": totals.events,
        "batches": totals.batches,
        "batch_size": args.batch_size,
        "in_flight": args.in_flight,
        "rate_offered": args.rate or None,
        "accepted": totals.accepted,
        "duplicate": totals.duplicate,
        "rejected": totals.rejected,
        "conflict": totals.conflict,
        "resent_batches": totals.resent_batches,
    }
    figures["ingest_events_per_s"] = round(totals.events / max(totals.elapsed_s, 1e-9), 1)
    figures["end_to_end_seconds"] = round(end_to_end_s, 2)
    figures["end_to_end_events_per_s"] = round(totals.events / end_to_end_s, 1)
    figures["ack_latency_ms"] = {f"p{q}": _ms(percentile(totals.ack_latencies_s, q)) for q in (50, 95, 99)}
    figures["visible_latency_ms"] = {f"p{q}": _ms(percentile(visible, q)) for q in (50, 95, 99)}
    figures["visible_samples"] = {"sampled": len(samples), "seen": len(visible)}

    print(
        f"\nevents {totals.events}: accepted {totals.accepted}, duplicate {totals.duplicate}, "
        f"rejected {totals.rejected}, conflict {totals.conflict}"
    )
    print(
        f"end to end:     {figures['end_to_end_events_per_s']:>10,.0f} events/s "
        f"({end_to_end_s:.1f}s first send → drained)"
    )
    print(f"ingest acks:    {figures['ingest_events_per_s']:>10,.0f} events/s")
    ack = figures["ack_latency_ms"]
    print(
        f"ack latency:    p50 {ack['p50']} ms, p95 {ack['p95']} ms, p99 {ack['p99']} ms "
        f"(batches of {args.batch_size}, {args.in_flight} in flight"
        + (f", offered at {args.rate:,.0f} events/s)" if args.rate > 0 else ")")
    )
    per_event = figures["cpu_us_per_event"]
    print(
        f"CPU per event:  {figures['pipeline_cpu_us_per_event']} µs pipeline = "
        + " + ".join(f"{name} {us}" for name, us in per_event.items() if name != "query")
        + f" (load average {figures['loadavg_before']} before, {figures['loadavg']} after)"
    )
    if len(figures["cpu_us_per_process_event"]) > len(per_event):
        print(f"  per process:  {figures['cpu_us_per_process_event']}")
    sampling = figures["visibility_sampling"]
    print(
        f"sampling cost:  query {per_event['query']} µs per event for {sampling['polls']} ListEntries polls "
        f"(not in the pipeline figure)"
    )
    stored = figures["stored"]
    total_stored = sum(v["bytes_per_event"] for v in stored.values())
    print(
        f"stored:         {total_stored:,.0f} bytes per accepted event = "
        + " + ".join(f"{name} {v['bytes_per_event']:,.0f}" for name, v in stored.items())
        + " (tables and indexes; free pages and WAL left out)"
    )
    for name, per in figures.get("database_writes_per_event", {}).items():
        print(
            f"  {name} database per accepted event: {per['inserted']} rows inserted, "
            f"{per['updated']} updated, {per['deleted']} deleted, {per['commits']} commits"
        )
    print(
        f"verify:         {run.verified[0]:,} subjects recomputed from their whole ledgers, "
        f"{run.verified[1]} mismatches with their stored scores"
    )
    if run.window_cache_reads is not None:
        hits, misses = run.window_cache_reads["hit"], run.window_cache_reads["miss"]
        print(
            f"window cache:   {hits:,.0f} subjects' history answered from rules' cache, {misses:,.0f} "
            f"read from its database ({hits / max(hits + misses, 1):.0%} hits)"
        )
    vis = figures["visible_latency_ms"]
    print(
        f"event→visible:  p50 {vis['p50']} ms, p95 {vis['p95']} ms, p99 {vis['p99']} ms "
        f"({len(visible)} of {len(samples)} sampled events seen; polls back off, each figure is late "
        f"by at most {figures['visibility_sampling']['resolution_ms_max']} ms)"
    )

    if not args.skip_raw:
        # The end to end figures are worth keeping even when the bare engine fails.
        try:
            raw = _raw_rate(args.ruleset, generated, RAW_SUBJECT_KEY)
        except Exception as exc:
            figures["raw_durable_rules"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"raw durable-rules: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            figures["raw_durable_rules"] = {
                k: round(v, 2) if isinstance(v, float) else v for k, v in raw.items()
            }
            figures["ratio_end_to_end_to_raw"] = round(
                figures["end_to_end_events_per_s"] / raw["events_per_s"], 4
            )
            print(
                f"raw durable-rules: {raw['events_per_s']:>7,.0f} events/s over {raw['events']} events "
                f"({raw['outcomes']} outcomes)"
            )
            print(f"end to end / raw: {figures['ratio_end_to_end_to_raw']:.3f}")

    _write(args.json, figures)
    if run.verified[1]:
        print("verify found stored scores that differ from their ledgers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
