"""Sending a department's event file to ingest, the way `egret submit` does it.

`validate_file` runs every record past ingest's own validator (SubmitEvents with
validate_only: the catalogue, the subject ids, the event time, and duplicates or conflicts
with what ingest already holds) without storing anything. `submit_file` streams the
records in batches of consecutive records (egret_client.submitter: resend on break, a few
batches in flight) and notes each acknowledged batch in a checkpoint
(egret_client.checkpoint), skipping what an earlier run got acknowledged. Both report each
record that was refused with its line number and field paths relative to the event.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from egret_client.checkpoint import Checkpoint, Counts
from egret_client.errors import Violation
from egret_client.eventfiles import AttributeTypes, FileFormat, Record, read_records
from egret_client.submitter import stream_events


@dataclass(frozen=True)
class Rejection:
    """A record ingest will not (or did not) take, and why."""

    line: int
    event_id: str
    # "invalid": not readable as an event; "rejected": refused by ingest's validator;
    # "conflict": its event_id was used before with a different payload.
    status: str
    violations: tuple[Violation, ...]
    # The record as the file holds it.
    raw: Any

    def as_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "event_id": self.event_id,
            "status": self.status,
            "errors": [
                {"field": v.field, "description": v.description, "reason": v.reason} for v in self.violations
            ],
            "record": self.raw,
        }


@dataclass(frozen=True)
class EventFile:
    """What to read and as whom: the file, its format, the submitting department, how to
    type attribute values (the catalogue's types, if given) and the batch size."""

    path: Path
    fmt: FileFormat
    source: str
    types: AttributeTypes | None = None
    batch_size: int = 500

    def batches(self, wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, list[Record]]]:
        """(batch index, its records) in file order; batches `wanted` refuses are skipped
        without parsing."""
        size = self.batch_size
        records = read_records(
            self.path, self.fmt, self.types, wanted=None if wanted is None else lambda i: wanted(i // size)
        )
        current: list[Record] = []
        index = 0
        for record in records:
            if record.index // size != index and current:
                yield index, current
                current = []
            index = record.index // size
            current.append(record)
        if current:
            yield index, current


OnRejection = Callable[[Rejection], None]
# Called with how many records were just dealt with (validated, or acknowledged).
OnProgress = Callable[[int], None]

_RETRY_VALIDATION = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
_WITHIN_REQUEST = re.compile(r"^events\[\d+\]\.")


def _from_event(violations: Any) -> tuple[Violation, ...]:
    """Ingest's paths run from the request's root (events[3].attributes.days_late); a line
    of the file is one event, so they are reported from the event."""
    return tuple(Violation(_WITHIN_REQUEST.sub("", v.field), v.description, v.reason) for v in violations)


def _local(record: Record, checked: tuple[Violation, ...] = ()) -> Rejection:
    """A record that could not be read fully, with its problems and, when what could be read
    was checked, ingest's findings on the fields that were read."""

    def covered(path: str) -> bool:
        return any(
            not v.field or path == v.field or path.startswith(v.field + ".") for v in record.violations
        )

    event_id = record.event.event_id if record.event is not None else _raw_event_id(record.raw)
    found = record.violations + tuple(v for v in checked if not covered(v.field))
    return Rejection(record.line, event_id, "invalid", found, record.raw)


def _raw_event_id(raw: Any) -> str:
    value = raw.get("event_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else ""


def _verdict(record: Record, result: pb.EventResult, counts: Counts) -> Rejection | None:
    """Count one event's result; a Rejection when ingest refused it (or would)."""
    if record.violations:
        counts.invalid += 1
        return _local(record, _from_event(result.violations))
    if result.status == pb.EVENT_STATUS_ACCEPTED:
        counts.accepted += 1
    elif result.status == pb.EVENT_STATUS_DUPLICATE:
        counts.duplicate += 1
    elif result.status == pb.EVENT_STATUS_CONFLICT:
        counts.conflict += 1
        problem = Violation("event_id", result.message or "was used before with another payload", "CONFLICT")
        return Rejection(record.line, result.event_id, "conflict", (problem,), record.raw)
    else:
        counts.rejected += 1
        return Rejection(record.line, result.event_id, "rejected", _from_event(result.violations), record.raw)
    return None


def _settle(
    sent: list[Record], unsent: list[Record], results: Any, on_rejection: OnRejection | None
) -> Counts:
    """Count a batch's results and report its refused records in line order."""
    counts = Counts(invalid=len(unsent))
    refused = [_local(r) for r in unsent]
    for result in results:
        rejection = _verdict(sent[result.index], result, counts)
        if rejection is not None:
            refused.append(rejection)
    if on_rejection is not None:
        for rejection in sorted(refused, key=lambda r: r.line):
            on_rejection(rejection)
    return counts


async def _validate_batch(
    stub: pb_grpc.IngestServiceAsyncStub, request: pb.SubmitEventsRequest, attempts: int = 8
) -> pb.SubmitEventsResponse:
    # Ingest decodes only a few batches at once and refuses more with RESOURCE_EXHAUSTED
    # before reading them: wait and ask again.
    delay = 0.2
    for attempt in range(attempts):
        try:
            return await stub.SubmitEvents(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRY_VALIDATION or attempt == attempts - 1:
                raise
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


async def validate_file(
    stub: pb_grpc.IngestServiceAsyncStub,
    file: EventFile,
    *,
    skip_batch: Callable[[int], bool] | None = None,
    concurrency: int = 2,
    on_rejection: OnRejection | None = None,
    on_progress: OnProgress | None = None,
) -> Counts:
    """Every record of the file past ingest's validator; nothing is stored.

    The counts say what a submission would do (accepted: would be accepted). Refused
    records go to `on_rejection` in line order. Batches `skip_batch` names (acknowledged
    by an earlier run) are not read.
    """
    total = Counts()
    window: deque[tuple[list[Record], list[Record], asyncio.Task[pb.SubmitEventsResponse] | None]] = deque()

    async def settle_oldest() -> None:
        good, bad, task = window.popleft()
        results = (await task).results if task is not None else ()
        total.add(_settle(good, bad, results, on_rejection))
        if on_progress is not None:
            on_progress(len(good) + len(bad))

    wanted = None if skip_batch is None else (lambda index: not skip_batch(index))
    try:
        for _, records in file.batches(wanted):
            # What could be read of a bad record is checked too, to report all its problems.
            good = [r for r in records if r.event is not None]
            bad = [r for r in records if r.event is None]
            task = None
            if good:
                events = [r.event for r in good if r.event is not None]
                request = pb.SubmitEventsRequest(source=file.source, events=events, validate_only=True)
                task = asyncio.create_task(_validate_batch(stub, request))
            window.append((good, bad, task))
            while sum(1 for *_, t in window if t is not None) >= concurrency or (
                window and window[0][2] is None
            ):
                await settle_oldest()
        while window:
            await settle_oldest()
    finally:
        for *_, task in window:
            if task is not None:
                task.cancel()
    return total


@dataclass
class Submitted:
    """What one run of `submit_file` did."""

    counts: Counts
    # Events sent and acknowledged in this run (resends counted once), and the seconds
    # from the first send to the last acknowledgement.
    events: int
    seconds: float
    resent_batches: int


async def submit_file(
    channel: grpc.aio.Channel,
    file: EventFile,
    checkpoint: Checkpoint,
    *,
    in_flight: int = 4,
    on_rejection: OnRejection | None = None,
    on_progress: OnProgress | None = None,
) -> Submitted:
    """Stream the file's batches that the checkpoint does not hold yet; record each one as
    it is acknowledged. Records that cannot be read as events are not sent (they are
    reported and counted as invalid)."""
    counts = Counts()
    pending: dict[str, tuple[int, list[Record], list[Record]]] = {}

    def settle(index: int, good: list[Record], bad: list[Record], results: Any) -> None:
        done = _settle(good, bad, results, on_rejection)
        checkpoint.record(index, done)
        counts.add(done)
        if on_progress is not None:
            on_progress(len(good) + len(bad))

    def requests() -> Iterator[pb.StreamEventsRequest]:
        for index, records in file.batches(lambda index: not checkpoint.done(index)):
            good = [r for r in records if r.sendable]
            bad = [r for r in records if not r.sendable]
            if not good:
                settle(index, good, bad, ())
                continue
            batch_id = checkpoint.batch_id(index)
            pending[batch_id] = (index, good, bad)
            yield pb.StreamEventsRequest(
                source=file.source, batch_id=batch_id, events=[r.event for r in good if r.event is not None]
            )

    def on_ack(request: pb.StreamEventsRequest, response: pb.StreamEventsResponse, _latency: float) -> None:
        index, good, bad = pending.pop(request.batch_id)
        settle(index, good, bad, response.results)

    totals = await stream_events(channel, requests(), in_flight=in_flight, on_ack=on_ack)
    return Submitted(counts, totals.events, totals.elapsed_s, totals.resent_batches)
