"""Chaos for a local cluster: SIGKILL services at random moments while a stream runs,
restart them, then check that nothing was lost, doubled or scored differently.

One implementation for the end to end test (tests/e2e/test_chaos.py) and the long run
(bench/chaos.py). A schedule is derived from a seed alone, so a failing run is replayed
by setting EGRET_CHAOS_SEED to the seed it printed. Kills are placed by stream progress
(after N batches acknowledged), not by the clock, so the same seed kills at the same
point of the stream however fast the machine is.

What `check` demands after the pipeline drained (docs/rules.md, "Event time"): every
acknowledged event stored exactly once in ingest and evaluated once by rules; rules'
active (unreversed) outcomes and score's active ledger entries both equal, id for id and
point for point, one in-process evaluation of the stored, unretracted events in event
time; `python -m services.score verify` finds no mismatch; every audit chain is intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from contracts.score_store import StoredEntry, StoredReversal
from devtools.cluster import REPO_ROOT, Cluster
from domain.entries import EntryStatus
from domain.ruleset.parsing import load_rule_set
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret_client.submitter import StreamTotals, stream_by_source
from kit.db import create_engine
from services.ingest.stores.events import StoredEvent, StoredRetraction
from services.rules.engine import RuleEngine
from services.rules.records import engine_event_from_record
from services.rules.stores.schema import DeadLetterRow, EmittedOutcome, EvaluatedEvent

SEED_ENV = "EGRET_CHAOS_SEED"
SAMPLE_RULESET = REPO_ROOT / "config" / "rulesets" / "sample.yaml"
_ACKNOWLEDGED = (ingest_pb.EVENT_STATUS_ACCEPTED, ingest_pb.EVENT_STATUS_DUPLICATE)


def chaos_seed(environ: Mapping[str, str] = os.environ) -> int:
    """The seed from EGRET_CHAOS_SEED, or a fresh random one (print it: it replays the run)."""
    value = environ.get(SEED_ENV, "").strip()
    if not value:
        return secrets.randbelow(2**32)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Kill:
    """SIGKILL `victims` together once `after_batches` batches are acknowledged; restart
    them (downstream first) `down_s` seconds later."""

    after_batches: int
    victims: tuple[str, ...]
    down_s: float


def kill_schedule(
    seed: int,
    *,
    kills: int,
    batches: int,
    services: Sequence[str],
    pair_fraction: float = 0.3,
    down_s: tuple[float, float] = (0.1, 1.5),
) -> list[Kill]:
    """`kills` kills spread at random over the middle of a stream of `batches` batches,
    each of one service or (with chance `pair_fraction`) two at once."""
    if kills < 0 or batches < 1:
        raise ValueError("kills must be at least 0 and batches at least 1")
    rng = random.Random(f"egret-chaos/{seed}")
    # Neither at the very start (nothing in flight yet) nor at the very end.
    low, high = max(1, batches // 20), max(1, batches * 9 // 10)
    moments = sorted(rng.randint(low, high) for _ in range(kills))
    schedule = []
    for moment in moments:
        count = 2 if len(services) > 1 and rng.random() < pair_fraction else 1
        victims = tuple(rng.sample(list(services), count))
        schedule.append(Kill(moment, victims, round(rng.uniform(*down_s), 2)))
    return schedule


@dataclass(frozen=True)
class KillRecord:
    kill: Kill
    at_s: float  # since streaming began
    during_stream: bool
    outboxes: Mapping[str, int | None]  # rows waiting when it struck
    restart_s: float  # from SIGKILL until every victim answered SERVING again


@dataclass
class ChaosRun:
    """What a streaming run under kills did: the client's totals, which events ingest
    acknowledged (accepted or duplicate) and rejected, and every kill as it happened."""

    totals: StreamTotals
    acknowledged: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    kills: list[KillRecord] = field(default_factory=list)
    stream_s: float = 0.0
    drain_s: float = 0.0


async def paced(
    requests: Iterable[ingest_pb.StreamEventsRequest], events_per_s: float
) -> AsyncIterator[ingest_pb.StreamEventsRequest]:
    """The requests at no more than `events_per_s` (0: as fast as the client takes them),
    so that a small stream lasts long enough for its kills to land while it runs."""
    started = time.monotonic()
    sent = 0
    for request in requests:
        yield request
        sent += len(request.events)
        if events_per_s > 0:
            await asyncio.sleep(max(0.0, started + sent / events_per_s - time.monotonic()))
        else:
            await asyncio.sleep(0)


def _restart_order(cluster: Cluster, victims: Iterable[str]) -> list[str]:
    return [name for name in cluster.services if name in victims]  # downstream first


async def stream_with_kills(
    cluster: Cluster,
    requests: Sequence[ingest_pb.StreamEventsRequest],
    schedule: Sequence[Kill],
    *,
    in_flight: int = 4,
    events_per_s: float = 0.0,
    drain_timeout_s: float = 300.0,
    log: bool = False,
) -> ChaosRun:
    """Stream `requests` (one stream per department, resent on every break) while the
    schedule kills and restarts services; wait until every kill is done and the pipeline
    drained. A service that cannot restart raises ClusterError."""
    acked = 0
    progress = asyncio.Event()
    started = time.monotonic()
    run = ChaosRun(StreamTotals())

    def on_ack(
        request: ingest_pb.StreamEventsRequest, response: ingest_pb.StreamEventsResponse, _: float
    ) -> None:
        nonlocal acked
        for result in response.results:
            key = f"{request.source}/{result.event_id}"
            if result.status in _ACKNOWLEDGED:
                run.acknowledged.add(key)
            elif result.status == ingest_pb.EVENT_STATUS_REJECTED:
                run.rejected.add(key)
        acked += 1
        progress.set()

    # Kills strike independently, each at its moment; one waits only for a victim that
    # an earlier kill has not brought back yet.
    down = {name: asyncio.Lock() for name in cluster.services}

    async def strike(kill: Kill) -> None:
        while acked < kill.after_batches:
            progress.clear()
            await progress.wait()
        async with contextlib.AsyncExitStack() as held:
            for victim in sorted(kill.victims):
                await held.enter_async_context(down[victim])
            during_stream = not streaming.done()
            outboxes = await asyncio.to_thread(cluster.outbox_counts)
            struck = time.monotonic()
            for victim in kill.victims:
                cluster.kill(victim)
            at_s = struck - started
            if log:
                print(
                    f"  {at_s:7.1f}s  kill -9 {'+'.join(kill.victims)} (batch {acked}, outboxes {outboxes})"
                )
            await asyncio.sleep(kill.down_s)
            for victim in _restart_order(cluster, kill.victims):
                await asyncio.to_thread(cluster.start, victim)
        run.kills.append(KillRecord(kill, at_s, during_stream, outboxes, time.monotonic() - struck))

    async def chaos() -> None:
        await asyncio.gather(*(strike(kill) for kill in schedule))

    streaming = asyncio.create_task(
        stream_by_source(
            cluster.department_channel,
            paced(requests, events_per_s),
            in_flight=in_flight,
            # Enough for a service down for a restart or two: ~60 s without any ack.
            max_retries=60,
            backoff_initial_s=0.1,
            backoff_max_s=1.0,
            ack_timeout_s=60.0,
            on_ack=on_ack,
        )
    )

    def stream_ended(_: asyncio.Task[StreamTotals]) -> None:
        run.stream_s = time.monotonic() - started

    streaming.add_done_callback(stream_ended)
    killing = asyncio.create_task(chaos())
    try:
        # A service that does not come back fails the run now, not when the stream gives up.
        done, _ = await asyncio.wait({streaming, killing}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        run.totals = await streaming
        await killing
    finally:
        for task in (streaming, killing):
            task.cancel()
    run.kills.sort(key=lambda k: k.at_s)
    run.drain_s = await asyncio.to_thread(cluster.wait_drained, drain_timeout_s)
    return run


# -- what the databases hold ---------------------------------------------------------------


@dataclass(frozen=True)
class PipelineState:
    """The drained pipeline as its databases hold it."""

    stored: list[str]  # ingest_events keys, one per row
    stored_records: list[bytes]  # unretracted, for the in-process evaluation
    retracted: set[str]
    evaluated: list[str]  # rules_evaluated_events keys, one per row
    dead_letters: int
    active_outcomes: dict[str, int]  # outcome id → points, not reversed
    reversed_outcomes: int
    ledger: dict[str, int]  # entry id → points, not reversed
    reversed_entries: int


def _key(source: str, event_id: str) -> str:
    return f"{source}/{event_id}"


def read_state(cluster: Cluster) -> PipelineState:
    engines = {
        name: create_engine(cluster.database_url(name), read_only=True)
        for name in ("ingest", *cluster.rules_names, "score")
    }
    try:
        with engines["ingest"].connect() as db:
            retracted = {
                _key(s, e)
                for s, e in db.execute(sa.select(StoredRetraction.source, StoredRetraction.event_id))
            }
            stored: list[str] = []
            records: list[bytes] = []
            for source, event_id, record in db.execute(
                sa.select(StoredEvent.source, StoredEvent.event_id, StoredEvent.record)
            ):
                stored.append(_key(source, event_id))
                if _key(source, event_id) not in retracted:
                    records.append(record)
        evaluated: list[str] = []
        dead_letters = reversed_outcomes = 0
        active: dict[str, int] = {}
        for name in cluster.rules_names:
            with engines[name].connect() as db:
                evaluated += [
                    _key(s, e)
                    for s, e in db.execute(sa.select(EvaluatedEvent.source, EvaluatedEvent.event_id))
                ]
                dead_letters += db.scalar(sa.select(sa.func.count()).select_from(DeadLetterRow)) or 0
                for outcome_id, points, reversed_at in db.execute(
                    sa.select(EmittedOutcome.outcome_id, EmittedOutcome.points, EmittedOutcome.reversed_at)
                ):
                    if reversed_at is None:
                        active[outcome_id] = points
                    else:
                        reversed_outcomes += 1
        with engines["score"].connect() as db:
            reversals = set(db.scalars(sa.select(StoredReversal.outcome_id)))
            ledger: dict[str, int] = {}
            reversed_entries = 0
            for entry_id, points, status in db.execute(
                sa.select(StoredEntry.entry_id, StoredEntry.points, StoredEntry.status)
            ):
                if status == EntryStatus.REVERSED.value or entry_id in reversals:
                    reversed_entries += 1
                else:
                    ledger[entry_id] = points
    finally:
        for engine in engines.values():
            engine.dispose()
    return PipelineState(
        stored,
        records,
        retracted,
        evaluated,
        dead_letters,
        active,
        reversed_outcomes,
        ledger,
        reversed_entries,
    )


def expected_outcomes(records: Iterable[bytes], ruleset: Path = SAMPLE_RULESET) -> dict[str, int]:
    """Outcome id → points of one evaluation of all the events at once, in event time:
    what the pipeline must hold whatever order the events arrived in."""
    events = sorted((engine_event_from_record(r) for r in records), key=lambda e: (e.occurred_at, e.key))
    with RuleEngine(load_rule_set(ruleset)) as engine:
        # Nothing was evaluated before, so nothing is superseded: the firings are all of it.
        firings = engine.evaluate(events).firings
    return {firing.outcome_id: firing.points for firing in firings}


def run_cli(cluster: Cluster, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m services.<name> ARGS` with the service's own environment."""
    service = "rules" if name in cluster.rules_names else name
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}", *args],
        env=cluster.env_for(name),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def differences(
    label: str, found: Mapping[str, int], expected: Mapping[str, int], show: int = 5
) -> list[str]:
    """What differs between two id → points maps, as problems (none when equal)."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    points = sorted(k for k in found.keys() & expected.keys() if found[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"{label}: {len(missing)} outcome(s) missing, e.g. {missing[:show]}")
    if extra:
        problems.append(f"{label}: {len(extra)} outcome(s) not expected, e.g. {extra[:show]}")
    if points:
        shown = [(k, found[k], expected[k]) for k in points[:show]]
        problems.append(f"{label}: {len(points)} outcome(s) with other points (id, found, expected): {shown}")
    return problems


def check(
    cluster: Cluster,
    run: ChaosRun,
    *,
    originals: set[str],
    state: PipelineState | None = None,
    verify_cli: bool = True,
) -> list[str]:
    """Every problem of a drained pipeline after `run`; an empty list means it held.

    `originals` are the keys of the valid events the stream carried (each once); `state`
    is read from the databases unless given. Call with the services stopped or idle; with
    `verify_cli` it also runs score's `verify` and every service's `verify-audit`.
    """
    state = state or read_state(cluster)
    problems: list[str] = []
    stored = set(state.stored)
    if len(state.stored) != len(stored):
        problems.append(f"ingest stored {len(state.stored) - len(stored)} event(s) twice")
    if lost := run.acknowledged - stored:
        problems.append(f"{len(lost)} acknowledged event(s) not stored, e.g. {sorted(lost)[:5]}")
    if stored != originals:
        problems.append(
            f"ingest holds {len(stored - originals)} event(s) never sent as valid and lacks"
            f" {len(originals - stored)} sent: {sorted(stored ^ originals)[:5]}"
        )
    if stored_rejected := stored & run.rejected:
        problems.append(f"{len(stored_rejected)} rejected event(s) stored: {sorted(stored_rejected)[:5]}")
    if sorted(state.evaluated) != sorted(state.stored):
        problems.append(
            f"rules evaluated {len(state.evaluated)} event rows ({len(set(state.evaluated))} distinct)"
            f" for {len(stored)} stored"
        )
    if state.dead_letters:
        problems.append(f"rules parked {state.dead_letters} event(s) as dead letters")
    expected = expected_outcomes(state.stored_records)
    problems += differences("rules' active outcomes", state.active_outcomes, expected)
    problems += differences("score's active ledger", state.ledger, expected)
    if verify_cli:
        problems += verify_problems(cluster)
    return problems


def verify_problems(cluster: Cluster) -> list[str]:
    """Problems reported by `python -m services.score verify` and every `verify-audit`."""
    problems = []
    verified = run_cli(cluster, "score", "verify")
    if verified.returncode != 0 or "mismatches: 0" not in verified.stdout:
        problems.append(
            f"score verify exited {verified.returncode}: {verified.stdout}{verified.stderr[-2000:]}"
        )
    for name in cluster.services:
        audited = run_cli(cluster, name, "verify-audit")
        if audited.returncode != 0 or "audit log intact" not in audited.stdout:
            problems.append(
                f"{name} verify-audit exited {audited.returncode}: {audited.stdout}{audited.stderr[-2000:]}"
            )
    return problems
