"""Wiring of the rules service: settings → rule set → store → domain → servicer → runtime."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc

from egret.common.v1 import outcome_pb2
from egret.rules.v1 import rules_service_pb2 as pb
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.app import run_cli
from kit.db import create_engine, make_session_factory
from kit.outbox import Send, relay_to_peer
from kit.server import Service
from services.rules.domain import ActiveRuleSet, Evaluator
from services.rules.ruleset import load_rule_set
from services.rules.servicer import RulesServicer, register
from services.rules.settings import RulesSettings
from services.rules.storage import Outbox, SqlEvaluationStore

MIGRATIONS = Path(__file__).parent / "migrations"


def send_to_score(channel: grpc.aio.Channel, deadline_s: float) -> Send:
    score = score_grpc.ScoreServiceStub(channel)

    async def send(payloads: Sequence[bytes]) -> None:
        outcomes = [outcome_pb2.Outcome.FromString(p) for p in payloads]
        await score.ApplyOutcomes(score_pb.ApplyOutcomesRequest(outcomes=outcomes), timeout=deadline_s)

    return send


def build(settings: RulesSettings) -> Service:
    engine = create_engine(
        settings.common.database_url, sqlite_synchronous=settings.common.sqlite_synchronous
    )
    sessions = make_session_factory(engine)
    evaluator = Evaluator(
        active=ActiveRuleSet(load_rule_set(settings.ruleset_file), activated_at=datetime.now(UTC)),
        store=SqlEvaluationStore(sessions),
        clock=lambda: datetime.now(UTC),
    )
    relay = relay_to_peer(
        name="rules→score",
        sessions=sessions,
        table=Outbox,
        peer=settings.score,
        settings=settings.relay,
        make_send=send_to_score,
    )
    # One thread: durable-rules is not thread-safe and holds the GIL while it works.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rules-engine")
    servicer = RulesServicer(
        evaluator, executor, committed=relay.notify, max_batch_size=settings.max_batch_size
    )

    return Service(
        name="rules",
        service_names=[pb.DESCRIPTOR.services_by_name["RulesService"].full_name],
        register=register(servicer),
        engines=[engine],
        background=[relay.run],
        executors=[executor],
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        name="rules", load_settings=RulesSettings.from_env, build=build, migrations_dir=MIGRATIONS, argv=argv
    )
