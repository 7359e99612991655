"""A channel to another service that picks up renewed TLS credentials without a restart.

gRPC fixes a channel's TLS credentials when the channel is made, so renewing a certificate
means a new channel. RenewingChannel stands in for one: every call asks for the current
credentials (kit.filewatch makes that a cached read), and when they are a new object it
opens a new channel for this and later calls, and closes the old one once the calls in
flight on it have finished (at most `drain_s`, after which they are cancelled). Stubs made
on it keep working across renewals, since their callables look up the channel per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import grpc
import structlog

log = structlog.stdlib.get_logger(__name__)


class RenewingChannel(grpc.aio.Channel):
    def __init__(
        self,
        credentials: Callable[[], grpc.ChannelCredentials],
        open_with: Callable[[grpc.ChannelCredentials], grpc.aio.Channel],
        *,
        target: str,
        drain_s: float = 30.0,
    ) -> None:
        self._credentials = credentials
        self._open_with = open_with
        self._target = target
        self._drain_s = drain_s
        self._tls = credentials()
        self._channel = open_with(self._tls)
        self._draining: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self._closed = False

    def current(self) -> grpc.aio.Channel:
        """The channel a call starts on now, opened anew if the credentials were renewed.
        Called by each call, so on the event loop."""
        tls = self._credentials()
        if tls is not self._tls and not self._closed:
            old, self._tls = self._channel, tls
            self._channel = self._open_with(tls)
            drain = asyncio.get_running_loop().create_task(old.close(self._drain_s))
            self._draining[old] = drain
            drain.add_done_callback(lambda _: self._draining.pop(old, None))
            log.info("renewed TLS credentials: new channel opened", target=self._target)
        return self._channel

    async def close(self, grace: float | None = None) -> None:
        self._closed = True
        for old, drain in list(self._draining.items()):
            # Closing says how long calls may still run: the old channels' too.
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await old.close(grace)
        await self._channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        await self.close(None)
        return None

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    # The stubs' callables: typed Any, as one class serves the four call shapes.
    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Callable(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Callable(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Callable(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Callable(self, "stream_stream", method, args, kwargs)


class _Callable:
    """A stub's callable for one method, made on whichever channel is current at each call."""

    def __init__(
        self, holder: RenewingChannel, shape: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._holder = holder
        self._shape, self._method, self._args, self._kwargs = shape, method, args, kwargs
        self._on: grpc.aio.Channel | None = None
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._holder.current()
        if channel is not self._on:
            made = getattr(channel, self._shape)(self._method, *self._args, **self._kwargs)
            self._on, self._callable = channel, made
        return self._callable(*args, **kwargs)
