"""Kill -9 while a relay holds a claimed batch: after the restart the batch goes out first,
at once, and every subject's messages reach the next service in stored order.

Ingest (and, separately, rules) runs as a real process whose downstream is a stand-in in
this test that holds the first call open, so the relay's claim is in flight when the
process is killed. The call deadline is 300 s, so the claim's lease is 600 s: a restarted
relay that waited for it would time this test out. The restarted relay must take its own
claim over at once and resend it before any later row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from devtools.cluster import Cluster
from egret.common.v1 import event_pb2, subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.db import create_engine
from kit.packing import unpack
from kit.protoconv import to_attribute_value, to_timestamp
from services.rules.stores.outbox import outcome_request
from tests.support.events import event, resident_id
from tests.support.fakes import serving
from tests.support.waiting import until

pytestmark = pytest.mark.e2e

DEADLINE_S = 300.0  # the relay's lease is twice this
RESTART_BOUND_S = 30.0  # far below the lease: the drain must not wait for it
SUBJECTS = 6
ROUNDS = 12  # each request holds one event of every subject
SETTINGS = {"EGRET_RELAY_BATCH_SIZE": "20", "EGRET_RELAY_POLL_SECONDS": "0.05"}
WHEN = datetime(2026, 6, 1, tzinfo=UTC)

# A stored row or a delivered message: (subject key, what identifies it).
Item = tuple[str, str]


class HoldsFirstCall:
    """The downstream's half that matters here: the first call is held open until its caller
    goes away (the claim stays in flight); every later call is answered and what it carried
    is kept, in arrival order."""

    def __init__(self) -> None:
        self.calls = 0
        self.holding = asyncio.Event()
        self.received: list[Item] = []

    async def take(self, items: list[Item]) -> None:
        self.calls += 1
        if self.calls == 1:
            self.holding.set()
            await asyncio.Event().wait()  # cancelled when the caller dies
        self.received.extend(items)


# Typed as Any: each stand-in implements only the RPC the relay calls.
_Rules: Any = rules_grpc.RulesServiceServicer
_Score: Any = score_grpc.ScoreServiceServicer


class HeldRules(_Rules):  # type: ignore[misc]
    def __init__(self, downstream: HoldsFirstCall) -> None:
        self.downstream = downstream

    async def EvaluateEvents(self, request: rules_pb.EvaluateEventsRequest, context: Any) -> Any:
        await self.downstream.take([(e.subject_key, e.ref.event_id) for e in request.events])
        return rules_pb.EvaluateEventsResponse(evaluated=len(request.events))


class HeldScore(_Score):  # type: ignore[misc]
    def __init__(self, downstream: HoldsFirstCall) -> None:
        self.downstream = downstream

    async def ApplyOutcomes(self, request: score_pb.ApplyOutcomesRequest, context: Any) -> Any:
        await self.downstream.take([(o.subject_key, o.outcome_id) for o in request.outcomes])
        return score_pb.ApplyOutcomesResponse()


@asynccontextmanager
async def one_service(
    tmp_path: Path, database_urls: dict[str, str], name: str, env: dict[str, str]
) -> AsyncIterator[Cluster]:
    cluster = Cluster(
        tmp_path / "cluster", secure=False, database_urls=database_urls, service_env={name: env}
    )
    try:
        await asyncio.to_thread(cluster.start, name)
        yield cluster
    finally:
        cluster.close()


def stored_rows(cluster: Cluster, service: str, decode: Callable[[bytes], Item]) -> list[tuple[Item, bool]]:
    """The outbox of `service` in id order: each row's item, as its relay sends it, and
    whether it is claimed: at most the lease's last claimed id, while the lease is held (one
    slice here; a rules row of an outcome refers to the outcome's stored bytes)."""
    claimed = (
        f"o.id <= COALESCE((SELECT MAX(claimed_through) FROM {service}_outbox_leases"
        " WHERE holder IS NOT NULL), 0)"
    )
    stored = "r.outcome" if service == "rules" else "NULL"
    joined = " LEFT JOIN rules_outcomes r ON r.outcome_id = o.outcome_id" if service == "rules" else ""
    engine = create_engine(cluster.database_url(service), read_only=True)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    f"SELECT o.payload, {claimed}, {stored} FROM {service}_outbox o{joined} ORDER BY o.id"
                )
            ).all()
    finally:
        engine.dispose()
    return [
        (
            decode(bytes(payload) if outcome is None else outcome_request(unpack(bytes(outcome)))),
            bool(is_claimed),
        )
        for payload, is_claimed, outcome in rows
    ]


def by_subject(items: list[Item]) -> dict[str, list[str]]:
    """Each subject's messages in first-arrival order (a resent message counts once)."""
    seen: set[Item] = set()
    ordered: dict[str, list[str]] = {}
    for item in items:
        if item not in seen:
            seen.add(item)
            ordered.setdefault(item[0], []).append(item[1])
    return ordered


