"""Exemplars are offered only when something exports them (kit.metrics.exemplar_filter)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

from kit.metrics import exemplar_filter


def test_with_the_prometheus_scrape_alone_no_measurement_is_offered_as_an_exemplar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXEMPLAR_FILTER", raising=False)

    assert isinstance(exemplar_filter([]), AlwaysOffExemplarFilter)


def test_a_pusher_keeps_the_sdk_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXEMPLAR_FILTER", raising=False)
    pusher = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=3_600_000)
    try:
        assert exemplar_filter([pusher]) is None
    finally:
        pusher.shutdown()


def test_an_explicit_filter_in_the_environment_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXEMPLAR_FILTER", "trace_based")

    assert exemplar_filter([]) is None
