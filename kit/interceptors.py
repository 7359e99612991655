"""The gRPC interceptor chain every service runs, and the error → status mapping.

The server interceptor continues the caller's trace (W3C trace context in metadata),
opens one SERVER span per call, maps domain errors to gRPC statuses with rich details
(google.rpc.BadRequest field violations, ErrorInfo), and turns any unexpected
exception into INTERNAL with the cause logged, so a service never crashes on input.
The client interceptor injects the current trace context into every outgoing call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.exc import OperationalError

from kit.auth import Gate
from kit.channels import RenewingChannel
from kit.decoding import Undecodable, tolerant
from kit.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from kit.logging import get_logger
from kit.principal import Principal, bind_principal
from kit.tracing import context_from_metadata, metadata_with_context

log = get_logger(__name__)

_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(error: DomainError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and google.rpc.Status (with details) for a domain error."""
    code = next((c for kind, c in _CODES.items() if isinstance(error, kind)), grpc.StatusCode.UNKNOWN)
    details = []
    if isinstance(error, InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description, reason=v.reason
                )
                for v in error.violations
            ]
        )
        details.append(bad_request)
    if isinstance(error, AlreadyExists):
        details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    if isinstance(error, FailedPrecondition) and error.reason:
        details.append(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
        )
    if isinstance(error, ResourceExhausted):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(retry)
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return code, status_pb2.Status(code=code.value[0], message=error.message, details=packed)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: DomainError) -> None:
    code, status = status_of(error)
    await context.abort(
        code, status.message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


class ServerInterceptor:
    """Tracing, admission (authentication, authorization, limits), error mapping and
    failure logging around every handler. The gate runs before the handler, so a
    refused call never reaches service code."""

    def __init__(self, gate: Gate | None = None) -> None:
        self._tracer = trace.get_tracer("egret.grpc")
        self._gate = gate

    def _admit(
        self,
        method: str,
        metadata: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Any,
        streaming: bool,
    ) -> Any:
        """The request once the call is admitted; for a request stream, its messages, each
        re-admitted (`_readmitted`)."""
        if self._gate is None:
            return _decoded(request, streaming)
        carrier = dict(metadata or ())
        principal = self._gate.admit(method, carrier, context.time_remaining())
        bind_principal(principal)
        if principal is not None:
            trace.get_current_span().set_attributes(
                {"enduser.id": principal.loggable_id, "enduser.role": principal.role.value}
            )
        if streaming and principal is not None:
            request = _readmitted(request, self._gate, method, principal)
        return _decoded(request, streaming)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` traced, admitted and its errors mapped (a layer of OnePass)."""
        method: str = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        h: Any = handler
        # grpc-aio answers UNKNOWN when a deserializer or serializer raises, outside any
        # handler (and before authentication): requests are decoded by a deserializer that
        # never raises, and responses are serialized inside the wrappers below.
        serialize = h.response_serializer or _as_is
        h = h._replace(
            request_deserializer=tolerant(h.request_deserializer, method), response_serializer=None
        )
        if h.unary_unary is not None:
            wrapped = h._replace(
                unary_unary=self._wrap_unary(method, metadata, h.unary_unary, serialize, False)
            )
        elif h.unary_stream is not None:
            wrapped = h._replace(
                unary_stream=self._wrap_stream(method, metadata, h.unary_stream, serialize, False)
            )
        elif h.stream_unary is not None:
            wrapped = h._replace(
                stream_unary=self._wrap_unary(method, metadata, h.stream_unary, serialize, True)
            )
        else:
            wrapped = h._replace(
                stream_stream=self._wrap_stream(method, metadata, h.stream_stream, serialize, True)
            )
        return cast("grpc.RpcMethodHandler[Any, Any]", wrapped)

    def _span(self, method: str, metadata: Any) -> Any:
        service, _, name = method.lstrip("/").partition("/")
        return self._tracer.start_as_current_span(
            method.lstrip("/"),
            context=context_from_metadata(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    def _wrap_unary(
        self,
        method: str,
        metadata: Any,
        inner: Callable[..., Awaitable[Any]],
        serialize: Callable[[Any], bytes],
        streaming_request: bool,
    ) -> Any:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with self._span(method, metadata) as span:
                try:
                    request = self._admit(method, metadata, context, request, streaming_request)
                    return serialize(await inner(request, context))
                except Exception as exc:
                    await _fail(span, method, context, exc)
                    raise  # unreachable: _fail aborts

        return behaviour

    def _wrap_stream(
        self,
        method: str,
        metadata: Any,
        inner: Callable[..., AsyncIterator[Any]],
        serialize: Callable[[Any], bytes],
        streaming_request: bool,
    ) -> Any:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            with self._span(method, metadata) as span:
                try:
                    request = self._admit(method, metadata, context, request, streaming_request)
                    async for response in inner(request, context):
                        yield serialize(response)
                except Exception as exc:
                    await _fail(span, method, context, exc)
                    raise

        return behaviour


def _as_is(response: Any) -> Any:
    return response


def _decoded(request: Any, streaming: bool) -> Any:
    """The request, or for a stream the messages, raising InvalidArgument for one that
    did not decode. Called after admission, so an unauthenticated caller learns nothing
    about its bytes."""
    if streaming:
        return _decoded_stream(request)
    if isinstance(request, Undecodable):
        raise request.error
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


async def _readmitted(
    requests: AsyncIterator[Any], gate: Gate, method: str, principal: Principal
) -> AsyncIterator[Any]:
    """The messages of a request stream, each admitted again (`Gate.readmit`: token still
    accepted, message charged to the rate limit). Waiting for the next message ends with
    UNAUTHENTICATED when the token expires meanwhile, so an idle stream is closed at its
    token's expiry; work on a message already received is never interrupted."""
    iterator = aiter(requests)
    while True:
        left = gate.seconds_left(principal)
        try:
            if left is None:
                request = await anext(iterator)
            else:
                request = await asyncio.wait_for(anext(iterator), max(0.0, left))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise Unauthenticated("token expired") from None
        gate.readmit(method, principal)
        yield request


# Client errors a caller can send as fast as it likes: logged without traceback, and each
# (method, code) at most at the rate kit.logging allows, so a flood of garbage cannot
# flood the log.
_SECURITY_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


async def _fail(
    span: trace.Span, method: str, context: grpc.aio.ServicerContext[Any, Any], exc: Exception
) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, DomainError):
        code, _ = status_of(exc)
        span.set_status(StatusCode.ERROR, code.name)
        level = log.warning if code in _SECURITY_CODES else log.info
        level("rpc rejected", method=method, code=code.name, error=exc.message, throttle=(method, code.name))
        await abort_with(context, exc)
        return
    span.record_exception(exc)
    span.set_status(StatusCode.ERROR, type(exc).__name__)
    if isinstance(exc, OperationalError):
        # The database is unreachable or locked: nothing was committed, a retry is safe.
        log.warning(
            "rpc failed: database unavailable", method=method, error=str(exc.orig), throttle=(method, "db")
        )
        await context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable; retry later")
        return
    log.error("rpc failed", method=method, exc_info=exc, throttle=(method, type(exc).__name__))
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the failure was logged")


class _TraceContext:
    """Adds the current trace context to the metadata of every outgoing call."""

    @staticmethod
    def _with_context(details: Any) -> Any:
        return details._replace(metadata=metadata_with_context(list(details.metadata or ())))


class _TraceContextUnary(_TraceContext, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_context(client_call_details), request)


# grpc.aio files an interceptor under the first call shape it implements only, so each
# shape gets its own class.
class _TraceContextStream(_TraceContext, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_context(client_call_details), request_iterator)


# A bearer token, or what reads the current one (kit.security: the service token file,
# read again when it changes, at most a stat a second).
Token = str | Callable[[], str]


class _Bearer:
    def __init__(self, token: Token) -> None:
        self._token = token

    def _with_token(self, details: Any) -> Any:
        token = self._token if isinstance(self._token, str) else self._token()
        return details._replace(metadata=[*(details.metadata or ()), ("authorization", f"Bearer {token}")])


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)


def bearer_token(token: Token) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding `authorization: Bearer <token>` to every outgoing call of an
    asyncio channel (grpc.aio files each interceptor under its first call shape only, so
    there is one per shape). Given a reader, each call carries the token it reads then.

    Used instead of grpc.access_token_call_credentials: that is a Python metadata plugin,
    and destroying a channel that holds one can deadlock the whole process (the plugin's
    destroy callback takes the GIL on a gRPC thread while channel destruction waits for
    that thread with the GIL held; grpc/grpc PR 42247). Interceptors involve no plugin.
    """
    return [
        _BearerUnaryUnary(token),
        _BearerUnaryStream(token),
        _BearerStreamUnary(token),
        _BearerStreamStream(token),
    ]


class SyncBearerToken(_Bearer, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """`bearer_token` for blocking channels (`grpc.intercept_channel` files an interceptor
    under every shape it implements)."""

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)


@dataclass(frozen=True)
class PeerCredentials:
    """How this service calls another: TLS (with its client certificate) and, when it has
    one, its bearer token (sent by `bearer_token`). Each may be given as what reads the
    current one (kit.security.channel_credentials): a channel then follows renewals."""

    tls: grpc.ChannelCredentials | Callable[[], grpc.ChannelCredentials]
    token: Token | None = None


MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


def open_channel(target: str, credentials: PeerCredentials | None = None) -> grpc.aio.Channel:
    """A channel to another Egret service that carries trace context on every call;
    TLS (and this service's certificate and token) when `credentials` are given, following
    renewals of both when they are given as readers (PeerCredentials)."""
    interceptors: list[Any] = [_TraceContextUnary(), _TraceContextStream()]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    if credentials.token:
        interceptors += bearer_token(credentials.token)

    def secure(tls: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, tls, options=CHANNEL_OPTIONS, interceptors=interceptors)

    if isinstance(credentials.tls, grpc.ChannelCredentials):
        return secure(credentials.tls)
    # Renewed TLS files take a new channel (kit.channels).
    return RenewingChannel(credentials.tls, secure, target=target)


class Layer(Protocol):
    """An interceptor whose work on a handler needs no await: it wraps what it is given."""

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]: ...


class OnePass(grpc.aio.ServerInterceptor):
    """`layers` (outermost first) as one interceptor: the method's handler is looked up once
    and wrapped by each layer in turn, the innermost first, as a chain of interceptors
    would wrap it, without a coroutine and a continuation per layer and call."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self._inside_out = tuple(reversed(layers))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        for layer in self._inside_out:
            handler = layer.wrap(handler, handler_call_details)
        return handler


__all__ = [
    "CHANNEL_OPTIONS",
    "Layer",
    "OnePass",
    "PeerCredentials",
    "SyncBearerToken",
    "abort_with",
    "bearer_token",
    "open_channel",
    "status_of",
]
