"""The resend-on-break streaming submitter of the Python client (the demo, the benchmarks, the
end-to-end tests and `egret submit` use it).

It keeps up to `in_flight` batches outstanding on one IngestService.StreamEvents call and
matches acknowledgements to batches by batch_id. The server acknowledges a batch only
after committing it, so when the stream breaks every batch still unacknowledged is sent
again on a fresh stream; idempotent ingest turns the ones that did commit into
duplicates. Retries are bounded: a run of failures with no acknowledgement in between
gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from egret.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc

Request = ingest_service_pb2.StreamEventsRequest
Response = ingest_service_pb2.StreamEventsResponse
OnAck = Callable[[Request, Response, float], None]

# Not UNAUTHENTICATED: ingest ends a stream so when its token expires, and the same token
# would fail again; StreamFailed surfaces it and the caller renews its token.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class StreamFailed(Exception):
    """The stream kept failing and the retry budget is spent; `totals` says what got through."""

    def __init__(self, message: str, totals: StreamTotals) -> None:
        super().__init__(message)
        self.totals = totals


@dataclass
class StreamTotals:
    """What a streaming run achieved."""

    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    conflict: int = 0
    batches: int = 0
    events: int = 0
    resent_batches: int = 0
    stream_errors: int = 0
    # Seconds from writing a batch to receiving its acknowledgement, per batch.
    ack_latencies_s: list[float] = field(default_factory=list)
    first_send_at: float | None = None
    last_ack_at: float | None = None
    # A few rejected results (source, event result), kept to show what ingest objected to.
    rejections: list[tuple[str, ingest_service_pb2.EventResult]] = field(default_factory=list)

    @property
    def elapsed_s(self) -> float:
        if self.first_send_at is None or self.last_ack_at is None:
            return 0.0
        return self.last_ack_at - self.first_send_at

    def add(self, request: Request, response: Response, latency_s: float, keep_rejections: int) -> None:
        self.batches += 1
        self.events += len(request.events)
        counts = response.counts
        self.accepted += counts.accepted
        self.duplicate += counts.duplicate
        self.rejected += counts.rejected
        self.conflict += counts.conflict
        self.ack_latencies_s.append(latency_s)
        if counts.rejected and len(self.rejections) < keep_rejections:
            for result in response.results:
                if result.status == ingest_service_pb2.EVENT_STATUS_REJECTED:
                    self.rejections.append((request.source, result))
                    if len(self.rejections) >= keep_rejections:
                        break


@dataclass
class _InFlight:
    request: Request
    sent_at: float = 0.0


async def _aiter(requests: Iterable[Request] | AsyncIterable[Request]) -> AsyncIterator[Request]:
    if isinstance(requests, AsyncIterable):
        async for request in requests:
            yield request
    else:
        for request in requests:
            yield request
            # A sync source can generate for a long time; let acknowledgements through.
            await asyncio.sleep(0)


class _Broken(Exception):
    """The stream ended or stalled with batches unacknowledged."""


async def stream_events(
    channel: grpc.aio.Channel,
    requests: Iterable[Request] | AsyncIterable[Request],
    *,
    in_flight: int = 4,
    max_retries: int = 8,
    backoff_initial_s: float = 0.2,
    backoff_max_s: float = 10.0,
    ack_timeout_s: float = 120.0,
    stream_deadline_s: float = 3600.0,
    on_ack: OnAck | None = None,
    keep_rejections: int = 5,
) -> StreamTotals:
    """Send every request on StreamEvents with up to `in_flight` unacknowledged; return the totals.

    `on_ack(request, response, latency_s)` is called for each acknowledgement, e.g. to
    drive a progress bar. Each stream carries the deadline `stream_deadline_s` (ingest
    requires one). A batch unacknowledged for `ack_timeout_s` counts as a broken
    stream. Raises StreamFailed on a non-retryable status, or once `max_retries`
    consecutive stream failures pass without a single acknowledgement.
    """
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    streamer = _Streamer(
        ingest_service_pb2_grpc.IngestServiceStub(channel),
        _aiter(requests),
        in_flight=in_flight,
        ack_timeout_s=ack_timeout_s,
        stream_deadline_s=stream_deadline_s,
        on_ack=on_ack,
        keep_rejections=keep_rejections,
    )
    totals = streamer.totals
    failures = 0
    while True:
        acked_before = totals.batches
        try:
            await streamer.run_one_stream()
            return totals
        except (grpc.aio.AioRpcError, _Broken) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            details = (exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            totals.stream_errors += 1
            if code not in _RETRYABLE:
                raise StreamFailed(f"StreamEvents failed: {code.name}: {details}", totals) from exc
            failures = 0 if totals.batches > acked_before else failures + 1
            if failures > max_retries:
                raise StreamFailed(
                    f"StreamEvents failed {failures} times in a row; last: {code.name}: {details}", totals
                ) from exc
            totals.resent_batches += len(streamer.pending)
            delay = min(backoff_max_s, backoff_initial_s * 2 ** max(0, failures - 1))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))


class _Streamer:
    """The state that outlives one StreamEvents call: the source and the unacknowledged batches."""

    def __init__(
        self,
        stub: ingest_service_pb2_grpc.IngestServiceAsyncStub,
        source: AsyncIterator[Request],
        *,
        in_flight: int,
        ack_timeout_s: float,
        stream_deadline_s: float,
        on_ack: OnAck | None,
        keep_rejections: int,
    ) -> None:
        self.stub = stub
        self.source = source
        self.in_flight = in_flight
        self.ack_timeout_s = ack_timeout_s
        self._next: asyncio.Future[Request] | None = None
        self.stream_deadline_s = stream_deadline_s
        self.on_ack = on_ack
        self.keep_rejections = keep_rejections
        self.pending: OrderedDict[str, _InFlight] = OrderedDict()
        self.exhausted = False
        self.totals = StreamTotals()

    async def run_one_stream(self) -> None:
        """One call: resend what is unacknowledged, then send on until the source runs dry.

        Raises on a stream error, leaving the unacknowledged batches in `pending`.
        """
        # Ingest requires a deadline on every call; a long one bounds a stream that hangs.
        call = self.stub.StreamEvents(timeout=self.stream_deadline_s)
        room = asyncio.Condition()
        tasks = [
            asyncio.create_task(self._write(call, room)),
            asyncio.create_task(self._read(call, room)),
            asyncio.create_task(self._watch()),
        ]
        try:
            done, _ = await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            # A writer done without error means every batch is acknowledged.
            await tasks[1]
            await tasks[0]
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(
                    asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError, _Broken
                ):
                    await task
            call.cancel()

    @staticmethod
    async def _send(call: grpc.aio.StreamStreamCall[Request, Response], request: Request) -> None:
        try:
            await call.write(request)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as exc:
            # The call ended under us (server gone): the reader reports why; resend later.
            raise _Broken("the stream ended while writing") from exc

    async def _write(
        self, call: grpc.aio.StreamStreamCall[Request, Response], room: asyncio.Condition
    ) -> None:
        for item in list(self.pending.values()):
            item.sent_at = time.perf_counter()
            await self._send(call, item.request)
        while not self.exhausted:
            async with room:
                await room.wait_for(lambda: len(self.pending) < self.in_flight)
            # Shielded: a stream broken while the source is waiting must not cancel (and so
            # close) an asynchronous source; the next stream picks the same pull up again.
            if self._next is None:
                self._next = asyncio.ensure_future(anext(self.source))
            try:
                request = await asyncio.shield(self._next)
            except StopAsyncIteration:
                self._next = None
                self.exhausted = True
                break
            # Cleared only once the request is in hand: if this writer is cancelled after
            # the pull completed but before it resumed, the next stream still gets it.
            self._next = None
            if request.batch_id in self.pending:
                raise ValueError(f"batch_id {request.batch_id!r} is already in flight")
            now = time.perf_counter()
            if self.totals.first_send_at is None:
                self.totals.first_send_at = now
            self.pending[request.batch_id] = _InFlight(request, now)
            await self._send(call, request)
        async with room:
            await room.wait_for(lambda: not self.pending)
        try:
            await call.done_writing()
        except Exception as exc:  # grpc raises its internal ExecuteBatchError here
            # Every batch is acknowledged; only closing the call failed (the server left).
            if self.pending:
                raise _Broken(f"the stream ended while closing: {type(exc).__name__}") from exc

    async def _read(
        self, call: grpc.aio.StreamStreamCall[Request, Response], room: asyncio.Condition
    ) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                if self.pending:
                    raise _Broken(f"stream closed with {len(self.pending)} batches unacknowledged")
                return
            assert isinstance(response, Response)
            item = self.pending.pop(response.batch_id, None)
            if item is None:
                # An acknowledgement for a batch already settled: nothing left to do for it.
                continue
            now = time.perf_counter()
            latency = now - item.sent_at
            self.totals.last_ack_at = now
            self.totals.add(item.request, response, latency, self.keep_rejections)
            if self.on_ack is not None:
                self.on_ack(item.request, response, latency)
            async with room:
                room.notify_all()

    async def _watch(self) -> None:
        # A stalled server holds batches forever without failing the call; treat it as broken.
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout_s))
            if self.pending:
                oldest = next(iter(self.pending.values()))
                if time.perf_counter() - oldest.sent_at > self.ack_timeout_s:
                    raise _Broken(f"no acknowledgement for {self.ack_timeout_s:.0f}s")


def merge_totals(parts: Iterable[StreamTotals]) -> StreamTotals:
    """One StreamTotals for several streams run side by side."""
    total = StreamTotals()
    for part in parts:
        for name in ("accepted", "duplicate", "rejected", "conflict", "batches", "events"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.resent_batches += part.resent_batches
        total.stream_errors += part.stream_errors
        total.ack_latencies_s.extend(part.ack_latencies_s)
        total.rejections.extend(part.rejections)
        if part.first_send_at is not None:
            total.first_send_at = min(total.first_send_at or part.first_send_at, part.first_send_at)
        if part.last_ack_at is not None:
            total.last_ack_at = max(total.last_ack_at or part.last_ack_at, part.last_ack_at)
    return total


async def stream_by_source(
    channel_for: Callable[[str], grpc.aio.Channel],
    requests: Iterable[Request] | AsyncIterable[Request],
    **options: Any,
) -> StreamTotals:
    """Stream each department's batches on its own StreamEvents call and channel.

    A department's token lets it submit only as itself, so a mixed stream (the demo's
    synthetic city) becomes one stream per source, run side by side. `channel_for(source)`
    opens that department's channel; `options` go to `stream_events`.
    """
    queues: dict[str, asyncio.Queue[Request | None]] = {}
    tasks: dict[str, asyncio.Task[StreamTotals]] = {}
    channels: list[grpc.aio.Channel] = []

    async def put(source: str, item: Request | None) -> None:
        # A stream that gave up stops reading its queue: surface its error, don't hang.
        while True:
            if tasks[source].done():
                tasks[source].result()
                raise RuntimeError(f"the stream of {source} ended before its batches were sent")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queues[source].put(item), 1.0)
                return

    async def drain(queue: asyncio.Queue[Request | None]) -> AsyncIterator[Request]:
        while (item := await queue.get()) is not None:
            yield item

    try:
        async for request in _aiter(requests):
            if request.source not in queues:
                # Bounded, so one slow department cannot make the feeder buffer everything.
                queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=8)
                queues[request.source] = queue
                channels.append(channel_for(request.source))
                tasks[request.source] = asyncio.create_task(
                    stream_events(channels[-1], drain(queue), **options)
                )
            await put(request.source, request)
        for source in queues:
            await put(source, None)
        return merge_totals(await asyncio.gather(*tasks.values()))
    finally:
        for task in tasks.values():
            task.cancel()
        for channel in channels:
            await channel.close()
