"""Live evaluation with the window cache, and with the engine remembering what history events
matched, fires exactly what it fires without either: the same stream (late events,
retractions, a redrive) through Evaluator on a real store with the cache and the engine's
memory off, warm, and so small that subjects and events keep leaving them, gives the same
results batch by batch and the same stored outcomes and outbox rows, byte for byte."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from domain.ruleset.model import EngineEvent, RuleSet
from egret.common.v1 import due_process_pb2, event_pb2, subject_pb2
from kit.audit import UNKEYED
from kit.db import create_engine, make_session_factory
from kit.page_tokens import PageTokens
from kit.protoconv import to_attribute_value, to_timestamp
from services.rules.domain import Evaluator, Redrive, RetractionNotice
from services.rules.engine import REMEMBERED_EVENTS, RuleEngine, check_rule_set
from services.rules.lifecycle import RuleSetLifecycle
from services.rules.records import engine_event
from services.rules.stores.evaluation import SqlEvaluationStore
from services.rules.stores.rule_sets import SqlLifecycleStore
from services.rules.stores.schema import Base, EmittedOutcome, EvaluatedEvent, Outbox
from services.rules.window_cache import WindowCache

SAMPLE = Path(__file__).parents[3] / "config/rulesets/sample.yaml"
START = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2027, 1, 1, tzinfo=UTC)
SUBJECTS = [f"{n:064x}" for n in range(1, 9)]


def _attributes(event_type: str, rng: random.Random) -> dict[str, Any]:
    if event_type == "transport.bike.parked_outside_fence":
        return {"fence_id": f"F{rng.randrange(5)}"}
    if event_type == "transport.metro.fare_evasion":
        return {"station": "Lianban", "amount": 4.0}
    if event_type == "library.book_returned":
        return {"on_time": rng.random() < 0.8}
    if event_type == "finance.loan_taken":
        return {"loan_id": f"L{rng.randrange(3)}", "amount": 1000.0}
    if event_type == "finance.loan_default":
        return {"loan_id": f"L{rng.randrange(3)}", "amount": 1000.0, "days_overdue": rng.randrange(10, 120)}
    # Now and then a string where hours must be a number: it fails, is parked and redriven.
    return {"hours": rng.randrange(5, 30) if rng.random() < 0.97 else "x"}


def _stream(seed: int, size: int) -> list[event_pb2.RecordedEvent]:
    rng = random.Random(seed)
    types = [
        "transport.bike.parked_outside_fence",
        "transport.metro.fare_evasion",
        "library.book_returned",
        "finance.loan_taken",
        "finance.loan_default",
        "civic.volunteer_hours",
    ]
    events = []
    for n in range(size):
        event_type = rng.choice(types)
        occurred = START + timedelta(days=400 * n / size + rng.uniform(0, 3))
        events.append(
            event_pb2.RecordedEvent(
                ref=event_pb2.EventRef(source="dept", event_id=f"e{n:05d}"),
                event_type=event_type,
                subject_key=rng.choice(SUBJECTS),
                subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
                occurred_at=to_timestamp(occurred.replace(microsecond=0)),
                recorded_at=to_timestamp(NOW),
                attributes={k: to_attribute_value(v) for k, v in _attributes(event_type, rng).items()},
            )
        )
    return events


@dataclass(frozen=True)
class Step:
    """A batch of events, or a retraction of an earlier event."""

    batch: tuple[event_pb2.RecordedEvent, ...] = ()
    retract: event_pb2.RecordedEvent | None = None


def _schedule(seed: int) -> list[Step]:
    """Batches mostly in event time, some events held back and delivered months late, some
    delivered twice, and retractions of evaluated events in between."""
    rng = random.Random(seed)
    events = _stream(seed, 900)
    late = [e for e in events if rng.random() < 0.06]
    on_time = [e for e in events if e not in late]
    steps: list[Step] = []
    delivered: list[event_pb2.RecordedEvent] = []
    position = 0
    while position < len(on_time):
        size = rng.randrange(5, 40)
        batch = on_time[position : position + size]
        position += size
        if late and rng.random() < 0.4:
            batch = [*batch, late.pop(0)]
        if delivered and rng.random() < 0.2:
            batch = [*batch, rng.choice(delivered)]  # a resend
        steps.append(Step(batch=tuple(batch)))
        delivered.extend(batch)
        if rng.random() < 0.25:
            steps.append(Step(retract=rng.choice(delivered)))
    steps.append(Step(batch=tuple(late)))
    return steps


def _notice(event: event_pb2.RecordedEvent) -> RetractionNotice:
    retraction = due_process_pb2.Retraction(
        ref=event.ref,
        subject_key=event.subject_key,
        reason="entered in error",
        retracted_at=to_timestamp(NOW),
        retracted_by="dept",
        subject_key_id="k1",
    )
    key = f"{event.ref.source}/{event.ref.event_id}"
    return RetractionNotice(key, event.subject_key, retraction.SerializeToString())


def _run(
    url: str, cache: WindowCache | None, steps: list[Step], *, remember: int = REMEMBERED_EVENTS
) -> tuple[list[Any], list[Any], int]:
    """Every step's result and, at the end, the stored outcomes, inbox and outbox rows, and
    how many history events the engines took from their memory rather than asserting them."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    rule_sets = SqlLifecycleStore(sessions, audit_keys=UNKEYED)
    lifecycle = RuleSetLifecycle(
        rule_sets, validate=check_rule_set, clock=lambda: NOW, tokens=PageTokens.development()
    )
    lifecycle.ensure_active(SAMPLE.read_text(encoding="utf-8"))
    store = SqlEvaluationStore(sessions, key_id="k1")
    engines: list[RuleEngine] = []

    def compile_rule_set(rule_set: RuleSet) -> RuleEngine:
        engines.append(RuleEngine(rule_set, remember=remember))
        return engines[-1]

    evaluator = Evaluator(
        rule_sets=rule_sets,
        store=store,
        clock=lambda: NOW,
        dead_letter_after=1,
        compile_rule_set=compile_rule_set,
        window_cache=cache,
    )
    results: list[Any] = []
    for number, step in enumerate(steps):
        if step.retract is not None:
            results.append(evaluator.retract([_notice(step.retract)]))
        else:
            events: list[EngineEvent] = [engine_event(e) for e in step.batch]
            records = {ev.key: e.SerializeToString() for ev, e in zip(events, step.batch, strict=True)}
            results.append(evaluator.evaluate(events, records))
        if number == len(steps) // 2:
            # Redrive whatever is parked so far: the parked events join their subjects late.
            ids = store.parked_ids(None, 1000)
            if ids:
                results.append(evaluator.redrive(ids))
    with engine.connect() as connection:
        stored = [
            *connection.execute(
                sa.select(
                    EmittedOutcome.outcome_id,
                    EmittedOutcome.rule_id,
                    EmittedOutcome.points,
                    EmittedOutcome.outcome,
                    EmittedOutcome.reversed_at.is_(None),
                    EmittedOutcome.reversed_by,
                ).order_by(EmittedOutcome.outcome_id)
            ),
            *connection.execute(
                sa.select(
                    EvaluatedEvent.source, EvaluatedEvent.event_id, EvaluatedEvent.retracted_at
                ).order_by(EvaluatedEvent.source, EvaluatedEvent.event_id)
            ),
            *connection.execute(sa.select(Outbox.id, Outbox.payload, Outbox.outcome_id).order_by(Outbox.id)),
        ]
    evaluator.close()
    engine.dispose()
    return results, [tuple(row) for row in stored], sum(e.recalled for e in engines)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_warm_or_thrashing_cache_fires_exactly_what_the_store_alone_fires(
    database_url: str, database_url_factory: Callable[[str], str], seed: int
) -> None:
    steps = _schedule(seed)
    cold_results, cold_stored, cold_recalled = _run(database_url, None, steps, remember=0)
    warm = WindowCache(max_subjects=100, max_bytes=2**30)
    warm_results, warm_stored, warm_recalled = _run(database_url_factory("warm"), warm, steps)
    tiny = WindowCache(max_subjects=3, max_bytes=60 * 1500)
    tiny_results, tiny_stored, tiny_recalled = _run(database_url_factory("tiny"), tiny, steps, remember=16)

    # The stream exercises what it should: windows, sequences and caps fired and superseded,
    # retractions reversed outcomes, and the cache served most reads.
    superseded = sum(len(getattr(r, "superseded", ())) for r in cold_results)
    reversed_by_retractions = sum(len(getattr(r, "reversed", ())) for r in cold_results)
    assert superseded > 0
    assert reversed_by_retractions > 0
    assert any(isinstance(r, Redrive) for r in cold_results)
    assert warm.stats().hits > warm.stats().misses
    assert tiny.stats().misses > warm.stats().misses
    # The warm engine matched most history from memory; the forgetful one far less often.
    assert cold_recalled == 0
    assert warm_recalled > 10 * tiny_recalled > 0, (warm_recalled, tiny_recalled)
    # Results (firings with every field, superseded ids, failures) and what was stored.
    assert warm_results == cold_results
    assert tiny_results == cold_results
    assert warm_stored == cold_stored
    assert tiny_stored == cold_stored
