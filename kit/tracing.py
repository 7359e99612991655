"""OpenTelemetry tracing, configured by the standard OTEL_* environment variables.

OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the resource, OTEL_TRACES_SAMPLER
picks the sampler, OTEL_TRACES_EXPORTER chooses exporters (otlp, console, none) and
OTEL_EXPORTER_OTLP_* configure OTLP. With nothing set, spans are recorded (so trace ids
reach the logs) but not exported; setting OTEL_EXPORTER_OTLP_ENDPOINT alone turns OTLP on.
OTLP goes over TLS unless OTEL_EXPORTER_OTLP_INSECURE=true (or its _TRACES_ form) says
otherwise, whatever the endpoint's scheme (the SDK alone would send an http:// endpoint in
plain text): spans name methods, principals' ids and errors. OTEL_EXPORTER_OTLP_CERTIFICATE
is the CA that verifies the collector (default: the system's roots).

Context crosses services as W3C trace context in gRPC metadata, and crosses the outbox
as a stored `traceparent`, so one trace follows a batch from ingest to score.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from kit.env import SettingsError


def _exporters() -> list[SpanExporter]:
    default = (
        "otlp"
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        else "none"
    )
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", default).split(",") if n.strip()]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise SettingsError([f"OTEL_TRACES_EXPORTER={name!r} is not one of otlp, console, none"])
    return exporters


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    if value.strip().lower() not in ("true", "false"):
        raise SettingsError([f"{name}={value!r} is not true or false"])
    return value.strip().lower() == "true"


def otlp_insecure(signal: str) -> bool:
    """Whether OTLP for `signal` (TRACES, METRICS) goes in plain text: only when asked for
    explicitly; over TLS, a configured CA file must exist."""
    insecure = _flag(f"OTEL_EXPORTER_OTLP_{signal}_INSECURE")
    if insecure is None:
        insecure = _flag("OTEL_EXPORTER_OTLP_INSECURE") or False
    if not insecure:
        for name in (f"OTEL_EXPORTER_OTLP_{signal}_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"):
            path = os.environ.get(name)
            if path and not os.path.isfile(path):
                raise SettingsError([f"{name}={path!r}: no such file"])
    return insecure


def _otlp_exporter() -> OTLPSpanExporter:
    """OTLP over TLS unless plain text is asked for explicitly."""
    return OTLPSpanExporter(insecure=otlp_insecure("TRACES"))


def configure_tracing(service: str, *, extra_processors: Sequence[SpanProcessor] = ()) -> TracerProvider:
    """Install the process's tracer provider and return it (to flush at shutdown)."""
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"egret-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def current_traceparent() -> str:
    """The current context as a W3C traceparent, or "" outside a span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> otel_context.Context:
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


def links_from_traceparents(traceparents: Iterable[str]) -> list[trace.Link]:
    links = []
    for tp in dict.fromkeys(t for t in traceparents if t):
        span_context = trace.get_current_span(context_from_traceparent(tp)).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    return links


def metadata_with_context(metadata: Sequence[tuple[str, str | bytes]] = ()) -> list[tuple[str, str | bytes]]:
    """gRPC call metadata with the current trace context injected."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*metadata, *carrier.items()]


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)
