"""IngestService over gRPC: translates protobuf ⇄ domain and results ⇄ statuses."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from opentelemetry import trace

from domain.catalogue import IncomingEvent
from egret.common.v1 import errors_pb2
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from kit.db import run_blocking
from kit.errors import AlreadyExists, InvalidArgument, Violation
from kit.logging import get_logger
from kit.metrics import meter
from kit.principal import current_principal
from kit.protoconv import SUBJECT_KIND_NAMES, attribute_value, to_datetime
from services.ingest.access import acting_department, require_own_source
from services.ingest.domain import EventResult, EventStatus, Intake
from services.ingest.stores.events import retraction_message

log = get_logger(__name__)

_events = meter("egret.ingest").create_counter(
    "egret.ingest.events", unit="{event}", description="Submitted events by department, event type and result"
)

_STATUS = {
    EventStatus.ACCEPTED: pb.EVENT_STATUS_ACCEPTED,
    EventStatus.DUPLICATE: pb.EVENT_STATUS_DUPLICATE,
    EventStatus.REJECTED: pb.EVENT_STATUS_REJECTED,
    EventStatus.CONFLICT: pb.EVENT_STATUS_CONFLICT,
}


def incoming(event: pb.Event) -> IncomingEvent:
    return IncomingEvent(
        event_id=event.event_id,
        event_type=event.event_type,
        subject_kind=SUBJECT_KIND_NAMES.get(event.subject.kind),
        id_scheme=event.subject.id_scheme,
        id_value=event.subject.id_value,
        occurred_at=to_datetime(event.occurred_at) if event.HasField("occurred_at") else None,
        attributes={name: attribute_value(value) for name, value in event.attributes.items()},
        evidence_uri=event.evidence_uri,
    )


def result_message(result: EventResult, within: str = "") -> pb.EventResult:
    """`within`: the repeated field of the request that held the event (`events`), so that
    a violation's path starts at the request's root (`events[3].attributes.days_late`,
    errors.proto); empty when the violations are the request's own."""
    violations = (
        [v.prefixed(f"{within}[{result.index}]") for v in result.violations] if within else result.violations
    )
    return pb.EventResult(
        index=result.index,
        event_id=result.event_id,
        status=_STATUS[result.status],
        violations=[
            errors_pb2.FieldViolation(field=v.field, description=v.description, reason=v.reason)
            for v in violations
        ],
        message=result.message,
    )


def counts(results: Sequence[EventResult]) -> pb.BatchCounts:
    tally = dict.fromkeys(EventStatus, 0)
    for r in results:
        tally[r.status] += 1
    return pb.BatchCounts(
        accepted=tally[EventStatus.ACCEPTED],
        duplicate=tally[EventStatus.DUPLICATE],
        rejected=tally[EventStatus.REJECTED],
        conflict=tally[EventStatus.CONFLICT],
    )


