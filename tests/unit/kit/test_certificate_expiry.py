"""kit.security.certificate_expiry: the notAfter of each configured certificate on disk, for the
certificate-expiry metric (renewal over time: tests/integration/kit/test_certificate_renewal.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme

from kit.security import certificate_expiry
from kit.settings import SecuritySettings
from tests.support.certificates import not_after


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
