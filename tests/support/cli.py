"""Running the installed `egret` command as a person does (a process per command, output and
exit code checked) and the helpers the CLI's end-to-end tests share: reading its tables,
putting history in through ingest's raw API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from devtools.cluster import Cluster
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from tests.support.events import event, resident_id

# A valid resident id (check character included) for the subject profile.
RESIDENT_ID = "11010519491231002X"
EGRET = str(Path(sys.executable).with_name("egret"))


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass(frozen=True)
class Egret:
    """Runs `egret --config <the cluster's config> ARGS…`."""

    config: Path
    cluster: Cluster
    cwd: Path

    def __call__(self, *args: str, input_text: str | None = None, timeout_s: float = 120.0) -> Result:
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "EGRET_CONFIG": str(self.config)}
        env.pop("EGRET_PROFILE", None)
        done = subprocess.run(
            [EGRET, *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=self.cwd,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)


DAY = datetime.now(UTC).replace(microsecond=0)


def late_returns(
    *days_ago: int, subject_id: str = RESIDENT_ID, prefix: str = "late"
) -> list[ingest_pb.Event]:
    """Library books returned 40 days late (-3 civic, minor: repairable at once), `days_ago`."""
    return [
        event(f"{prefix}-{n}", "library.book_returned_late", subject_id, {"days_late": 40},
              occurred_at=DAY - timedelta(days=ago))
        for n, ago in enumerate(days_ago)
    ]  # fmt: skip


def submit_as_library(cluster: Cluster, events: list[ingest_pb.Event]) -> None:
    """Submit through ingest's raw API as the library, then wait for the pipeline to drain."""

    async def submit() -> ingest_pb.SubmitEventsResponse:
        async with cluster.department_channel("library") as channel:
            request = ingest_pb.SubmitEventsRequest(source="library", events=events)
            return await ingest_grpc.IngestServiceStub(channel).SubmitEvents(request, timeout=10)

    response = asyncio.run(submit())
    assert response.counts.accepted == len(events), response
    cluster.wait_drained(timeout_s=60)


def rows(stdout: str) -> list[list[str]]:
    """The cells of every row of the tables printed (Rich's `│` between columns)."""
    return [[cell.strip() for cell in line.split("│")] for line in stdout.splitlines() if "│" in line]


def record(stdout: str) -> dict[str, str]:
    """A `field │ value` table as a mapping (the first occurrence of each field)."""
    found: dict[str, str] = {}
    for cells in rows(stdout):
        if len(cells) == 2:
            found.setdefault(cells[0], cells[1])
    return found


def spawn(egret: Egret, *args: str, **options: Any) -> subprocess.Popen[str]:
    """`egret ARGS…` as a process the test can signal or talk to (Egret's own call waits)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "EGRET_CONFIG": str(egret.config)}
    env.pop("EGRET_PROFILE", None)
    with interruptible_children():
        return subprocess.Popen([EGRET, *args], text=True, env=env, cwd=egret.cwd, **options)


@contextmanager
def interruptible_children() -> Iterator[None]:
    """Children started meanwhile get SIGINT at its default, as a command typed at a terminal
    does. A shell starts a background job with SIGINT ignored (POSIX), its children inherit
    that, and Ctrl-C then never reaches them: a suite run with `&` lost every test SIGINT.
    A caught signal is reset to its default on exec, so catching it here for the moment of
    the fork is enough."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def late_residents(egret: Egret, count: int) -> None:
    """`count` residents who each returned a book 40 days late yesterday (-3 under the
    sample rule set: 997, tier A), submitted as the library."""
    history = [
        event
        for n in range(count)
        for event in late_returns(1, subject_id=resident_id(7000 + n), prefix=f"history-{n}")
    ]
    submit_as_library(egret.cluster, history)


def ingest_rows(egret: Egret, sql: str, **params: str) -> list[tuple[Any, ...]]:
    """The rows of a query on ingest's own database (what it really stored)."""
    engine = sa.create_engine(egret.cluster.database_url("ingest"))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql), params)]
    finally:
        engine.dispose()
