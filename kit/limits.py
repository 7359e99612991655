"""What one service process may hold at once: request sizes per RPC, concurrent calls and
open streams, so a flood of large requests is refused instead of growing the process past
its pod's memory limit (docs/security.md, "Limits"; the arithmetic is in docs/deploy.md,
"Memory").

- gRPC itself refuses a request larger than the largest limit of the service's RPCs before
  Python sees it (`grpc.max_receive_message_length`), and more than
  `max_concurrent_rpcs` calls in flight (RESOURCE_EXHAUSTED, before reading the request).
- `LimitInterceptor` refuses, with RESOURCE_EXHAUSTED and before decoding, a request larger
  than its own RPC's limit and a batch beyond `max_concurrent_batches` decoded at once
  (batches decode to about ten times their size), and a request stream beyond
  `max_concurrent_streams` open ones, so long-lived streams never take every call slot.
- It also lets go of an aborted call's request when the call ends (`_forget`), instead of
  leaving it to the cycle collector.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from kit.interceptors import CHANNEL_OPTIONS
from kit.logging import get_logger
from kit.settings import LimitSettings

log = get_logger(__name__)

KiB = 1024
MiB = 1024 * KiB

# A call whose request was at least this large trims the heap when it ends (_Trimmer).
TRIM_AFTER_BYTES = 256 * KiB
# Every RPC that is not a batch or a document asks for a few ids and fields.
SMALL_REQUEST_BYTES = 1 * MiB
# Rule-set and policy sources: at most 1 MiB of YAML (services/rules/lifecycle.py) plus framing.
DOCUMENT_REQUEST_BYTES = 2 * MiB
DOCUMENT_METHODS = frozenset(
    {
        "/egret.rules.v1.RulesService/ValidateRuleSet",
        "/egret.rules.v1.RulesService/CreateDraft",
        "/egret.score.v1.ScoreService/PreviewPolicy",
        "/egret.score.v1.ScoreService/ActivatePolicy",
    }
)
# Batches, limited by LimitSettings.max_message_bytes (each message of a stream).
BATCH_METHODS = frozenset(
    {
        "/egret.ingest.v1.IngestService/SubmitEvents",
        "/egret.ingest.v1.IngestService/StreamEvents",
        "/egret.rules.v1.RulesService/EvaluateEvents",
        "/egret.score.v1.ScoreService/ApplyOutcomes",
    }
)


def request_limit(method: str, limits: LimitSettings) -> int:
    """The largest request message `method` accepts, in bytes."""
    if method in BATCH_METHODS:
        return limits.max_message_bytes
    if method in DOCUMENT_METHODS:
        return DOCUMENT_REQUEST_BYTES
    return SMALL_REQUEST_BYTES


def service_limit(service_names: Iterable[str], limits: LimitSettings) -> int:
    """The largest request any RPC of these gRPC services accepts: gRPC's own receive limit."""
    prefixes = tuple(f"/{name}/" for name in service_names)
    return max(
        [SMALL_REQUEST_BYTES]
        + [request_limit(m, limits) for m in BATCH_METHODS | DOCUMENT_METHODS if m.startswith(prefixes)]
    )


def server_options(service_names: Iterable[str], limits: LimitSettings) -> list[tuple[str, Any]]:
    """The channel options of a service's grpc.aio.server: the shared ones (keepalive, the
    send limit) with the receive limit of this service's largest request."""
    receive = service_limit(service_names, limits)
    return [
        *(option for option in CHANNEL_OPTIONS if option[0] != "grpc.max_receive_message_length"),
        ("grpc.max_receive_message_length", receive),
        # Without BDP probing a stream's receive window stays at 64 KiB until the call is
        # accepted and reads, so calls refused for concurrency never had their whole message
        # buffered (a flood of 4 MiB calls peaked 486 MiB with probing, 320 MiB without).
        ("grpc.http2.bdp_probe", 0),
    ]


class _Refused:
    """Stands in for a request that was not decoded: too large, or no batch slot free."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _Oversized(_Refused):
    __slots__ = ()


class _Busy(_Refused):
    __slots__ = ()


def _malloc_trim() -> _Done | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    return None if trim is None else lambda: trim(0)


class _Trimmer:
    """Hands freed heap back to the system after a large call or the last batch ends (at
    most every two seconds; a trim takes milliseconds): glibc otherwise keeps the pages a
    flood of large requests touched, and RSS stays at the flood's peak (docs/deploy.md,
    "Memory")."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self._trim = _malloc_trim()
        self._interval_s = interval_s
        self._last = 0.0
        self._pending = False

    def __call__(self) -> None:
        if self._trim is None or self._pending:
            return
        wait = self._last + self._interval_s - time.monotonic()
        if wait <= 0:
            self._run()
            return
        # Too soon after the last one: trim once the interval is over, so the heap freed by
        # the last calls of a flood is returned too.
        self._pending = True
        asyncio.get_running_loop().call_later(wait, self._run)

    def _run(self) -> None:
        self._pending = False
        self._last = time.monotonic()
        if self._trim is not None:
            self._trim()


