"""Backtest benchmark: replay N stored events through a candidate rule set and the active one.

    python -m bench.backtest [--events N] [--database URL] [--batch-size B] [--json PATH]

Writes a synthetic history (devtools.population, duplicates dropped as the inbox would)
straight into a fresh rules database with bulk inserts, as if live evaluation had
committed it in batches of B events (one evaluated_at per batch), without going through
the services. Then it times exactly what BacktestRuleSet runs on the rules engine
thread: HistoryReader pages (read, sample, decode) fed to services.rules.backtest, both
rule sets evaluated batch by batch through the live evaluation function, every subject
scored twice with score's compute_score, and the report built. It prints events/s,
wall time and peak RSS, and the report's headline so a run can be sanity-checked.

The baseline is --baseline (config/rulesets/sample.yaml); the candidate, unless
--candidate names a file, is the baseline with red lights at -15 instead of -5 and its
version raised, a typical "make it stricter" change.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.meter import machine
from devtools.population import Origin, Population, PopulationConfig, subjects_for_events
from domain.catalogue import load_catalogue
from domain.policy import load_policy
from domain.ruleset.model import RuleSet
from domain.ruleset.parsing import rule_set_from_yaml
from egret.common.v1 import event_pb2
from kit.db import create_engine, make_session_factory
from kit.protoconv import to_timestamp
from kit.settings import SqliteTuning
from services.rules.backtest import Backtest, BacktestScope, combine
from services.rules.backtest_messages import MAX_SUBJECT_LIMIT
from services.rules.engine import RuleEngine
from services.rules.handlers.backtest_workers import ShardResult, replay_sharded
from services.rules.handlers.backtests import cohort_attributes
from services.rules.records import engine_event_from_record
from services.rules.settings import default_workers
from services.rules.stores.history import HistoryReader
from services.rules.stores.schema import Base, EvaluatedEvent

ROOT = Path(__file__).resolve().parents[1]
INSERT_CHUNK = 10_000


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backtest", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="stored events (default 1000000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="events per simulated live batch (default 1000)"
    )
    parser.add_argument(
        "--database", metavar="URL", help="an empty rules database (default: SQLite in a temp dir)"
    )
    parser.add_argument("--baseline", type=Path, default=ROOT / "config/rulesets/sample.yaml")
    parser.add_argument(
        "--candidate", type=Path, help="candidate rule-set file (default: stricter red lights)"
    )
    parser.add_argument("--policy", type=Path, default=ROOT / "config/policy.yaml")
    parser.add_argument("--catalogue", type=Path, default=ROOT / "config/catalogue.yaml")
    parser.add_argument("--sample", type=float, default=1.0, help="share of subjects replayed (default 1)")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument(
        "--subject-limit",
        type=int,
        default=MAX_SUBJECT_LIMIT,
        help=f"subjects listed, as the request's subject_limit (default {MAX_SUBJECT_LIMIT}, the most)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="replay processes, as EGRET_BACKTEST_WORKERS (default: the CPUs; 1: in this process)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.events < 1 or args.batch_size < 1 or args.workers < 1:
        parser.error("--events, --batch-size and --workers must be at least 1")
    return args


def stricter(baseline: RuleSet, source: str) -> str:
    """The baseline's source with traffic.red_light at -15 points and the version raised by one."""
    marker = "  - id: traffic.red_light\n"
    head, found, tail = source.partition(marker)
    if not found or "    points: -5\n" not in tail:
        raise SystemExit("the baseline has no traffic.red_light rule at -5 points; pass --candidate")
    tail = tail.replace("    points: -5\n", "    points: -15\n", 1)
    return (head + found + tail).replace(
        f"version: {baseline.version}\n", f"version: {baseline.version + 1}\n", 1
    )


