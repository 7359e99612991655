"""Metrics with OpenTelemetry's metrics SDK: scraped by Prometheus from the admin port
(kit.admin serves this process's registry at /metrics) and, when configured, pushed over OTLP.

Modules create their instruments at import time with `meter(...)`; before `configure_metrics`
runs (in tests that host a service in-process, or with EGRET_METRICS=false) they are the API's
no-op instruments, so recording costs next to nothing and nothing is exported.

OTEL_METRICS_EXPORTER chooses pushers besides the scrape (otlp, console, none); setting
OTEL_EXPORTER_OTLP_ENDPOINT (or its _METRICS_ form) alone turns OTLP on, over TLS unless
OTEL_EXPORTER_OTLP_INSECURE (or _METRICS_INSECURE) says otherwise, as for traces (kit.tracing).

Labels are bounded by construction: methods, departments and event types the service knows,
rule names of the active rule set, tiers, roles and purposes of the catalogues; never a subject
id or subject key (tests/integration/test_metrics.py scrapes every service and checks both).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, ExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from kit.env import SettingsError
from kit.logging import get_logger
from kit.tracing import otlp_insecure

log = get_logger(__name__)

# How often gauges counted from the database (tiers, due-process queues, dead letters) are
# refreshed (EGRET_METRICS_REFRESH_SECONDS): a scrape reads the last count, never the database.
REFRESH_INTERVAL_S = 30.0

# Seconds: database statements and batches, from well under a millisecond to a minute.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Milliseconds (rpc.server.duration, as OpenTelemetry's RPC conventions measure it).
MILLISECONDS_BUCKETS = tuple(b * 1000 for b in SECONDS_BUCKETS)

# Process metrics of the system-metrics instrumentation; the host's are the node exporter's job.
_PROCESS_METRICS: dict[str, list[str] | None] = {
    "process.cpu.time": ["user", "system"],
    "process.memory.usage": None,
    "process.memory.virtual": None,
    "process.open_file_descriptor.count": None,
    "process.thread.count": None,
    "cpython.gc.collections": None,
}


def meter(scope: str) -> Meter:
    """The meter of one part of Egret (`egret.ingest`, `egret.outbox`, ...)."""
    return metrics.get_meter(scope)


def histogram(scope: Meter, name: str, *, unit: str = "s", description: str = "") -> Histogram:
    """A latency histogram with Egret's buckets (seconds, or milliseconds for unit "ms")."""
    buckets = MILLISECONDS_BUCKETS if unit == "ms" else SECONDS_BUCKETS
    return scope.create_histogram(
        name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
    )


# A gauge's current value, or its value per label set (label pairs → value); None: no series.
Reading = Mapping[tuple[tuple[str, str], ...], float] | float | None


def gauge(
    scope: Meter, name: str, read: Callable[[], Reading], *, unit: str = "", description: str = ""
) -> None:
    """An observable gauge whose callback reads state kept up to date elsewhere (a periodic
    refresh, a flag): a scrape never queries the database."""

    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        value = read()
        if value is None:
            return []
        if isinstance(value, int | float):
            return [Observation(value)]
        return [Observation(v, dict(labels)) for labels, v in value.items()]

    scope.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)


def refresh_interval() -> float:
    raw = os.environ.get("EGRET_METRICS_REFRESH_SECONDS", "").strip()
    try:
        value = float(raw) if raw else REFRESH_INTERVAL_S
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise SettingsError([f"EGRET_METRICS_REFRESH_SECONDS={raw!r} is not a number of seconds in 0.1-3600"])
    return value


def refreshing(refresh: Callable[[], None]) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """A service background loop running `refresh` (blocking: it counts in the database) off
    the event loop every EGRET_METRICS_REFRESH_SECONDS until stopping; a failed count keeps
    the last values."""
    interval_s = refresh_interval()

    async def run(stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await asyncio.to_thread(refresh)
            except Exception as exc:  # the database away: health reports it; try again later
                log.warning(
                    "metrics refresh failed", error=f"{type(exc).__name__}: {exc}", throttle="refresh"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)

    return run


@dataclass
class Metrics:
    """This process's metrics: the registry the admin port serves and the provider to flush."""

    registry: CollectorRegistry
    provider: MeterProvider

    def shutdown(self) -> None:
        self.provider.shutdown()


def enabled() -> bool:
    value = os.environ.get("EGRET_METRICS", "true").strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise SettingsError([f"EGRET_METRICS={value!r} is not a boolean (true/false)"])
    return value in ("true", "1", "yes", "on")


def _pushers() -> list[MetricReader]:
    default = (
        "otlp"
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        else "none"
    )
    names = [n.strip() for n in os.environ.get("OTEL_METRICS_EXPORTER", default).split(",") if n.strip()]
    readers: list[MetricReader] = []
    for name in names:
        if name == "otlp":
            exporter = OTLPMetricExporter(insecure=otlp_insecure("METRICS"))
            readers.append(PeriodicExportingMetricReader(exporter))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name not in ("none", "prometheus"):
            raise SettingsError(
                [f"OTEL_METRICS_EXPORTER={name!r} is not one of otlp, console, prometheus, none"]
            )
    return readers


def exemplar_filter(pushers: list[MetricReader]) -> ExemplarFilter | None:
    """No exemplars unless something exports them: the Prometheus reader drops them, yet the
    SDK's default (trace_based) offers one for every measurement made inside a span, every
    RPC's among them. With an OTLP pusher, or OTEL_METRICS_EXEMPLAR_FILTER set, the SDK's
    own choice (None) stands."""
    if pushers or os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER", "").strip():
        return None
    return AlwaysOffExemplarFilter()


def configure_metrics(service: str) -> Metrics | None:
    """Install the process's meter provider (Prometheus registry plus any OTLP pusher) and the
    process instrumentation; None with EGRET_METRICS=false. (The database's are kit.db_metrics.)"""
    if not enabled():
        return None
    registry = CollectorRegistry(auto_describe=True)
    pushers = _pushers()
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry), *pushers]
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"egret-{service}"}
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create(attributes), exemplar_filter=exemplar_filter(pushers)
    )
    metrics.set_meter_provider(provider)
    SystemMetricsInstrumentor(config=_PROCESS_METRICS).instrument(meter_provider=provider)
    return Metrics(registry=registry, provider=provider)