class _Raw:
    """A batch received on a stream, decoded only once it holds a batch slot."""

    __slots__ = ("data", "decode")

    def __init__(self, data: bytes, decode: Callable[[bytes], Any] | None) -> None:
        self.data = data
        self.decode = decode


class _Slots:
    """A count of calls (or stream messages) holding a decoded batch: a unary call takes one
    in its deserializer, before decoding, or is refused; a stream message waits for one.
    Given back when the handler ends or asks for the stream's next message."""

    def __init__(self, size: int, idle: Callable[[], None] = lambda: None) -> None:
        self.size = size
        self.taken = 0
        self._idle = idle
        self._freed = asyncio.Event()

    async def wait_take(self) -> None:
        while not self.take():
            self._freed.clear()
            await self._freed.wait()

    def take(self) -> bool:
        if self.taken >= self.size:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1
        self._freed.set()
        if self.taken == 0:
            self._idle()


async def _refuse(
    method: str, limit: int, refused: _Refused, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    if isinstance(refused, _Busy):
        log.info("rpc rejected: every batch slot is taken", method=method, size=refused.size)
        message = f"{method}: this server is handling as many batches as it holds at once; retry later"
    else:
        log.info("rpc rejected: request too large", method=method, size=refused.size, limit=limit)
        message = f"request message of {refused.size} bytes exceeds the limit of {limit} bytes for {method}"
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


_Done = Callable[[], object]


def _forget(aborted: grpc.aio.AbortError) -> None:
    """Break the reference cycle through which an aborted call would keep its request.

    grpc-aio keeps the AbortError on the call's state, and the error's traceback holds the
    frames of the handlers it unwound, whose locals hold the servicer context (which holds
    that state), the request and whatever the handler derived from it; the exception it was
    raised while handling (`__context__`, a refused call's domain error) holds more such
    frames. That cycle is freed only by a full collection of the cycle collector, which runs
    after a number of objects, not of bytes: a flood of refused 1 MiB calls kept hundreds
    of them (docs/deploy.md, "Memory"). grpc's own synchronous server stopped storing the
    exception for this reason (grpc/grpc#17899).

    The frames below the outermost handler are all finished (the error propagated out of
    each of them, once: grpc raises a new AbortError per call), so clearing their locals is
    safe; the frames of chained exceptions are not cleared, as those exceptions may be shared
    with live coroutines (a failed group commit is raised in every call that waited for it),
    only detached from the AbortError."""
    if aborted.__traceback__ is not None:
        # Its first entry is the frame of the outermost handler, still executing.
        traceback.clear_frames(aborted.__traceback__.tb_next)
    aborted.__context__ = None
    aborted.__cause__ = None


class LimitInterceptor:
    """Per-RPC request size (checked on the raw bytes, before decoding), the bound on unary
    batch calls holding a decoded request and the bound on open request streams.

    It must wrap every interceptor that can refuse a call (kit.server.interceptor_chain puts
    only the RPC metrics outside it): a batch slot is taken when the request is decoded and
    given back when this interceptor's handler ends, which then covers every refusal of the
    interceptors inside it (authentication, authorization, rate limits). gRPC runs the
    handler right after decoding the request, with no suspension point between them."""

    def __init__(self, limits: LimitSettings) -> None:
        self._limits = limits
        self._trim = _Trimmer()
        self.batches = _Slots(limits.max_concurrent_batches, self._trim)
        self.streams = _Slots(limits.max_concurrent_streams, self._trim)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` limited (a layer of kit.interceptors.OnePass)."""
        method: str = handler_call_details.method
        limit = request_limit(method, self._limits)
        h: Any = handler
        if h.request_streaming:
            deserialize = h.request_deserializer
            if method in BATCH_METHODS:
                # Decoded in the stream's handler once a batch slot is free (_requests).
                def deserialize(data: bytes, decode: Any = h.request_deserializer) -> Any:
                    return _Raw(data, decode)

            checked = h._replace(request_deserializer=self._deserializer(deserialize, limit, None))
            if h.stream_unary is not None:
                return checked._replace(stream_unary=self._stream_unary(method, limit, h.stream_unary))  # type: ignore[no-any-return]
            return checked._replace(stream_stream=self._stream_stream(method, limit, h.stream_stream))  # type: ignore[no-any-return]
        # One slot per call, taken by its deserializer and given back by its handler.
        slots = self.batches if method in BATCH_METHODS else None
        # What to do when this call's handler ends: give back its batch slot, trim the heap.
        held: list[_Done] = []
        checked = h._replace(
            request_deserializer=self._deserializer(h.request_deserializer, limit, slots, held)
        )
        if h.unary_unary is not None:
            return checked._replace(unary_unary=self._unary(method, limit, h.unary_unary, held))  # type: ignore[no-any-return]
        return checked._replace(unary_stream=self._unary_in(method, limit, h.unary_stream, held))  # type: ignore[no-any-return]

    def _deserializer(
        self,
        deserializer: Callable[[bytes], Any] | None,
        limit: int,
        slots: _Slots | None,
        held: list[_Done] | None = None,
    ) -> Callable[[bytes], Any]:
        def deserialize(data: bytes) -> Any:
            if held is not None and len(data) >= TRIM_AFTER_BYTES:
                held.append(self._trim)
            if len(data) > limit:
                return _Oversized(len(data))
            if slots is not None and held is not None:
                if not slots.take():
                    return _Busy(len(data))
                held.append(slots.give)
            return deserializer(data) if deserializer is not None else data

        return deserialize

    def _unary(self, method: str, limit: int, inner: Callable[..., Awaitable[Any]], held: list[_Done]) -> Any:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if isinstance(request, _Refused):
                    await _refuse(method, limit, request, context)
                return await inner(request, context)
            except grpc.aio.AbortError as aborted:
                # This frame stays in the error's traceback: without these, the call's
                # state would still be in a cycle (small), and the request in it.
                del request, context
                _forget(aborted)
                raise
            finally:
                for done in held:
                    done()
                held.clear()

        return behaviour

    def _unary_in(
        self,
        method: str,
        limit: int,
        inner: Callable[..., AsyncIterator[Any]],
        held: list[_Done],
    ) -> Any:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                if isinstance(request, _Refused):
                    await _refuse(method, limit, request, context)
                async for response in inner(request, context):
                    yield response
            except grpc.aio.AbortError as aborted:
                del request, context
                _forget(aborted)
                raise
            finally:
                for done in held:
                    done()
                held.clear()

        return behaviour

    async def _open_stream(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self.streams.take():
            log.info("rpc rejected: too many open streams", method=method, open=self.streams.taken)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.streams.taken} request streams are open, the most this server keeps; retry later",
            )

    def _requests(
        self,
        method: str,
        limit: int,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[Any, None]:
        async def checked() -> AsyncGenerator[Any, None]:
            async for request in requests:
                if isinstance(request, _Refused):
                    await _refuse(method, limit, request, context)
                if not isinstance(request, _Raw):
                    yield request
                    continue
                await self.batches.wait_take()
                try:
                    yield request.decode(request.data) if request.decode is not None else request.data
                finally:
                    # The handler asks for the next message once it is done with this one.
                    self.batches.give()

        return checked()

    def _stream_unary(self, method: str, limit: int, inner: Callable[..., Awaitable[Any]]) -> Any:
        async def behaviour(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._open_stream(method, context)
            checked = self._requests(method, limit, requests, context)
            try:
                return await inner(checked, context)
            except grpc.aio.AbortError as aborted:
                _forget(aborted)
                raise
            finally:
                # A handler that stops reading (it failed, or aborted on a bad message) leaves
                # the generator suspended while it holds a batch slot: close it to give it back.
                try:
                    await checked.aclose()
                finally:
                    self.streams.give()

        return behaviour

    def _stream_stream(self, method: str, limit: int, inner: Callable[..., AsyncIterator[Any]]) -> Any:
        async def behaviour(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self._open_stream(method, context)
            checked = self._requests(method, limit, requests, context)
            try:
                async for response in inner(checked, context):
                    yield response
            except grpc.aio.AbortError as aborted:
                _forget(aborted)
                raise
            finally:
                try:
                    await checked.aclose()
                finally:
                    # Given back even if closing is interrupted (a second cancellation).
                    self.streams.give()

        return behaviour


__all__ = [
    "BATCH_METHODS",
    "DOCUMENT_METHODS",
    "LimitInterceptor",
    "request_limit",
    "server_options",
    "service_limit",
]
