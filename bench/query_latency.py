"""GetScore latency at a fixed request rate, idle and while ingest runs.

    python -m bench.query_latency [--subjects N] [--rate R] [--duration S] [--json PATH]

Seeds score's SQLite database directly with N subjects (one ledger entry each, the
stored score computed by the real `compute_score`, bulk inserts: a million subjects
through the pipeline would take hours and measure ingest, not reads), starts the four
services as processes, then drives QueryService.GetScore by subject key for random
seeded subjects at R requests per second, open loop, from a separate process:

1. idle: nothing else runs;
2. while ingest runs: a synthetic population streams through ingest → rules → score in
   this process at the same time, so score writes to the database query reads.

Latency is measured from each request's scheduled send time to its response, so a client
that falls behind is charged for it (no coordinated omission). The report gives p50, p95,
p99 and max, the achieved rate and errors by status code, next to the target (p99 ≤ 3
ms), and for phase 1 the query process's CPU per read served with the load average
(`--idle-only` runs phase 1 alone).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from bench.meter import cpu_seconds, load_average, machine, percentile
from contracts.score_store import StoredCategory, StoredEntry, StoredScore
from devtools.cluster import UNLIMITED, Cluster
from devtools.population import Population, PopulationConfig, batch_requests, subjects_for_events
from domain.entries import EntryStatus, ScoredEntry
from domain.policy import load_policy
from domain.scoring import compute_score
from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2, query_service_pb2_grpc
from egret_client.submitter import stream_by_source
from kit.db import create_engine
from kit.interceptors import bearer_token
from kit.migrations import upgrade
from kit.principal import Role
from kit.settings import SqliteTuning
from services.score.bootstrap import MIGRATIONS

TARGET_P99_MS = 3.0
POLICY_FILE = Path(__file__).parents[1] / "config" / "policy.yaml"
CATEGORIES = ("civic", "transport", "traffic", "finance", "commerce")
# Reads as a reviewer, who must state a purpose code (config/purposes.yaml).
PURPOSE = "subject-request"
CHUNK = 20_000
# Phase 2's ingest load: a steady 200 events/s in batches of 50, about 17 million events a
# day, far above what the city's departments send on average, and enough to keep ingest,
# rules and score committing batches all through the phase. Flat out (--ingest-rate 0) the
# pipeline takes both cores and the phase measures the lack of CPU, not the read path.
INGEST_RATE = 200
INGEST_BATCH = 50
# The ingest load generator stands in for departments on other machines: it yields the CPU
# to the services (ingest, rules, score and query keep their normal priority).
INGEST_CLIENT_NICE = 10


def bench_key(index: int) -> str:
    """The seeded subject key of subject `index` (derivable in the load process, so a
    million keys need not be shipped to it)."""
    return hashlib.sha256(f"bench-subject-{index}".encode()).hexdigest()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.query_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=10_000, help="subjects seeded into score's store")
    parser.add_argument("--rate", type=int, default=1000, help="GetScore requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    parser.add_argument("--ingest-events", type=int, default=150_000, help="events streamed in phase 2")
    parser.add_argument(
        "--ingest-rate",
        type=int,
        default=INGEST_RATE,
        help="events per second offered to ingest in phase 2 (0: as fast as the pipeline takes them)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--idle-only", action="store_true", help="phase 1 only (a quick run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every service (repeatable), e.g. EGRET_QUERY_ACCESS_LOG_COMMIT_INTERVAL_MS=2",
    )
    return parser.parse_args(argv)


_SNAPSHOT = outcome_pb2.Outcome(
    rule=outcome_pb2.RuleRef(title="bench"), reason="seeded by bench.query_latency"
).SerializeToString()


def _rows(
    count: int, now: datetime, seed: int
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    policy = load_policy(POLICY_FILE).for_kind("person")
    rng = random.Random(seed)
    for i in range(count):
        key = bench_key(i)
        positive = rng.random() < 0.7
        points = rng.randint(1, 10) if positive else -rng.randint(3, 10)
        severity = "positive" if positive else rng.choice(("minor", "general"))
        occurred = now - timedelta(days=rng.randint(0, 80), seconds=rng.randint(0, 86_399))
        category = rng.choice(CATEGORIES)
        # Hexadecimal, as rules' outcome ids are (score stores them as bytes).
        entry = ScoredEntry(f"{i:032x}", points, category, severity, EntryStatus.ACTIVE, occurred, occurred)
        result = compute_score([entry], policy, now)
        until = occurred + policy.visibility(severity)
        yield (
            {
                "entry_id": entry.entry_id,
                "subject_key": key,
                "subject_kind": "person",
                "rule_id": f"{category}.bench",
                "rule_set": "bench",
                "rule_set_version": 1,
                "points": points,
                "category": category,
                "severity": severity,
                "status": "active",
                "occurred_at": occurred,
                "recorded_at": occurred,
                "visible_until": until,
                "black_list": False,
                # The rule's title and the reason are read from the snapshot.
                "outcome": _SNAPSHOT,
            },
            {
                "subject_key": key,
                "subject_kind": "person",
                "score": result.score,
                "tier": result.tier,
                "policy_version": result.policy_version,
                "entry_count": result.entry_count,
                "updated_at": now,
                "next_change_at": result.next_change_at,
                "red_list": result.state.red,
                "black_list": result.state.black,
                "list_reasons": json.dumps(
                    [[m.name, list(m.reasons), list(m.entry_ids)] for m in result.lists]
                ),
            },
            {
                "subject_key": key,
                "category": category,
                "points": result.categories[0].points,
                "entry_count": 1,
                "capped": result.categories[0].capped,
            },
        )


def seed(database_url: str, count: int, seed_value: int) -> float:
    """Migrate score's store and bulk insert `count` subjects; returns the seconds taken."""
    started = time.perf_counter()
    engine = create_engine(database_url, sqlite=SqliteTuning(synchronous="NORMAL"))
    try:
        upgrade(engine, MIGRATIONS, "score_alembic_version")
        now = datetime.now(UTC)
        batch: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []

        def flush() -> None:
            with engine.begin() as connection:
                connection.execute(sa.insert(StoredEntry), [b[0] for b in batch])
                connection.execute(sa.insert(StoredScore), [b[1] for b in batch])
                connection.execute(sa.insert(StoredCategory), [b[2] for b in batch])
            batch.clear()

        for rows in _rows(count, now, seed_value):
            batch.append(rows)
            if len(batch) >= CHUNK:
                flush()
        if batch:
            flush()
    finally:
        engine.dispose()
    return time.perf_counter() - started


