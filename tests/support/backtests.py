"""The backtest service's environment for tests: the sample rule set, policy and history."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from devtools.population import Origin, Population, PopulationConfig
from egret.common.v1 import event_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from kit.db import create_engine
from kit.protoconv import to_timestamp
from services.rules import bootstrap as rules_bootstrap
from services.rules.settings import RulesSettings
from services.rules.stores.schema import Outbox, RulesAuditLog
from services.score import bootstrap as score_bootstrap
from services.score.settings import ScoreSettings
from tests.support.servers import running

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "config" / "rulesets" / "sample.yaml"
POLICY = ROOT / "config" / "policy.yaml"
BATCH = 40


def candidate_source() -> str:
    """Sample rules made stricter: red lights cost far more, and two windows close sooner."""
    source = SAMPLE.read_text(encoding="utf-8")
    changes = [
        ("\nversion: 2\n", "\nversion: 3\n"),
        ("    points: -5\n    category: traffic\n", "    points: -40\n    category: traffic\n"),
        ("    window: {count: 3, within: 30d}\n", "    window: {count: 2, within: 30d}\n"),
        ("    window: {count: 3, within: 90d}\n", "    window: {count: 2, within: 180d}\n"),
    ]
    for old, new in changes:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    return source


def history() -> list[list[event_pb2.RecordedEvent]]:
    """Batches as ingest's relay would deliver them: resends included, late arrivals too."""
    config = PopulationConfig(
        subjects=300,
        seed=7,
        now=datetime.now(UTC) - timedelta(days=1),
        # Recent and clustered, so that entries are still visible and windows complete.
        span_days=150,
        clustering=0.7,
        duplicate_fraction=0.05,
        late_fraction=0.1,
    )
    events = []
    for item in Population(config).generate():
        if item.origin is Origin.INVALID:
            continue
        event = item.event
        events.append(
            event_pb2.RecordedEvent(
                ref=event_pb2.EventRef(source=item.source, event_id=event.event_id),
                event_type=event.event_type,
                subject_key=hashlib.sha256(event.subject.id_value.encode()).hexdigest(),
                subject_kind=event.subject.kind,
                occurred_at=event.occurred_at,
                recorded_at=to_timestamp(datetime.now(UTC)),
                attributes=event.attributes,
            )
        )
    return [events[i : i + BATCH] for i in range(0, len(events), BATCH)]


def environment(name: str, database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "EGRET_DATA_DIR": str(data_dir / name),
        "EGRET_DATABASE_URL": database_url,
        "EGRET_LISTEN_ADDRESS": "127.0.0.1:0",
        "EGRET_LOG_FORMAT": "console",
        "EGRET_LOG_LEVEL": "warning",
        "EGRET_SHUTDOWN_GRACE_SECONDS": "2",
        "EGRET_HEALTH_INTERVAL_SECONDS": "0.2",
        "EGRET_SQLITE_SYNCHRONOUS": "NORMAL",
        "EGRET_INSECURE": "true",
        "EGRET_POLICY_FILE": str(POLICY),
        **extra,
    }


@dataclass
class Live:
    """One rules service relaying to one score service, each on its own database."""

    rules: pb_grpc.RulesServiceAsyncStub
    rules_url: str
    score_url: str
    rules_address: str  # for another client of the same service


@asynccontextmanager
async def live(
    rule_set: str, make_url: Callable[[str], str], data_dir: Path, name: str
) -> AsyncIterator[Live]:
    ruleset_file = data_dir / f"{name}.yaml"
    ruleset_file.write_text(rule_set, encoding="utf-8")
    score_url, rules_url = make_url(f"{name}-score"), make_url(f"{name}-rules")
    async with AsyncExitStack() as stack:
        score_settings = ScoreSettings.from_env(environment(f"{name}-score", score_url, data_dir))
        score_address = await stack.enter_async_context(
            running(score_settings, score_bootstrap.build, score_bootstrap.MIGRATIONS)
        )
        rules_settings = RulesSettings.from_env(
            environment(
                f"{name}-rules",
                rules_url,
                data_dir,
                EGRET_RULESET_FILE=str(ruleset_file),
                EGRET_SCORE_ADDRESS=score_address,
                EGRET_RELAY_POLL_SECONDS="0.05",
                EGRET_CATALOGUE_FILE=str(ROOT / "config" / "catalogue.yaml"),
            )
        )
        rules_address = await stack.enter_async_context(
            running(rules_settings, rules_bootstrap.build, rules_bootstrap.MIGRATIONS)
        )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(rules_address))
        yield Live(pb_grpc.RulesServiceStub(channel), rules_url, score_url, rules_address)


async def evaluate(service: Live, batches: Sequence[Sequence[event_pb2.RecordedEvent]]) -> None:
    """Evaluate the batches in order and wait until score has applied every outcome."""
    for batch in batches:
        await service.rules.EvaluateEvents(pb.EvaluateEventsRequest(events=batch))
    engine = create_engine(service.rules_url)
    try:
        for _ in range(400):
            with engine.connect() as connection:
                if connection.execute(sa.select(sa.func.count()).select_from(Outbox)).scalar_one() == 0:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("the rules outbox did not drain")
    finally:
        engine.dispose()


def read_records(url: str) -> list[tuple[str, str | None, str, str, dict[str, Any]]]:
    """The read records of rules' audit log, in order."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            t = RulesAuditLog
            rows = connection.execute(
                sa.select(t.action, t.subject_key, t.purpose, t.target, t.detail)
                .where(t.action.startswith("read:"))
                .order_by(t.seq)
            ).all()
    finally:
        engine.dispose()
    return [
        (action, key, purpose, target, json.loads(detail)) for action, key, purpose, target, detail in rows
    ]
