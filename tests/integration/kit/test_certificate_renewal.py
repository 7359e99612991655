"""kit.security.certificate_expiry over time: the file watch reads a renewed certificate again and keeps the
last good value when the file turns bad (a watch thread on a real file, so not in the unit ring)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import trustme

from kit import filewatch
from kit.security import certificate_expiry
from kit.settings import SecuritySettings
from tests.support.certificates import not_after
from tests.support.logs import capture


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
