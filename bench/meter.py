"""What the benches measure a run with, so figures compare across runs on a shared, noisy
machine: the machine itself, CPU seconds per process (the figure that compares, where wall
time does not), the load average, the database server's CPU, bytes stored per table, a
service's own counters (its /metrics), and py-spy flame graphs of running processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    # The smallest rank with at least q% of the values at or below it.
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    ram_gib: float | None = None
    # Off Linux there is no /proc: the figures then say "unknown" rather than fail.
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def counter(admin_url: str, name: str, **labels: str) -> float:
    """The sum of a counter's series with `labels` on a service's admin port (`name` as
    PromQL names it, with `_total`)."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process `pid` (all its threads) so far, from
    /proc/PID/stat; 0.0 when it is gone or off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class ServerMeter:
    """CPU seconds a PostgreSQL server spends for one run: the backends connected to the run's
    own databases, plus the server's shared processes (checkpointer, WAL writer, background
    writer, autovacuum), found through pg_stat_activity and read from /proc (the server runs
    on this machine). Other clients' backends are left out; the shared processes serve them
    too, so a run still reports its figure beside the load average. A backend that ends
    within the run takes its CPU with it (services keep theirs in a pool for the run)."""

    def __init__(self, admin_url: str, databases: Sequence[str]) -> None:
        self._engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        self._databases = list(databases)
        self._start: dict[int, float] = {}

    def _processes(self) -> dict[int, float]:
        with self._engine.connect() as connection:
            pids = connection.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND (datname = ANY(:names) OR backend_type <> 'client backend')"
                ),
                {"names": self._databases},
            ).scalars()
            return {pid: cpu_seconds(pid) for pid in pids}

    def start(self) -> None:
        self._start = self._processes()

    def seconds(self) -> float:
        """CPU seconds since `start` of the processes running now."""
        return sum(now - self._start.get(pid, 0.0) for pid, now in self._processes().items())

    def close(self) -> None:
        self._engine.dispose()


def stored_bytes(url: str) -> dict[str, int]:
    """Bytes each table of a database holds, its indexes included: SQLite's pages per table
    and index (dbstat), or PostgreSQL's pg_total_relation_size. Free pages and the WAL are
    left out: they are reclaimable and depend on when the last checkpoint ran."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        assert path is not None
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            owners = dict(
                connection.execute(
                    "SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
                )
            )
            sizes: dict[str, int] = {}
            for name, size in connection.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
                table = owners.get(name, name)
                sizes[table] = sizes.get(table, 0) + int(size)
            return sizes
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT relname, pg_total_relation_size(relid) FROM pg_catalog.pg_statio_user_tables")
            )
            return {name: int(size) for name, size in rows}
    finally:
        engine.dispose()


def row_writes(url: str) -> dict[str, int]:
    """Rows a PostgreSQL database's tables took in (inserted, updated, deleted) and the
    transactions committed in it, from pg_stat_database. Backends report at exit at the
    latest: read it once the services have stopped."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                sa.text(
                    "SELECT tup_inserted, tup_updated, tup_deleted, xact_commit"
                    " FROM pg_catalog.pg_stat_database WHERE datname = current_database()"
                )
            ).one()
    finally:
        engine.dispose()
    return dict(zip(("inserted", "updated", "deleted", "commits"), (int(v) for v in row), strict=True))


class Profiler:
    """py-spy profiles of running processes: `start` attaches one recorder per process, `stop`
    interrupts them, and each writes DIRECTORY/NAME.svg (a flame graph; or speedscope JSON, or
    raw collapsed stacks to count frames in) when py-spy gets SIGINT."""

    # py-spy's output formats and the file extension each is written with.
    FORMATS = {"flamegraph": "svg", "speedscope": "speedscope.json", "raw": "txt"}

    def __init__(self, directory: Path, *, rate: int = 100, output_format: str = "flamegraph") -> None:
        executable = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(executable).exists():
            raise SystemExit("--profile needs py-spy: pip install py-spy (it is in the dev extras)")
        self._executable = executable
        self._directory = directory
        self._rate = rate
        self._format = output_format
        self._recorders: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, pids: Mapping[str, int]) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            output = self._output(name)
            command = [self._executable, "record", "--pid", str(pid), "--rate", str(self._rate)]
            command += ["--nonblocking", "--threads", "--format", self._format, "--output", str(output)]
            log = (self._directory / f"{name}.py-spy.log").open("wb")
            self._recorders[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _output(self, name: str) -> Path:
        return self._directory / f"{name}.{self.FORMATS[self._format]}"

    def stop(self) -> list[Path]:
        for recorder in self._recorders.values():
            with contextlib.suppress(ProcessLookupError):
                recorder.send_signal(signal.SIGINT)
        written = []
        for name, recorder in self._recorders.items():
            try:
                recorder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                recorder.kill()
            output = self._output(name)
            if output.exists():
                written.append(output)
        self._recorders.clear()
        return written