# (address, CA certificate PEM or None for plaintext, bearer token): picklable for the child.
Target = tuple[str, bytes | None, str]


def _channel(target: Target) -> grpc.aio.Channel:
    address, ca, token = target
    if ca is None:
        return grpc.aio.insecure_channel(address)
    tls = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.aio.secure_channel(address, tls, interceptors=bearer_token(token))


def _drive(target: Target, subjects: int, rate: int, warmup_s: float, duration_s: float, out: Any) -> None:
    """Child process: open-loop GetScore at `rate`; puts (latencies_ms, errors by code,
    elapsed, cpu_s, calls served including the warm-up) on `out`."""

    served = 0

    async def run() -> tuple[list[float], dict[str, int], float]:
        nonlocal served
        rng = random.Random(1)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        async with _channel(target) as channel:
            stub = query_service_pb2_grpc.QueryServiceStub(channel)
            loop = asyncio.get_running_loop()

            async def one(scheduled: float, measured: bool) -> None:
                nonlocal served
                ref = subject_pb2.SubjectRef(subject_key=bench_key(rng.randrange(subjects)))
                try:
                    await stub.GetScore(
                        query_service_pb2.GetScoreRequest(subject=ref, purpose=PURPOSE), timeout=5
                    )
                except grpc.aio.AioRpcError as exc:
                    if measured:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    return
                served += 1
                if measured:
                    latencies.append((loop.time() - scheduled) * 1000)

            tasks: list[asyncio.Task[None]] = []
            start = loop.time()
            total = int((warmup_s + duration_s) * rate)
            for i in range(total):
                scheduled = start + i / rate
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(scheduled, i >= warmup_s * rate)))
            await asyncio.gather(*tasks)
            elapsed = loop.time() - start - warmup_s
        return latencies, errors, elapsed

    cpu = time.process_time()
    latencies, errors, elapsed = asyncio.run(run())
    out.put((latencies, errors, elapsed, time.process_time() - cpu, served))


def _query_cpu(seconds: float, served: int) -> dict[str, Any]:
    """Query's CPU per GetScore served over the phase, warm-up included (/proc/PID/stat
    before and after), with the load average at its end. Refused calls cost a little
    too, so a phase with errors overstates the figure slightly."""
    return {
        "query_cpu_s": round(seconds, 2),
        "query_cpu_ms_per_read": round(seconds * 1000 / served, 3) if served else 0.0,
        "load_average": load_average(),
    }


def start_load(target: Target, args: argparse.Namespace) -> tuple[Any, Any]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(
        target=_drive, args=(target, args.subjects, args.rate, args.warmup, args.duration, out), daemon=True
    )
    process.start()
    return process, out


def latency_summary(
    latencies: list[float], errors: dict[str, int], elapsed: float, rate: int
) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "target_rate": rate,
        "achieved_rate": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50) or 0, 2),
        "p95_ms": round(percentile(latencies, 95) or 0, 2),
        "p99_ms": round(percentile(latencies, 99) or 0, 2),
        "max_ms": round(max(latencies, default=0), 2),
        "meets_p99_target": (percentile(latencies, 99) or float("inf")) <= TARGET_P99_MS,
    }


