"""bench.pipeline --rate: batches are released when the events before them are due."""

from __future__ import annotations

import time

from bench.pipeline import _paced
from egret.ingest.v1 import ingest_service_pb2


def _batch(n: int) -> ingest_service_pb2.StreamEventsRequest:
    return ingest_service_pb2.StreamEventsRequest(source="library", events=[ingest_service_pb2.Event()] * n)


async def test_each_batch_waits_until_the_events_before_it_are_due() -> None:
    batches = [_batch(10), _batch(30), _batch(10)]
    started = time.perf_counter()
    released = []
    async for request in _paced(batches, rate=1000.0):
        released.append((time.perf_counter() - started, len(request.events)))
    assert [n for _, n in released] == [10, 30, 10]
    # Due at 0, 10 and 40 ms: never earlier (a sleep may only overshoot).
    assert released[1][0] >= 0.010
    assert released[2][0] >= 0.040