@dataclass(frozen=True)
class Answered:
    """A batch's results, as the domain decided them and as the response carries them."""

    results: list[EventResult]
    messages: list[pb.EventResult]
    counts: pb.BatchCounts


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, intake: Intake, executor: Executor, committed: Callable[[], None]) -> None:
        self._intake = intake
        self._executor = executor
        self._committed = committed
        self._tracer = trace.get_tracer("egret.ingest")

    async def _submit(
        self, source: str, events: Sequence[pb.Event], *, validate_only: bool = False, within: str = ""
    ) -> Answered:
        """Run one batch through the domain off the event loop, in its own span: the
        conversions of each event and of each result run in the executor too."""
        with self._tracer.start_as_current_span(
            "ingest batch",
            attributes={
                "egret.source": source,
                "egret.batch.size": len(events),
                "egret.validate_only": validate_only,
            },
        ) as span:
            answered = await run_blocking(
                self._executor,
                partial(self._answer, validate_only=validate_only, within=within),
                source,
                events,
            )
            tally = answered.counts
            span.set_attributes(
                {
                    "egret.accepted": tally.accepted,
                    "egret.rejected": tally.rejected,
                    "egret.duplicate": tally.duplicate,
                    "egret.conflict": tally.conflict,
                }
            )
            if tally.accepted and not validate_only:
                self._committed()
            log.info(
                "batch validated" if validate_only else "batch committed",
                source=source,
                size=len(events),
                accepted=tally.accepted,
                duplicate=tally.duplicate,
                rejected=tally.rejected,
                conflict=tally.conflict,
            )
            return answered

    def _answer(
        self, source: str, events: Sequence[pb.Event], *, validate_only: bool, within: str
    ) -> Answered:
        results = self._intake.submit(source, [incoming(e) for e in events], validate_only=validate_only)
        if not validate_only:
            self._count(source, events, results)
        return Answered(results, [result_message(r, within) for r in results], counts(results))

    def _count(self, source: str, events: Sequence[pb.Event], results: Sequence[EventResult]) -> None:
        """egret.ingest.events, labelled only with names the catalogue knows (a caller's
        unknown source or event type counts as "unknown"), so the label set stays bounded."""
        catalogue = self._intake.catalogue
        department = source if catalogue.knows_source(source) else "unknown"
        tally = Counter(
            (e.event_type if e.event_type in catalogue.event_types else "unknown", r.status)
            for e, r in zip(events, results, strict=True)
        )
        for (event_type, status), n in tally.items():
            _events.add(n, {"department": department, "event_type": event_type, "result": status.value})

    async def SubmitEvent(self, request: pb.SubmitEventRequest, context: Any) -> pb.SubmitEventResponse:
        require_own_source(current_principal(), request.source)
        problems = self._intake.check_request(request.source, 1)
        if not request.HasField("event"):
            problems.append(Violation("event", "is required", "REQUIRED"))
        if problems:
            raise InvalidArgument("invalid request", problems)
        (result,) = (await self._submit(request.source, [request.event])).results
        if result.status is EventStatus.REJECTED:
            raise InvalidArgument(
                f"event {result.event_id!r} is invalid", [v.prefixed("event") for v in result.violations]
            )
        if result.status is EventStatus.CONFLICT:
            raise AlreadyExists(result.message, reason="EVENT_ID_CONFLICT")
        return pb.SubmitEventResponse(result=result_message(result))

    async def SubmitEvents(self, request: pb.SubmitEventsRequest, context: Any) -> pb.SubmitEventsResponse:
        require_own_source(current_principal(), request.source)
        problems = self._intake.check_request(request.source, len(request.events))
        if problems:
            raise InvalidArgument("invalid batch", problems)
        answered = await self._submit(
            request.source, request.events, validate_only=request.validate_only, within="events"
        )
        return pb.SubmitEventsResponse(results=answered.messages, counts=answered.counts)

    async def StreamEvents(
        self, request_iterator: AsyncIterator[pb.StreamEventsRequest], context: Any
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        principal = current_principal()
        async for request in request_iterator:
            # Another department's batch ends the stream: it is a credential misuse, not bad data.
            require_own_source(principal, request.source)
            problems = self._intake.check_request(request.source, len(request.events))
            if problems:
                # A bad batch is answered, not fatal: the stream's other batches go on. Its
                # violations name fields of the request itself (`source`, `events`).
                results = [
                    EventResult(
                        i, e.event_id, EventStatus.REJECTED, tuple(problems), "the batch was rejected"
                    )
                    for i, e in enumerate(request.events)
                ]
                self._count(request.source, request.events, results)
                answered = Answered(results, [result_message(r) for r in results], counts(results))
                log.info(
                    "batch rejected",
                    source=request.source,
                    size=len(request.events),
                    reasons=[p.reason for p in problems],
                )
            else:
                answered = await self._submit(request.source, request.events, within="events")
            yield pb.StreamEventsResponse(
                batch_id=request.batch_id, results=answered.messages, counts=answered.counts
            )

    async def RetractEvent(self, request: pb.RetractEventRequest, context: Any) -> pb.RetractEventResponse:
        principal = current_principal()
        ref = request.ref
        require_own_source(principal, ref.source, "retract events of")
        with self._tracer.start_as_current_span("ingest retract", attributes={"egret.source": ref.source}):
            retracted = await run_blocking(
                self._executor,
                self._intake.retract,
                ref.source,
                ref.event_id,
                request.reason,
                acting_department(principal, ref.source),
            )
        if not retracted.already_retracted:
            self._committed()
        log.info(
            "event retracted",
            source=ref.source,
            event_id=ref.event_id,
            already_retracted=retracted.already_retracted,
        )
        return pb.RetractEventResponse(
            retraction=retraction_message(retracted.retraction),
            already_retracted=retracted.already_retracted,
        )

    async def CorrectEvent(self, request: pb.CorrectEventRequest, context: Any) -> pb.CorrectEventResponse:
        principal = current_principal()
        ref = request.ref
        require_own_source(principal, ref.source, "correct events of")
        if not request.HasField("replacement"):
            raise InvalidArgument("invalid correction", [Violation("replacement", "is required", "REQUIRED")])
        with self._tracer.start_as_current_span("ingest correct", attributes={"egret.source": ref.source}):
            corrected = await run_blocking(
                self._executor,
                self._intake.correct,
                ref.source,
                ref.event_id,
                request.reason,
                incoming(request.replacement),
                acting_department(principal, ref.source),
            )
        self._committed()
        log.info(
            "event corrected",
            source=ref.source,
            event_id=ref.event_id,
            replacement=request.replacement.event_id,
            status=corrected.replacement.status.value,
        )
        return pb.CorrectEventResponse(
            retraction=retraction_message(corrected.retraction),
            replacement=result_message(corrected.replacement),
        )


def register(servicer: IngestServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: pb_grpc.add_IngestServiceServicer_to_server(servicer, server)
