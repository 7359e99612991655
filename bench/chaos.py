"""Chaos run: one stream replayed twice, uninterrupted and under random SIGKILLs.

    python -m bench.chaos [--events 50000] [--kills 10] [--seed N] [--postgres URL]

Runs the same synthetic stream through two fresh clusters: once with no kills, once
while a seeded schedule (devtools/chaos.py) kills any service, or two at once, at random
moments of the stream and restarts them. Each run must pass the checks of
tests/e2e/test_chaos.py (every acknowledged event stored once, active outcomes and the
ledger equal to one evaluation in event time, score verify, every verify-audit); then
rules' active outcomes and score's active ledger entries of the two runs must be
identical, outcome id for outcome id, with the same points. Prints the seed first
(EGRET_CHAOS_SEED or --seed replays a run), the kills as they strike, and the time each
phase took; exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.meter import machine
from bench.pipeline import PostgresDatabases
from devtools.chaos import (
    SEED_ENV,
    ChaosRun,
    PipelineState,
    chaos_seed,
    check,
    differences,
    kill_schedule,
    read_state,
    stream_with_kills,
)
from devtools.cluster import UNLIMITED, Cluster
from devtools.population import Origin, Population, PopulationConfig, batch_requests, subjects_for_events
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb

# As the end to end tests run the cluster: a relay retries a restarted peer within a second.
CLUSTER_ENV = {**UNLIMITED, "EGRET_RELAY_POLL_SECONDS": "0.05", "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1"}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events in the stream (50,000)")
    parser.add_argument("--kills", type=int, default=10, help="kills during the chaos run (10)")
    parser.add_argument(
        "--seed", type=int, help=f"schedule and population seed (default: ${SEED_ENV} or random)"
    )
    parser.add_argument(
        "--late-fraction", type=float, default=0.03, help="share of events arriving late (0.03; 0 for none)"
    )
    parser.add_argument(
        "--pair-fraction", type=float, default=0.3, help="share of kills of two services (0.3)"
    )
    parser.add_argument("--batch-size", type=int, default=200, help="events per streamed batch (200)")
    parser.add_argument(
        "--in-flight", type=int, default=4, help="batches awaiting acknowledgement per stream (4)"
    )
    parser.add_argument(
        "--events-per-s",
        type=float,
        default=1000.0,
        help="pace the chaos run's stream so every kill lands while it runs (1000; 0: flat out)",
    )
    parser.add_argument("--postgres", metavar="URL", help="server URL; fresh databases per service and run")
    parser.add_argument("--data-dir", type=Path, help="keep logs and SQLite files here (default: temporary)")
    parser.add_argument("--skip-baseline", action="store_true", help="only the chaos run and its checks")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    return parser.parse_args(argv)


def _run(
    name: str,
    args: argparse.Namespace,
    requests: list[ingest_pb.StreamEventsRequest],
    originals: set[str],
    subject_key: str,
    kills: int,
    seed: int,
) -> tuple[ChaosRun, PipelineState, list[str], dict[str, float]]:
    """One fresh cluster through the whole stream; its run, final state, problems and timings."""
    postgres = PostgresDatabases(args.postgres) if args.postgres else None
    database_urls = postgres.create() if postgres else {}
    data_dir = (
        (args.data_dir / name) if args.data_dir else Path(tempfile.mkdtemp(prefix=f"egret-chaos-{name}-"))
    )
    cluster = Cluster(
        data_dir, database_urls=database_urls, subject_key=subject_key, log_level="warning", env=CLUSTER_ENV
    )
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        cluster.start()
        timings["start_s"] = time.monotonic() - started
        schedule = kill_schedule(
            seed,
            kills=kills,
            batches=len(requests),
            services=cluster.services,
            pair_fraction=args.pair_fraction,
        )
        print(f"[{name}] streaming {sum(len(r.events) for r in requests)} events, {len(schedule)} kills ...")
        run = asyncio.run(
            stream_with_kills(
                cluster,
                requests,
                schedule,
                in_flight=args.in_flight,
                # Uninterrupted, flat out: the pace changes when events arrive, not what they give.
                events_per_s=args.events_per_s if kills else 0.0,
                drain_timeout_s=900,
                log=True,
            )
        )
        timings["stream_s"], timings["drain_s"] = run.stream_s, run.drain_s
        cluster.stop()
        checked = time.monotonic()
        state = read_state(cluster)
        problems = check(cluster, run, originals=originals, state=state)
        timings["check_s"] = time.monotonic() - checked
    finally:
        cluster.close(remove_data_dir=args.data_dir is None)
        if postgres:
            postgres.drop()
    during = sum(1 for k in run.kills if k.during_stream)
    print(
        f"[{name}] streamed in {run.stream_s:.1f} s, drained {run.drain_s:.1f} s later;"
        f" {len(run.kills)} kills ({during} while streaming), {run.totals.resent_batches} batches resent;"
        f" {len(state.active_outcomes)} active outcomes ({state.reversed_outcomes} reversed),"
        f" {len(state.ledger)} active entries ({state.reversed_entries} reversed);"
        f" checks {timings['check_s']:.1f} s"
    )
    for problem in problems:
        print(f"[{name}] PROBLEM: {problem}")
    return run, state, problems, timings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    seed = args.seed if args.seed is not None else chaos_seed()
    command = shlex.join([Path(sys.executable).name, "-m", "bench.chaos", *sys.argv[1:]])
    print(f"chaos seed {seed} (replay with --seed {seed} or {SEED_ENV}={seed})")
    print(f"command: {command}")
    m = machine()
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram_gib']} GiB RAM, Python {m['python']}")
    config = PopulationConfig(
        subjects=subjects_for_events(args.events),
        seed=seed,
        late_fraction=args.late_fraction,
        invalid_events=5,
        max_events=args.events,
    )
    generated = list(Population(config).generate())
    originals = {f"{g.source}/{g.event.event_id}" for g in generated if g.origin is Origin.ORIGINAL}
    requests = list(batch_requests(((g.source, g.event) for g in generated), batch_size=args.batch_size))
    subject_key = f"chaos-{seed}".ljust(64, "k")  # both runs pseudonymise alike
    figures: dict[str, Any] = {"command": command, "machine": m, "seed": seed, "events": len(generated)}
    figures["database"] = "postgresql" if args.postgres else "sqlite"

    problems: list[str] = []
    states: dict[str, PipelineState] = {}
    runs = [("chaos", args.kills)] + ([] if args.skip_baseline else [("uninterrupted", 0)])
    for name, kills in runs:
        started = time.monotonic()
        run, states[name], found, timings = _run(name, args, requests, originals, subject_key, kills, seed)
        timings["total_s"] = time.monotonic() - started
        problems += [f"{name}: {p}" for p in found]
        figures[name] = {
            **timings,
            "kills": [asdict(k) | {"kill": asdict(k.kill)} for k in run.kills],
            "resent_batches": run.totals.resent_batches,
            "active_outcomes": len(states[name].active_outcomes),
            "active_entries": len(states[name].ledger),
        }
        print(f"[{name}] {timings['total_s']:.1f} s in all")
    if "uninterrupted" in states:
        chaos, calm = states["chaos"], states["uninterrupted"]
        problems += differences(
            "rules' active outcomes, chaos vs uninterrupted", chaos.active_outcomes, calm.active_outcomes
        )
        problems += differences("score's active ledger, chaos vs uninterrupted", chaos.ledger, calm.ledger)
        if not problems:
            print(
                f"identical: {len(chaos.active_outcomes)} active outcomes and {len(chaos.ledger)}"
                " ledger entries, id for id and point for point"
            )
    figures["problems"] = problems
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    print("PASS" if not problems else f"FAIL ({len(problems)} problems; {SEED_ENV}={seed})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
