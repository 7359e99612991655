"""kit.outbox_send: a claim's rows go out as one merged request, with the relay's deadline."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import DecodeError

from egret.common.v1 import due_process_pb2, event_pb2
from egret.rules.v1 import rules_service_pb2 as rules_pb
from kit.outbox import Send
from kit.outbox_send import merged_sender


class RecordingCall:
    """Stands in for a stub's unary method: records each request and its timeout."""

    def __init__(self) -> None:
        self.calls: list[tuple[rules_pb.EvaluateEventsRequest, float | None]] = []

    # The stub's keyword, not an asyncio timeout of this coroutine.
    async def __call__(
        self,
        request: rules_pb.EvaluateEventsRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        self.calls.append((request, timeout))


def deliver(send: Send, rows: list[bytes]) -> None:
    async def go() -> None:
        await send(rows)

    asyncio.run(go())


def sender_with(call: RecordingCall, deadline_s: float = 2.5) -> Send:
    channel = cast(grpc.aio.Channel, object())
    seen: list[object] = []

    def method(ch: grpc.aio.Channel) -> Any:
        seen.append(ch)
        return call

    make_send = merged_sender(rules_pb.EvaluateEventsRequest, fields=("events", "retractions"), method=method)
    send = make_send(channel, deadline_s)
    assert seen == [channel]  # the stub is built on the relay's channel, once
    return send


def event_row(event_id: str) -> bytes:
    event = event_pb2.RecordedEvent(ref=event_pb2.EventRef(event_id=event_id))
    return rules_pb.EvaluateEventsRequest(events=[event]).SerializeToString()


def retraction_row(event_id: str) -> bytes:
    retraction = due_process_pb2.Retraction(ref=event_pb2.EventRef(event_id=event_id))
    return rules_pb.EvaluateEventsRequest(retractions=[retraction]).SerializeToString()


def test_rows_are_merged_into_one_call_in_row_order_with_the_deadline() -> None:
    call = RecordingCall()
    send = sender_with(call, deadline_s=2.5)
    rows = [event_row("e1"), event_row("e2"), retraction_row("e1"), event_row("e3"), retraction_row("e3")]

    deliver(send, rows)

    assert len(call.calls) == 1
    request, timeout = call.calls[0]
    assert [e.ref.event_id for e in request.events] == ["e1", "e2", "e3"]
    assert [r.ref.event_id for r in request.retractions] == ["e1", "e3"]
    assert timeout == 2.5


def test_a_row_that_does_not_parse_raises_before_anything_is_sent() -> None:
    # The relay counts the failure, logs it and retries the rows after a backoff.
    call = RecordingCall()
    send = sender_with(call)

    with pytest.raises(DecodeError):
        deliver(send, [event_row("e1"), b"\xff\xff\xff"])
    assert call.calls == []


def test_a_failed_call_reaches_the_relay() -> None:
    async def failing(request: rules_pb.EvaluateEventsRequest, **_: object) -> None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    request_type, fields = rules_pb.EvaluateEventsRequest, ("events", "retractions")
    make_send = merged_sender(request_type, fields=fields, method=lambda _: cast(Any, failing))
    send = make_send(cast(grpc.aio.Channel, object()), 1.0)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        deliver(send, [event_row("e1")])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("request_type", "fields", "problem"),
    [
        # Scalars would keep only the last row's value.
        (rules_pb.EvaluateEventsResponse, ("evaluated",), "evaluated: not repeated"),
        (rules_pb.EvaluateEventsRequest, ("events",), "retractions: not named in fields"),
        (rules_pb.EvaluateEventsRequest, ("events", "retractions", "outcomes"), "outcomes: no such field"),
    ],
)
def test_a_request_that_merging_would_not_keep_whole_is_refused(
    request_type: Any, fields: tuple[str, ...], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        merged_sender(request_type, fields=fields, method=lambda channel: cast(Any, None))
