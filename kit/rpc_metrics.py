"""Every RPC's count, status and latency as OpenTelemetry's RPC semantic conventions name them:
`rpc.server.duration` (milliseconds) by rpc.system, rpc.service, rpc.method and
rpc.grpc.status_code; requests by method and status are its count.

OpenTelemetry's gRPC instrumentation for Python records spans only (0.66b2, checked), so the
outermost layer of the server's interceptor (kit.server.interceptor_chain) measures the calls.
It sees the final status of every call, whoever ended it: a refused limit, a refused token, a
handler's abort or an unexpected error (INTERNAL, as kit.interceptors reports it). Methods are
only those the server registered; an unknown method never reaches an interceptor's handler, so
the label set is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kit.metrics import histogram, meter

_duration = histogram(
    meter("egret.rpc"), "rpc.server.duration", unit="ms", description="Served RPCs, by method and status"
)


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> int:
    """The status the call ended with: the one set by an abort, else OK when the handler
    returned, CANCELLED when the caller went away, UNKNOWN for anything else."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    if isinstance(code, int):
        return code
    if error is None:
        return int(grpc.StatusCode.OK.value[0])
    if isinstance(error, asyncio.CancelledError):
        return int(grpc.StatusCode.CANCELLED.value[0])
    return int(grpc.StatusCode.UNKNOWN.value[0])


class RpcMetricsInterceptor:
    def __init__(self) -> None:
        self._labels: dict[str, dict[str, str]] = {}

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` measured (a layer of kit.interceptors.OnePass)."""
        labels = self._labels.get(handler_call_details.method)
        if labels is None:
            # Per registered method (an unknown one never gets here), so a bounded map.
            service, _, name = handler_call_details.method.lstrip("/").partition("/")
            labels = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
            self._labels[handler_call_details.method] = labels
        h: Any = handler
        if h.unary_unary is not None:
            return h._replace(unary_unary=_unary(labels, h.unary_unary))  # type: ignore[no-any-return]
        if h.stream_unary is not None:
            return h._replace(stream_unary=_unary(labels, h.stream_unary))  # type: ignore[no-any-return]
        if h.unary_stream is not None:
            return h._replace(unary_stream=_stream(labels, h.unary_stream))  # type: ignore[no-any-return]
        return h._replace(stream_stream=_stream(labels, h.stream_stream))  # type: ignore[no-any-return]


def _record(labels: dict[str, str], started: float, context: Any, error: BaseException | None) -> None:
    _duration.record(
        (time.perf_counter() - started) * 1000,
        {**labels, "rpc.grpc.status_code": _code(context, error)},
    )


def _unary(labels: dict[str, str], inner: Callable[..., Awaitable[Any]]) -> Any:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            response = await inner(request, context)
        except BaseException as error:
            _record(labels, started, context, error)
            # The outermost frame stays in the error's traceback, which grpc-aio keeps on the
            # call's state: holding the request here would keep it in that cycle until a full
            # collection (kit.limits._forget clears the frames inside this one).
            del request, context
            raise
        _record(labels, started, context, None)
        return response

    return behaviour


def _stream(labels: dict[str, str], inner: Callable[..., AsyncIterator[Any]]) -> Any:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            async for response in inner(request, context):
                yield response
        except BaseException as error:
            _record(labels, started, context, error)
            del request, context  # as in _unary
            raise
        _record(labels, started, context, None)

    return behaviour
