"""kit.security.certificate_expiry: the notAfter of each configured certificate on disk, for the
certificate-expiry metric; a renewed file is read again, a bad one keeps the last good value."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from kit import filewatch
from kit.security import certificate_expiry
from kit.settings import SecuritySettings
from tests.support.logs import capture


def not_after(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def test_each_configured_certificate_reports_when_it_expires(tmp_path: Path) -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("localhost", not_after=datetime.datetime(2031, 1, 2, tzinfo=datetime.UTC))
    files = {"server": leaf.cert_chain_pems[0].bytes(), "ca": ca.cert_pem.bytes()}
    files["client_ca"] = client_ca.cert_pem.bytes()
    for name, pem in files.items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
    settings = SecuritySettings(
        insecure=False,
        tls_cert_file=tmp_path / "server.pem",
        tls_ca_file=tmp_path / "ca.pem",
        tls_client_ca_file=tmp_path / "client_ca.pem",
    )
    expiry = certificate_expiry(settings)
    assert expiry == {name: not_after(pem) for name, pem in files.items()}
    assert expiry["server"] == datetime.datetime(2031, 1, 2, tzinfo=datetime.UTC).timestamp()


def test_only_configured_files_are_reported(tmp_path: Path) -> None:
    ca = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    assert certificate_expiry(SecuritySettings(insecure=True, tls_ca_file=tmp_path / "ca.pem")).keys() == {
        "ca"
    }
    assert certificate_expiry(SecuritySettings(insecure=True)) == {}


def test_a_file_that_never_parsed_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "server.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntrunc")
    settings = SecuritySettings(insecure=False, tls_cert_file=tmp_path / "server.pem")
    assert certificate_expiry(settings) == {}


def test_a_renewed_certificate_is_read_again_and_a_bad_one_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    first = ca.issue_cert("localhost", not_after=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC))
    renewed = ca.issue_cert("localhost", not_after=datetime.datetime(2030, 4, 1, tzinfo=datetime.UTC))
    path = tmp_path / "server.pem"
    path.write_bytes(first.cert_chain_pems[0].bytes())
    settings = SecuritySettings(insecure=False, tls_cert_file=path)
    assert certificate_expiry(settings) == {"server": not_after(first.cert_chain_pems[0].bytes())}

    # One byte longer, so the stat differs even within the filesystem's timestamp granularity.
    path.write_bytes(renewed.cert_chain_pems[0].bytes() + b"\n")
    wanted = {"server": not_after(renewed.cert_chain_pems[0].bytes())}
    deadline = time.monotonic() + 5.0
    while certificate_expiry(settings) != wanted:  # read again within the watch's interval
        assert time.monotonic() < deadline, "the renewed certificate was not read"
        time.sleep(0.05)

    path.write_bytes(b"-----BEGIN CERTIFICATE-----\ntrunc")
    deadline = time.monotonic() + 5.0
    logs = capture(monkeypatch, filewatch)
    # Until the watch has looked at the bad file (it warns), every answer is the good one.
    while not any(line["log_level"] == "warning" for line in logs):
        assert certificate_expiry(settings) == wanted
        assert time.monotonic() < deadline, "the bad file was not looked at"
        time.sleep(0.05)
    assert certificate_expiry(settings) == wanted
