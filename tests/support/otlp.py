"""A tiny OTLP/gRPC trace collector on loopback, so end-to-end tests see every service's spans."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, str]
    # The trace ids of the spans this one links to.
    linked_traces: tuple[str, ...] = ()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[CollectedSpan] = []
        # Every export request as received, so a test can search all of it (events,
        # status messages, resource attributes), not just the fields parsed above.
        self.raw: list[bytes] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any) -> Any:
        collected = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    collected.append(
                        CollectedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={
                                a.key: str(a.value.ListFields()[0][1]) if a.value.ListFields() else ""
                                for a in span.attributes
                            },
                            linked_traces=tuple(link.trace_id.hex() for link in span.links),
                        )
                    )
        with self._lock:
            self.spans.extend(collected)
            self.raw.append(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[CollectedSpan]:
        with self._lock:
            return list(self.spans)

    def raw_snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self.raw)


@contextmanager
def collector() -> Iterator[tuple[Collector, str]]:
    """Yield the collector and its endpoint URL (for OTEL_EXPORTER_OTLP_ENDPOINT)."""
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        server.stop(0)
