"""kit.security.certificate_expiry over time: the file watch reads a renewed certificate again and keeps the
last good value when the file turns bad (a watch thread on a real file, so not in the unit ring)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trustme

from kit import filewatch
from kit.security import certificate_expiry
from kit.settings import SecuritySettings
from tests.support.certificates import not_after
from tests.support.logs import capture
from tests.support.waiting import wait_until


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
    # Read again within the watch's interval.
    wait_until(
        lambda: certificate_expiry(settings) == wanted, what="the renewed certificate read", within_s=5
    )

    path.write_bytes(b"-----BEGIN CERTIFICATE-----\ntrunc")
    logs = capture(monkeypatch, filewatch)
    answers: list[dict[str, float]] = []

    def looked_at_the_bad_file() -> bool:
        answers.append(certificate_expiry(settings))
        return any(line["log_level"] == "warning" for line in logs)

    wait_until(looked_at_the_bad_file, what="the watch to look at the bad file", within_s=5, every_s=0.05)
    # Until then, and after, every answer is the good one.
    assert all(answer == wanted for answer in answers)
    assert certificate_expiry(settings) == wanted
