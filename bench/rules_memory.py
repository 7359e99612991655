"""Live evaluation's memory: N events across S subjects through rules' real evaluation path.

    python -m bench.rules_memory [--events N] [--subjects S] [--batch-size B] [--database URL]
                                 [--window-cache-subjects C] [--window-cache-mib M]

Builds what services/rules/bootstrap.py builds for evaluation (the lifecycle with the
sample rule set active, the Evaluator on SqlEvaluationStore over a real database,
SQLite in a temporary directory by default) and, in this process, pushes N recorded
events in batches of B through exactly what RulesServicer.EvaluateEvents runs per batch:
engine_event() of each RecordedEvent, then Evaluator.evaluate(events, records), which
reads the inbox and the history, runs durable-rules and commits events, outcomes and
outbox rows. Every B*100 events the outbox is emptied, as the relay to score would.
The window cache (services/rules/window_cache.py) is sized as the service's settings size
it by default; ``--window-cache-subjects 0`` reads every batch's history from the database.

Each event goes to a subject drawn uniformly from S (100,000 by default), so every batch
touches about B different subjects and a subject's history grows through the whole run
(the window, sequence and cap rules read it back from the database). Event time advances
with the stream over two years, with a few days' jitter, so some events arrive late.
Attributes are drawn from the catalogue the way devtools/population.py draws them.

RSS (VmRSS of /proc/self/status) is read after every batch: the figures are the RSS
before the first batch, the highest reading, the RSS at the end, and the RSS after each
tenth of the events, with events/s for that tenth, so a reader sees whether memory is
flat. Each tenth also reports the firings per event and where the CPU of the per-batch
path went (``parts_us_per_event``): the store's reads (batch state, history on a window
cache miss, reissued ids), durable-rules and the settling of firings (``engine``), the
commit, and the rest (decoding the events, the window cache, the Evaluator itself), so
that a reader sees which part grows with the history.

Subject keys are computed before the start reading (they are the benchmark's own data,
about 20 MB for 100,000 subjects), so the readings show evaluation alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa

from bench.meter import machine
from devtools.population import (
    DEFAULT_TYPE_WEIGHT,
    TYPE_WEIGHTS,
    Population,
    PopulationConfig,
    attribute_value,
)
from domain.catalogue import EventType
from domain.ruleset.model import EngineEvent, RuleSet
from egret.common.v1 import event_pb2
from kit.audit import UNKEYED
from kit.db import create_engine, make_session_factory
from kit.page_tokens import PageTokens
from kit.protoconv import to_timestamp
from kit.server import tune_collector
from kit.settings import GC_THRESHOLD, SqliteTuning
from services.rules.batch import EvaluationContext
from services.rules.domain import BatchState, Evaluator
from services.rules.engine import RuleEngine, check_rule_set
from services.rules.evaluated import Evaluated
from services.rules.lifecycle import RuleSetLifecycle
from services.rules.records import engine_event
from services.rules.settings import RulesSettings
from services.rules.stores.evaluation import SqlEvaluationStore
from services.rules.stores.rule_sets import SqlLifecycleStore
from services.rules.stores.schema import Base, Outbox
from services.rules.window_cache import WindowCache
from services.rules.windows import PriorOutcome

ROOT = Path(__file__).resolve().parents[1]
SPAN = timedelta(days=730)
JITTER_DAYS = 5.0
DRAIN_EVERY_BATCHES = 100


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rules_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events evaluated (default 1000000)")
    parser.add_argument("--subjects", type=int, default=100_000, help="subjects (default 100000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per batch (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--database", metavar="URL", help="an empty rules database (default: SQLite in a temp dir)"
    )
    parser.add_argument("--ruleset", type=Path, default=ROOT / "config/rulesets/sample.yaml")
    parser.add_argument(
        "--window-cache-subjects",
        type=int,
        default=RulesSettings.window_cache_subjects,
        help="subjects the window cache holds (0: off; default as EGRET_RULES_WINDOW_CACHE_SUBJECTS)",
    )
    parser.add_argument(
        "--window-cache-mib",
        type=int,
        default=RulesSettings.window_cache_mib,
        help="estimated MiB the window cache may take (default as EGRET_RULES_WINDOW_CACHE_MIB)",
    )
    parser.add_argument(
        "--sqlite-cache-mib",
        type=int,
        default=SqliteTuning.cache_mib,
        help="SQLite's page cache per connection (default as EGRET_SQLITE_CACHE_MIB; 2 is SQLite's own)",
    )
    parser.add_argument(
        "--sqlite-checkpoint-pages",
        type=int,
        default=SqliteTuning.checkpoint_pages,
        help="WAL pages between automatic checkpoints (default as EGRET_SQLITE_CHECKPOINT_PAGES; "
        "1000 is SQLite's own)",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=GC_THRESHOLD,
        help="the cyclic collector's threshold, as the service sets it once serving "
        "(default as EGRET_GC_THRESHOLD; 700 is Python's own)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.events < 1 or args.subjects < 1 or args.batch_size < 1:
        parser.error("--events, --subjects and --batch-size must be at least 1")
    return args


@dataclass(frozen=True)
class _Subject:
    key: str
    kind: str  # "person" or "organization"
    kind_value: int  # its SubjectKind number


class _Stream:
    """Recorded events as ingest delivers them, batch by batch, from a seeded generator."""

    def __init__(self, subjects: int, seed: int, now: datetime) -> None:
        population = Population(PopulationConfig(subjects=subjects, seed=seed, now=now))
        self._rng = random.Random(f"egret-bench-rules-memory/{seed}")
        self._seed = seed
        self._start = now - SPAN
        self._subjects: list[_Subject] = []
        for index in range(subjects):
            subject = population.subject(index)
            # Keyed like ingest's HMAC pseudonyms (64 hex characters).
            key = hashlib.sha256(f"bench/{subject.id_scheme}/{subject.id_value}".encode()).hexdigest()
            self._subjects.append(_Subject(key, subject.kind, subject.proto().kind))
        self._types: dict[str, tuple[list[EventType], list[float]]] = {}
        for kind in {s.kind for s in self._subjects}:
            types = [t for t in population.catalogue.event_types.values() if kind in t.subject_kinds]
            self._types[kind] = (types, [TYPE_WEIGHTS.get(t.name, DEFAULT_TYPE_WEIGHT) for t in types])
        self._serial = 0

    def batches(self, events: int, batch_size: int) -> Iterator[list[event_pb2.RecordedEvent]]:
        recorded_at = to_timestamp(datetime.now(UTC))
        while self._serial < events:
            size = min(batch_size, events - self._serial)
            yield [self._event(events, recorded_at) for _ in range(size)]

    def _event(self, events: int, recorded_at: Any) -> event_pb2.RecordedEvent:
        rng = self._rng
        subject = self._subjects[rng.randrange(len(self._subjects))]
        types, weights = self._types[subject.kind]
        type_spec = rng.choices(types, weights)[0]
        progress = self._serial / events
        occurred_at = self._start + SPAN * progress - timedelta(days=rng.uniform(0, JITTER_DAYS))
        occurred_at = occurred_at.replace(microsecond=0)
        self._serial += 1
        return event_pb2.RecordedEvent(
            ref=event_pb2.EventRef(
                source=rng.choice(sorted(type_spec.departments)),
                event_id=f"mem-{self._seed}-{self._serial:09d}",
            ),
            event_type=type_spec.name,
            subject_key=subject.key,
            subject_kind=subject.kind_value,  # type: ignore[arg-type]
            occurred_at=to_timestamp(occurred_at),
            recorded_at=recorded_at,
            attributes={
                spec.name: attribute_value(spec, rng, occurred_at)
                for spec in type_spec.attributes.values()
                if spec.required or rng.random() < 0.7
            },
        )


class _Parts:
    """CPU seconds (process time) spent in each part of the per-batch path."""

    NAMES = ("store_reads", "engine", "commit")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)

    def timed(self, part: str, started: float) -> None:
        self.seconds[part] += time.process_time() - started


class _Collector:
    """CPU seconds the cyclic garbage collector took, and its runs (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.runs = 0
        self._started = 0.0

    def __call__(self, phase: str, _info: Mapping[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started
            self.runs += 1


class _MeteredStore(SqlEvaluationStore):
    """The service's store, its per-batch calls timed into `parts`."""

    def __init__(self, parts: _Parts, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts = parts

    def batch_state(self, keys: Sequence[str]) -> BatchState:
        started = time.process_time()
        try:
            return super().batch_state(keys)
        finally:
            self._parts.timed("store_reads", started)

    def context(self, since: Mapping[str, datetime], event_types: frozenset[str]) -> EvaluationContext:
        started = time.process_time()
        try:
            return super().context(since, event_types)
        finally:
            self._parts.timed("store_reads", started)

    def reversed_among(self, outcome_ids: Sequence[str]) -> frozenset[str]:
        started = time.process_time()
        try:
            return super().reversed_among(outcome_ids)
        finally:
            self._parts.timed("store_reads", started)

    def commit_evaluation(self, *args: Any, **kwargs: Any) -> bool:
        started = time.process_time()
        try:
            return super().commit_evaluation(*args, **kwargs)
        finally:
            self._parts.timed("commit", started)


# A read-only empty mapping: the engine's defaults, never a shared mutable one.
_NOTHING: Mapping[str, Any] = MappingProxyType({})


class _MeteredEngine:
    """The compiled rule set (services.rules.batch.Engine), its evaluations timed into `parts`."""

    def __init__(self, parts: _Parts, rule_set: RuleSet) -> None:
        self._parts = parts
        self._engine = RuleEngine(rule_set)

    def evaluate(
        self,
        events: Sequence[EngineEvent],
        history: Mapping[str, Sequence[EngineEvent]] = _NOTHING,
        prior: Mapping[str, Sequence[PriorOutcome]] = _NOTHING,
        since: Mapping[str, datetime] = _NOTHING,
    ) -> Evaluated:
        started = time.process_time()
        try:
            return self._engine.evaluate(events, history, prior, since)
        finally:
            self._parts.timed("engine", started)

    def close(self) -> None:
        self._engine.close()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="egret-bench-rules-memory-") as tmp:
        url = args.database or f"sqlite:///{tmp}/rules.db"
        engine = create_engine(
            url,
            sqlite=SqliteTuning(
                synchronous="NORMAL",
                cache_mib=args.sqlite_cache_mib,
                checkpoint_pages=args.sqlite_checkpoint_pages,
            ),
        )
        # The models' own tables, as the migrations create them.
        Base.metadata.create_all(engine)
        sessions = make_session_factory(engine)
        rule_sets = SqlLifecycleStore(sessions, audit_keys=UNKEYED)
        lifecycle = RuleSetLifecycle(
            rule_sets,
            validate=check_rule_set,
            clock=lambda: datetime.now(UTC),
            tokens=PageTokens.development(),
        )
        lifecycle.ensure_active(args.ruleset.read_text(encoding="utf-8"))
        cache = WindowCache(max_subjects=args.window_cache_subjects, max_bytes=args.window_cache_mib * 2**20)
        parts = _Parts()
        evaluator = Evaluator(
            rule_sets=rule_sets,
            store=_MeteredStore(parts, sessions, key_id="k1"),
            clock=lambda: datetime.now(UTC),
            dead_letter_after=3,
            compile_rule_set=lambda rule_set: _MeteredEngine(parts, rule_set),
            window_cache=cache,
        )
        evaluator.load_active()
        print(f"preparing {args.subjects} subjects ...", flush=True)
        stream = _Stream(args.subjects, args.seed, datetime.now(UTC))
        # As kit.server does once the service is built.
        tune_collector(args.gc_threshold)

        checkpoints = [round(args.events * tenth / 10) for tenth in range(1, 11)]
        samples: list[dict[str, Any]] = []
        rss_start = rss_peak = rss_mib()
        load_before = _load_average()
        collector = _Collector()
        gc.callbacks.append(collector)
        print(f"evaluating {args.events} events in batches of {args.batch_size} ...", flush=True)
        started = mark = time.perf_counter()
        evaluating = cpu = cpu_mark = 0.0
        done = firings = marked = firings_mark = 0
        parts_mark = dict(parts.seconds)
        for batches, batch in enumerate(stream.batches(args.events, args.batch_size), start=1):
            # What RulesServicer.EvaluateEvents runs for a batch (without retractions).
            clock, cpu_clock = time.perf_counter(), time.process_time()
            events = [engine_event(e) for e in batch]
            records = {ev.key: e.SerializeToString() for ev, e in zip(events, batch, strict=True)}
            result = evaluator.evaluate(events, records)
            evaluating += time.perf_counter() - clock
            cpu += time.process_time() - cpu_clock
            firings += len(result.firings)
            done += len(batch)
            if batches % DRAIN_EVERY_BATCHES == 0:
                with engine.begin() as connection:  # the relay to score, all at once
                    connection.execute(sa.delete(Outbox))
            rss = rss_mib()
            rss_peak = max(rss_peak, rss)
            if checkpoints and done >= checkpoints[0]:
                checkpoints.pop(0)
                now = time.perf_counter()
                tenth = done - marked
                spent = {
                    name: (parts.seconds[name] - parts_mark[name]) / tenth * 1e6 for name in _Parts.NAMES
                }
                spent["rest"] = (cpu - cpu_mark) / tenth * 1e6 - sum(spent.values())
                samples.append(
                    {
                        "events": done,
                        "rss_mib": round(rss),
                        "elapsed_s": round(now - started, 1),
                        "events_per_s": round((done - marked) / (now - mark)),
                        # CPU of the per-batch path only: less sensitive to other load than events/s.
                        "cpu_us_per_event": round((cpu - cpu_mark) / (done - marked) * 1e6),
                        "firings_per_event": round((firings - firings_mark) / tenth, 3),
                        "parts_us_per_event": {name: round(value, 1) for name, value in spent.items()},
                    }
                )
                print(
                    f"  {done:>9} events  RSS {rss:7.0f} MiB  {samples[-1]['events_per_s']:>6} events/s"
                    f"  {samples[-1]['cpu_us_per_event']:>5} µs CPU/event"
                    f"  {samples[-1]['firings_per_event']:.2f} firings/event  "
                    + "  ".join(f"{k} {v:.0f}" for k, v in samples[-1]["parts_us_per_event"].items())
                )
                mark, marked, cpu_mark, firings_mark = now, done, cpu, firings
                parts_mark = dict(parts.seconds)
        elapsed = time.perf_counter() - started
        gc.callbacks.remove(collector)
        rss_end = rss_mib()
        held = cache.stats()
        evaluator.close()
        engine.dispose()

    figures: dict[str, Any] = {
        "command": " ".join(["python -m bench.rules_memory", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "database": "sqlite" if args.database is None else sa.make_url(args.database).get_backend_name(),
        "events": done,
        "subjects": args.subjects,
        "batch_size": args.batch_size,
        "gc_threshold": args.gc_threshold,
        "sqlite_cache_mib": args.sqlite_cache_mib,
        "sqlite_checkpoint_pages": args.sqlite_checkpoint_pages,
        "firings": firings,
        "window_cache": {
            "subjects": args.window_cache_subjects,
            "mib": args.window_cache_mib,
            **dataclasses.asdict(held),
        },
        "wall_s": round(elapsed, 1),
        "events_per_s": round(done / elapsed),
        # Time inside the servicer's per-batch path only (not generating the events).
        "evaluation_events_per_s": round(done / evaluating),
        "evaluation_cpu_us_per_event": round(cpu / done * 1e6),
        "rss_start_mib": round(rss_start),
        "rss_peak_mib": round(rss_peak),
        "rss_end_mib": round(rss_end),
        # ru_maxrss: the process's peak, including moments between two readings.
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # The cyclic collector's share of the run's CPU (all of it in the per-batch path).
        "gc_s": round(collector.seconds, 2),
        "gc_runs": collector.runs,
        "rss_by_tenth": samples,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