async def kill_with_claim_in_flight_and_restart(
    cluster: Cluster, service: str, downstream: HoldsFirstCall, decode: Callable[[bytes], Item]
) -> None:
    """The stored rows must be complete and the first call held; then kill -9, restart, and
    check the drain: immediate, claimed batch first, each subject in stored order."""
    await until(downstream.holding.is_set, what="the relay's first call", within_s=60, every_s=0.05)
    stored = await asyncio.to_thread(stored_rows, cluster, service, decode)
    claimed = [item for item, is_claimed in stored if is_claimed]
    assert claimed, "the relay holds a claim"
    assert claimed == [item for item, _ in stored[: len(claimed)]], "a claim is a prefix in id order"
    assert len(stored) > len(claimed), "rows wait behind the claim"

    cluster.kill(service)
    restarted = time.monotonic()
    await asyncio.to_thread(cluster.start, service)
    expected = {item for item, _ in stored}
    await until(
        lambda: expected <= set(downstream.received),
        what="every row delivered",
        within_s=RESTART_BOUND_S,
        every_s=0.05,
    )
    assert time.monotonic() - restarted < RESTART_BOUND_S < 2 * DEADLINE_S

    assert set(downstream.received) == expected
    assert downstream.received[: len(claimed)] == claimed, "the claim in flight goes out first"
    assert by_subject(downstream.received) == by_subject([item for item, _ in stored])
    assert len(by_subject(downstream.received)) == SUBJECTS


def ingest_event(payload: bytes) -> Item:
    (recorded,) = rules_pb.EvaluateEventsRequest.FromString(payload).events
    return recorded.subject_key, recorded.ref.event_id


def outcome(payload: bytes) -> Item:
    (applied,) = score_pb.ApplyOutcomesRequest.FromString(payload).outcomes
    return applied.subject_key, applied.outcome_id


async def submit_to_ingest(channel: grpc.aio.Channel) -> None:
    stub = ingest_grpc.IngestServiceStub(channel)
    for r in range(ROUNDS):
        events = [
            event(
                f"r{r}-s{s}",
                "library.book_returned_late",
                resident_id(s),
                {"days_late": 31 + r},
                occurred_at=WHEN + timedelta(days=r),
            )
            for s in range(SUBJECTS)
        ]
        request = ingest_pb.SubmitEventsRequest(source="library", events=events)
        response = await stub.SubmitEvents(request, timeout=30)
        assert response.counts.accepted == SUBJECTS


async def submit_to_rules(channel: grpc.aio.Channel) -> None:
    stub = rules_grpc.RulesServiceStub(channel)
    for r in range(ROUNDS):
        events = [recorded(f"r{r}-s{s}", f"{s:064x}", day=r) for s in range(SUBJECTS)]
        await stub.EvaluateEvents(rules_pb.EvaluateEventsRequest(events=events), timeout=30)


@dataclass(frozen=True)
class Hop:
    """A service whose relay is tested, and the stand-in for the service it sends to."""

    service: str
    downstream: str  # the EGRET_<DOWNSTREAM>_* settings that point the relay at the stand-in
    add: Callable[[Any, grpc.aio.Server], None]
    stand_in: Callable[[HoldsFirstCall], Any]
    submit: Callable[[grpc.aio.Channel], Awaitable[None]]
    decode: Callable[[bytes], Item]


HOPS = [
    Hop(
        "ingest",
        "RULES",
        rules_grpc.add_RulesServiceServicer_to_server,
        HeldRules,
        submit_to_ingest,
        ingest_event,
    ),
    Hop("rules", "SCORE", score_grpc.add_ScoreServiceServicer_to_server, HeldScore, submit_to_rules, outcome),
]


@pytest.mark.parametrize("hop", HOPS, ids=[hop.service for hop in HOPS])
async def test_a_service_killed_with_a_claim_in_flight_resends_it_first_at_once_and_keeps_order(
    tmp_path: Path, database_urls: dict[str, str], hop: Hop
) -> None:
    downstream = HoldsFirstCall()
    async with serving(hop.add, hop.stand_in(downstream)) as address:
        env = SETTINGS | {
            f"EGRET_{hop.downstream}_ADDRESS": address,
            f"EGRET_{hop.downstream}_DEADLINE_SECONDS": str(DEADLINE_S),
        }
        async with one_service(tmp_path, database_urls, hop.service, env) as cluster:
            async with cluster.channel(hop.service) as channel:
                await hop.submit(channel)
            await kill_with_claim_in_flight_and_restart(cluster, hop.service, downstream, hop.decode)


def recorded(event_id: str, subject_key: str, day: int) -> event_pb2.RecordedEvent:
    """A stored late return, as ingest would send it: each gives one outcome."""
    when = to_timestamp(WHEN + timedelta(days=day))
    return event_pb2.RecordedEvent(
        ref=event_pb2.EventRef(source="library", event_id=event_id),
        event_type="library.book_returned_late",
        subject_key=subject_key,
        subject_kind=subject_pb2.SUBJECT_KIND_PERSON,
        occurred_at=when,
        recorded_at=when,
        attributes={"days_late": to_attribute_value(40)},
        subject_key_id="k1",
    )
