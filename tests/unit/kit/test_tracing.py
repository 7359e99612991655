"""Trace export goes over TLS unless plain text is asked for explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

from kit.env import SettingsError
from kit.tracing import _exporters


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    ):
        monkeypatch.delenv(name, raising=False)


def _otlp() -> OTLPSpanExporter:
    (exporter,) = _exporters()
    assert isinstance(exporter, OTLPSpanExporter)
    return exporter


@pytest.mark.parametrize("endpoint", ["http://collector:4317", "https://collector:4317", "collector:4317"])
def test_an_endpoint_alone_exports_over_tls_whatever_its_scheme(
    monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    exporter = _otlp()
    assert exporter._insecure is False
    assert exporter._credentials is not None


@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE"])
def test_plain_text_only_when_asked_for(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv(name, "true")
    assert _otlp()._insecure is True


def test_the_traces_flag_overrides_the_general_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "false")
    assert _otlp()._insecure is False


def test_the_collectors_ca_comes_from_the_standard_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / "ca.pem"))
    assert _otlp()._credentials is not None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match=r"missing\.pem': no such file"):
        _exporters()


def test_a_flag_that_is_not_a_boolean_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "yes")
    with pytest.raises(SettingsError, match="is not true or false"):
        _exporters()


def test_nothing_is_exported_without_an_endpoint() -> None:
    assert _exporters() == []
