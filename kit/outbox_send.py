"""The sender an outbox relay delivers with: a claim's rows, each one serialized request of
the downstream RPC holding one item, go out as one request in one call with a deadline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kit.outbox import MakeSend, Send

RequestT = TypeVar("RequestT", bound=Message)


def merged(request_type: type[RequestT], payloads: Sequence[bytes]) -> RequestT:
    """One request from serialized requests, each repeated field keeping the payloads' order.

    A payload that does not parse raises google.protobuf.message.DecodeError.
    """
    request = request_type()
    for payload in payloads:
        request.MergeFromString(payload)
    return request


def merged_sender(
    request_type: type[RequestT],
    *,
    fields: Sequence[str],
    method: Callable[[grpc.aio.Channel], grpc.aio.UnaryUnaryMultiCallable[RequestT, Any]],
) -> MakeSend:
    """The `make_send` of kit.outbox.relay_to_peer for one RPC.

    `fields` are the request's fields, all repeated: protobuf merging appends repeated
    fields, so the merged request holds every row's items in row order; any other field
    would keep only the last row's value, so such a request type is refused here.
    `method(channel)` is the stub's method, e.g. `lambda c: ServiceStub(c).Method`.

    Nothing is caught: a payload that does not parse (DecodeError, before any call) and a
    failed call (grpc.aio.AioRpcError, the deadline's included) reach the relay, which
    counts and logs the failure and sends the rows again after a backoff.
    """
    _check_all_repeated(request_type, fields)

    def make_send(channel: grpc.aio.Channel, deadline_s: float) -> Send:
        call = method(channel)

        async def send(payloads: Sequence[bytes]) -> None:
            await call(merged(request_type, payloads), timeout=deadline_s)

        return send

    return make_send


def _check_all_repeated(request_type: type[Message], fields: Sequence[str]) -> None:
    descriptor = request_type.DESCRIPTOR
    declared = {f.name for f in descriptor.fields}
    problems = [f"{name}: no such field" for name in fields if name not in declared]
    problems += [
        f"{f.name}: not repeated, so merging would keep only the last row's value"
        for f in descriptor.fields
        if f.name in fields and not f.is_repeated
    ]
    problems += [f"{name}: not named in fields" for name in sorted(declared - set(fields))]
    if problems:
        raise ValueError(f"{descriptor.full_name} cannot be merged from outbox rows: {'; '.join(problems)}")
