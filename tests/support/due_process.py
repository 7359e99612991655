"""Residents, a clock and mutual TLS for the due-process tests of score and query."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devtools.localpki import ISSUER, LocalPki
from egret.common.v1 import outcome_pb2
from kit.pseudonym import Pseudonymiser
from kit.settings import PseudonymSettings, SecuritySettings
from tests.support.events import TEST_SUBJECT_KEY
from tests.support.outcomes import outcome

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday
DAY = timedelta(days=1)
ALICE_ID = "person:resident-id:350200199001011230"
BOB_ID = "person:resident-id:35020019920202234X"
PSEUDONYMS = Pseudonymiser(TEST_SUBJECT_KEY, "k1")
ALICE = PSEUDONYMS.subject_key("person", "resident-id", "350200199001011230")
BOB = PSEUDONYMS.subject_key("person", "resident-id", "35020019920202234X")
GENERAL = outcome_pb2.SEVERITY_GENERAL


class Clock:
    """The service's clock, set by the test; counts the reads at each instant it returns."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.reads: Counter[datetime] = Counter()

    def __call__(self) -> datetime:
        now = self.now
        self.reads[now] += 1
        return now


def secured(settings: Any, pki: LocalPki) -> Any:
    env = pki.env("score")
    security = SecuritySettings(
        insecure=False,
        tls_cert_file=Path(env["EGRET_TLS_CERT_FILE"]),
        tls_key_file=Path(env["EGRET_TLS_KEY_FILE"]),
        tls_client_ca_file=Path(env["EGRET_TLS_CLIENT_CA_FILE"]),
        tls_ca_file=pki.ca_file,
        jwt_issuer=ISSUER,
        jwt_audience="egret",
        jwt_public_key_file=pki.jwt_public_key_file,
        service_token_file=pki.service_token_file("score"),
    )
    return replace(
        settings,
        common=replace(settings.common, security=security),
        pseudonym=PseudonymSettings(key=TEST_SUBJECT_KEY, key_id="k1"),
        sweep_interval_s=0.05,
    )


def negative(
    outcome_id: str, subject_key: str, points: int = -10, severity: int = GENERAL
) -> outcome_pb2.Outcome:
    return outcome(outcome_id, subject_key, points, "finance", severity=severity, occurred_at=T0 - 200 * DAY)
