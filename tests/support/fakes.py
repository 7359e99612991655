"""A stand-in downstream RulesService that records what it receives and can fail on demand.

Used to test a relay against a real gRPC server on loopback without running rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc

from egret.common.v1 import event_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from egret.rules.v1 import rules_service_pb2_grpc as rules_grpc

# Typed as Any: the fake implements only what ingest calls, and mypy would otherwise
# require every RulesService RPC (the generated servicer's methods are abstract).
_RulesServicer: Any = rules_grpc.RulesServiceServicer


class RecordingRules(_RulesServicer):  # type: ignore[misc]
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.batches: list[rules_pb.EvaluateEventsRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.received = asyncio.Event()

    async def EvaluateEvents(self, request: rules_pb.EvaluateEventsRequest, context: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rules is warming up")
        self.batches.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        self.received.set()
        return rules_pb.EvaluateEventsResponse(evaluated=len(request.events))

    async def GetActiveRuleSet(self, request: rules_pb.GetActiveRuleSetRequest, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of this fake")

    def event_ids(self) -> list[str]:
        return [e.ref.event_id for b in self.batches for e in b.events]

    def events(self) -> list[event_pb2.RecordedEvent]:
        """Every event received, in arrival order."""
        return [e for b in self.batches for e in b.events]


@asynccontextmanager
async def serving(add: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> AsyncIterator[str]:
    """A stand-in servicer on a free loopback port (`add` is the generated add_..._to_server)."""
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@asynccontextmanager
async def serving_rules(servicer: RecordingRules) -> AsyncIterator[str]:
    async with serving(rules_grpc.add_RulesServiceServicer_to_server, servicer) as address:
        yield address


@asynccontextmanager
async def serving_rules_shards(servicers: Sequence[RecordingRules]) -> AsyncIterator[list[str]]:
    """One fake rules server per shard; yields their addresses in shard order."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving_rules(s)) for s in servicers]