async def _paced(requests: Sequence[Any], rate: int, batch: int) -> AsyncIterator[Any]:
    """The batches at `rate` events per second, each sent at its scheduled instant."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, request in enumerate(requests):
        delay = start + i * batch / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield request


def _ingest_requests(args: argparse.Namespace) -> list[Any]:
    """Phase 2's batches, built before the phase: generating them would compete with the
    reads being measured. Paced, the phase needs only its duration's worth."""
    phase_s = args.warmup + args.duration
    events = min(args.ingest_events, int(args.ingest_rate * (phase_s + 5))) or args.ingest_events
    config = PopulationConfig(
        subjects=subjects_for_events(events),
        seed=args.seed,
        now=datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
        max_events=events,
    )
    batch = INGEST_BATCH if args.ingest_rate else 500
    return list(
        batch_requests(((g.source, g.event) for g in Population(config).generate()), batch_size=batch)
    )


async def _ingest(
    cluster: Cluster, args: argparse.Namespace, requests: list[Any], stop_after_s: float
) -> dict[str, Any]:
    batch = INGEST_BATCH if args.ingest_rate else 500
    source: Any = _paced(requests, args.ingest_rate, batch) if args.ingest_rate else requests
    acknowledged = 0

    def on_ack(request: Any, response: Any, latency_s: float) -> None:
        nonlocal acknowledged
        acknowledged += len(request.events)

    started = time.perf_counter()
    task = asyncio.create_task(
        stream_by_source(cluster.department_channel, source, in_flight=4, on_ack=on_ack)
    )
    done, _ = await asyncio.wait([task], timeout=stop_after_s)
    seconds = time.perf_counter() - started
    if not done:
        task.cancel()
    else:
        task.result()
    return {
        "rate_offered": args.ingest_rate or "unlimited",
        "events_acknowledged": acknowledged,
        "acknowledged_per_s": round(acknowledged / seconds, 1),
        "finished_within_phase": bool(done),
        "seconds": round(seconds, 1),
    }


def _settings(pairs: Sequence[str]) -> dict[str, str]:
    settings = dict(pair.partition("=")[::2] for pair in pairs)
    if any(not name for name in settings):
        raise SystemExit(f"--env takes NAME=VALUE, not {pairs!r}")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.query_latency " + " ".join(sys.argv[1:] if argv is None else argv),
        "subjects": args.subjects,
        "target_p99_ms": TARGET_P99_MS,
    }
    with (
        tempfile.TemporaryDirectory(prefix="egret-bench-query-") as tmp,
        Cluster(Path(tmp), log_level="warning", env={**UNLIMITED, **_settings(args.env)}) as cluster,
    ):
        print(f"seeding {args.subjects:,} subjects into score's store ...", flush=True)
        results["seed_seconds"] = round(seed(cluster.database_url("score"), args.subjects, args.seed), 1)
        print(f"  {results['seed_seconds']} s", flush=True)
        cluster.start()
        cluster.wait_healthy()
        # TLS and a reviewer's token, as a production reader would call.
        ca = cluster.pki.ca_file.read_bytes() if cluster.pki else None
        address: Target = (cluster.address("query"), ca, cluster.token("bench-reviewer", Role.REVIEWER))

        print(f"phase 1: GetScore at {args.rate}/s for {args.duration} s, idle ...", flush=True)
        query_cpu = cpu_seconds(cluster.pid("query"))
        process, out = start_load(address, args)
        latencies, errors, elapsed, client_cpu, served = out.get()
        query_cpu = cpu_seconds(cluster.pid("query")) - query_cpu
        results["idle"] = latency_summary(latencies, errors, elapsed, args.rate)
        results["idle"]["client_cpu_s"] = round(client_cpu, 1)
        results["idle"].update(_query_cpu(query_cpu, served))
        process.join()
        print(f"  {results['idle']}", flush=True)
        if not args.idle_only:
            pace = f"{args.ingest_rate}/s" if args.ingest_rate else "as fast as it takes them"
            print(f"phase 2: the same while ingest takes events at {pace} ...", flush=True)
            requests = _ingest_requests(args)
            process, out = start_load(address, args)
            # After the GetScore generator has started, which keeps its normal priority.
            os.nice(INGEST_CLIENT_NICE)
            ingest = asyncio.run(_ingest(cluster, args, requests, args.warmup + args.duration))
            latencies, errors, elapsed, client_cpu, _ = out.get()
            results["while_ingest"] = latency_summary(latencies, errors, elapsed, args.rate)
            results["while_ingest"]["client_cpu_s"] = round(client_cpu, 1)
            results["while_ingest"]["ingest"] = ingest
            process.join()
            print(f"  {results['while_ingest']}", flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
