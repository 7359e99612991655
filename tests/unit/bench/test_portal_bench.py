"""bench.portal's pure parts: what it reads from /proc, the accounts it adds to the
provider, the residents it picks and the table it prints. (The bench itself is run by
`make bench-portal`; speed is never asserted in tests.)"""

from __future__ import annotations

import os
import time

from bench.meter import cpu_seconds
from bench.portal import PAGES, _parse, resident_accounts, table
from devtools.oidc.config import Account
from kit.principal import Role


def test_cpu_seconds_reads_this_process_from_proc() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) >= before


def test_further_residents_become_provider_accounts_the_provider_accepts() -> None:
    usernames, options = resident_accounts([("350203198007220724", 44), ("330106195701111962", 40)])
    assert usernames == ["resident", "resident2"]
    assert options == ["--account", "resident2,subject,person:resident-id:330106195701111962"]
    username, role, principal = options[1].split(",")
    Account(username, username, Role(role), principal)  # a valid subject, or ValueError


def test_every_page_is_measured_by_default_and_unknown_pages_are_refused() -> None:
    assert _parse([]).pages.split(",") == list(PAGES)
    assert _parse(["--pages", "credit"]).pages == "credit"


def test_the_table_has_a_line_per_page_and_says_when_a_page_was_skipped() -> None:
    page = {
        "achieved_rate": 20.0,
        "ok": 600,
        "errors": {"503": 2},
        "client_ms": {"p50": 40.0, "p95": 90.0, "p99": 120.0, "max": 130.0},
        "server_ms": {"p50": 30.0, "p95": 80.0, "p99": None},
        "cpu_ms_per_request": {
            "portal": 5.0,
            "query": 20.0,
            "rules": 9.0,
            "score": 0.0,
            "oidc-provider": 0.0,
            "client": 4.0,
        },
    }
    lines = table({"pages": {"credit": page, "entry": {"skipped": "no resident has an entry"}}}).splitlines()
    assert lines[2].split()[:4] == ["credit", "20.0", "600", "2"]
    assert "40 / 90 / 120" in lines[2]
    assert "30 / 80 / -" in lines[2]
    assert lines[2].split()[-6:] == ["5.0", "20.0", "9.0", "0.0", "0.0", "4.0"]
    assert lines[3] == "entry      skipped: no resident has an entry"