def _rows(events: int, seed: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """Stored-event rows: what live evaluation would have committed, batch by batch."""
    config = PopulationConfig(subjects=subjects_for_events(events), seed=seed, now=datetime.now(UTC))
    population = Population(config)
    start = datetime.now(UTC) - timedelta(days=1)
    written = 0
    for item in population.generate():
        if written >= events:
            return
        if item.origin is not Origin.ORIGINAL:
            continue  # a resend: the inbox would have skipped it
        event = item.event
        # Keyed like ingest's HMAC pseudonyms (64 hex characters); the key itself is irrelevant here.
        subject_key = hashlib.sha256(
            f"bench/{event.subject.id_scheme}/{event.subject.id_value}".encode()
        ).hexdigest()
        record = event_pb2.RecordedEvent(
            ref=event_pb2.EventRef(source=item.source, event_id=event.event_id),
            event_type=event.event_type,
            subject_key=subject_key,
            subject_kind=event.subject.kind,
            occurred_at=event.occurred_at,
            recorded_at=to_timestamp(start),
            attributes=event.attributes,
            evidence_uri=event.evidence_uri,
        )
        yield {
            "source": item.source,
            "event_id": event.event_id,
            "subject_key": subject_key,
            "event_type": event.event_type,
            "occurred_at": event.occurred_at.ToDatetime(tzinfo=UTC),
            # One instant per simulated batch, in stream order, as commit_evaluation writes it.
            "evaluated_at": start + timedelta(milliseconds=written // batch_size),
            "rule_set": "egret-sample",
            "rule_set_version": 1,
            "record": record.SerializeToString(),
        }
        written += 1


def populate(url: str, events: int, seed: int, batch_size: int) -> int:
    engine = create_engine(url, sqlite=SqliteTuning(synchronous="NORMAL"))
    Base.metadata.create_all(engine)
    written = 0
    chunk: list[dict[str, Any]] = []
    with engine.begin() as connection:
        for row in _rows(events, seed, batch_size):
            chunk.append(row)
            if len(chunk) >= INSERT_CHUNK:
                connection.execute(sa.insert(EvaluatedEvent), chunk)
                written += len(chunk)
                chunk = []
        if chunk:
            connection.execute(sa.insert(EvaluatedEvent), chunk)
            written += len(chunk)
    engine.dispose()
    return written


def _populate_apart(url: str, events: int, seed: int, batch_size: int) -> None:
    """Populate in a child process, so the peak RSS reported is the replay's alone."""
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=populate, args=(url, events, seed, batch_size))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the history failed (exit code {child.exitcode})")


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux: the peak of the whole process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="egret-bench-backtest-") as tmp:
        url = args.database or f"sqlite:///{tmp}/rules.db"
        baseline_source = args.baseline.read_text(encoding="utf-8")
        baseline = rule_set_from_yaml(baseline_source)
        candidate_source = (
            args.candidate.read_text(encoding="utf-8")
            if args.candidate
            else stricter(baseline, baseline_source)
        )
        candidate = rule_set_from_yaml(candidate_source)
        print(f"writing {args.events} stored events in batches of {args.batch_size} ...", flush=True)
        started = time.perf_counter()
        _populate_apart(url, args.events, args.seed, args.batch_size)
        engine = create_engine(url, sqlite=SqliteTuning(synchronous="NORMAL"))
        with engine.connect() as connection:
            stored = connection.execute(sa.select(sa.func.count()).select_from(EvaluatedEvent)).scalar_one()
        print(f"  {stored} events written in {time.perf_counter() - started:.1f} s", flush=True)
        rss_before = _rss_mib()

        reader = HistoryReader(
            make_session_factory(engine), engine_event_from_record, page_size=args.page_size
        )
        scope = BacktestScope(sample_fraction=args.sample)
        policy = load_policy(args.policy)
        cohorts = cohort_attributes(load_catalogue(args.catalogue))
        as_of = datetime.now(UTC)
        print(f"replaying in {args.workers} process(es) ...", flush=True)
        load_before = _load_average()
        started = time.perf_counter()
        cpu_started = _cpu_seconds()
        workers: list[ShardResult] = []
        if args.workers > 1:
            # What the handler runs with EGRET_BACKTEST_WORKERS > 1, without the gRPC hop.
            replayed_in = asyncio.run(
                replay_sharded(
                    reader,
                    url,
                    baseline_source,
                    candidate_source,
                    policy=policy,
                    cohort_attributes=cohorts,
                    scope=scope,
                    as_of=as_of,
                    workers=args.workers,
                    subject_limit=args.subject_limit,
                )
            )
            if replayed_in is None:
                raise SystemExit("no stored history")
            workers = replayed_in
            replayed = time.perf_counter()
            report = combine(
                [w.partial for w in workers],
                baseline=baseline,
                candidate=candidate,
                policy=policy,
                cohort_attributes=cohorts,
                as_of=as_of,
                rule_limit=5,
                subject_limit=args.subject_limit,
            )
        else:
            # What the handler runs on the engine thread with one worker, without the gRPC
            # hop and the yields to live batches between pages.
            backtest = Backtest(
                baseline=baseline,
                candidate=candidate,
                policy=policy,
                cohort_attributes=cohorts,
                make_engine=RuleEngine,
            )
            try:
                for page in reader.pages(scope):
                    backtest.feed(page)
                replayed = time.perf_counter()
                report = backtest.report(as_of=as_of, rule_limit=5, subject_limit=args.subject_limit)
            finally:
                backtest.close()
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_started
        engine.dispose()

    figures: dict[str, Any] = {
        "command": " ".join(["python -m bench.backtest", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "database": "sqlite" if args.database is None else sa.make_url(args.database).get_backend_name(),
        "events_stored": stored,
        "events_replayed": report.events_replayed,
        "batches_replayed": report.batches_replayed,
        "subjects": report.overall.subjects,
        "subjects_changed": report.overall.subjects_changed,
        "workers": args.workers,
        "wall_s": round(elapsed, 2),
        # Reading, decoding and evaluating both sides; the rest is scoring and the report.
        # With workers: until the last worker is done (each scores its own subjects), then
        # combining their partial reports.
        "replay_s": round(replayed - started, 2),
        "report_s": round(elapsed - (replayed - started), 2),
        "events_per_s": round(report.events_replayed / elapsed),
        # CPU seconds of this process and its finished children (the workers), which on a
        # busy machine say more than the wall time.
        "cpu_s": round(cpu, 1),
        "rss_peak_mib": round(_rss_mib()),
        "rss_before_replay_mib": round(rss_before),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "target_s": 60,
    }
    if workers:
        figures["worker_replay_s"] = [round(w.replay_seconds, 2) for w in workers]
        figures["worker_report_s"] = [round(w.report_seconds, 2) for w in workers]
        figures["worker_rss_peak_mib"] = [round(w.peak_rss_mib) for w in workers]
    print(json.dumps(figures, indent=2))
    print("tier migrations (baseline -> candidate):")
    for move in report.overall.migrations:
        if move.from_tier != move.to_tier:
            print(f"  {move.from_tier:>4} -> {move.to_tier:<4} {move.subjects}")
    print("rules moving the most points:")
    for rule in report.overall.rules:
        print(f"  {rule.rule_id:<36} {rule.points_moved:+d}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
