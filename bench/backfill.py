"""Backfill benchmark: `egret submit` of a large JSON Lines file against a local cluster.

    python -m bench.backfill [--events N] [--skip-invalid] [--no-drain] [--json PATH]

Generates N events of one department (devtools/population.py with the catalogue cut to
that department's event types: 2% resends of earlier events, 3% late arrivals) into a
JSON Lines file, starts the four services as processes (devtools/cluster.py, SQLite,
TLS and tokens, no rate limit), writes a client profile for the department and runs the
installed `egret submit FILE -o json` as a person would, then waits until the pipeline
has drained (every accepted event in the ledger). It reports:

- the CLI's wall time and its phases: checking every record with ingest's validator
  (validate_only) and sending (first batch sent until the last acknowledgement);
- events/s: records of the file per second of the whole command, and sent events per
  second of the sending phase (the figure `egret submit` prints);
- CPU seconds per event of the CLI process (user + system, from wait4), and each
  service's CPU seconds over the run;
- end to end: from starting the CLI until both outboxes are empty;
- the load average before and after, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from bench.meter import cpu_seconds, load_average, machine
from devtools.client_config import Identity, write_client_config
from devtools.cluster import UNLIMITED, Cluster
from devtools.population import DEFAULT_CATALOGUE, Population, PopulationConfig, subjects_for_events
from domain.catalogue import load_catalogue
from kit.principal import Role

EGRET = Path(sys.executable).with_name("egret")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the file (default 1000000)")
    parser.add_argument("--department", default="library", help="the submitting department (default library)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=4, help="batches awaiting acknowledgement")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="send without the checking pass (egret submit --skip-invalid)",
    )
    parser.add_argument("--no-drain", action="store_true", help="stop when the CLI is done")
    parser.add_argument("--drain-timeout", type=float, default=3600.0)
    parser.add_argument(
        "--data-dir", type=Path, help="the file, logs and SQLite files (default: a temporary directory)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be at least 1")
    return args


def write_events(path: Path, department: str, events: int, seed: int) -> int:
    """The department's share of a synthetic city as JSON Lines; returns the lines written."""
    catalogue = load_catalogue(DEFAULT_CATALOGUE)
    own = {name: t for name, t in catalogue.event_types.items() if department in t.departments}
    if not own:
        raise SystemExit(f"the catalogue has no event types of {department!r}")
    kinds = {kind for t in own.values() for kind in t.subject_kinds}
    config = PopulationConfig(
        subjects=subjects_for_events(events),
        seed=seed,
        now=datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
        max_events=events,
        person_fraction=1.0 if kinds == {"person"} else 0.0 if kinds == {"organization"} else 0.9,
    )
    population = Population(config, replace(catalogue, event_types=own))
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        for item in population.generate():
            record = MessageToDict(item.event, preserving_proto_field_name=True)
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
            written += 1
    return written


def run_cli(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str, str, int]:
    """Run the CLI; (wall seconds, CPU seconds, stdout, stderr, exit code)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return (
            wall,
            usage.ru_utime + usage.ru_stime,
            out.read().decode(),
            err.read().decode(),
            process.returncode,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    figures: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.backfill", *sys.argv[1:]]),
        "machine": machine(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"command: {figures['command']}")
    m = figures["machine"]
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram_gib']} GiB RAM, Python {m['python']}")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="egret-backfill-"))
    data_dir.mkdir(parents=True, exist_ok=True)

    path = data_dir / "backfill.jsonl"
    print(f"writing {args.events:,} events of {args.department} to {path} ...")
    started = time.perf_counter()
    records = write_events(path, args.department, args.events, args.seed)
    figures["file"] = {
        "records": records,
        "mib": round(path.stat().st_size / 2**20, 1),
        "generated_s": round(time.perf_counter() - started, 1),
    }

    cluster = Cluster(data_dir / "cluster", log_level="warning", env=UNLIMITED)
    try:
        cluster.start()
        config = write_client_config(
            cluster, data_dir / "client", [Identity("department", Role.DEPARTMENT, args.department)]
        )
        command = [
            str(EGRET), "-p", "department", "submit", path.name, "-o", "json",
            "--batch-size", str(args.batch_size), "--in-flight", str(args.in_flight),
            *(["--skip-invalid"] if args.skip_invalid else []),
        ]  # fmt: skip
        env = {**os.environ, "EGRET_CONFIG": str(config), "NO_COLOR": "1"}
        pids = {name: cluster.pid(name) for name in cluster.services}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        figures["load_average_before"] = load_average()
        print(f"cluster up; load average {figures['load_average_before']}; running: {shlex.join(command)}")
        started = time.perf_counter()
        wall, cpu, stdout, stderr, code = run_cli(command, env, data_dir)
        figures["load_average_after_cli"] = load_average()
        if code != 0:
            print(stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"egret submit exited {code}")
        if not args.no_drain:
            cluster.wait_drained(args.drain_timeout)
            figures["end_to_end_s"] = round(time.perf_counter() - started, 1)
            figures["end_to_end_events_per_s"] = round(records / (time.perf_counter() - started), 1)
        figures["service_cpu_s"] = {
            name: round(cpu_seconds(pid) - cpu_before[name], 1) for name, pid in pids.items()
        }
        figures["load_average_after"] = load_average()
    finally:
        cluster.stop()

    (summary,) = json.loads(stdout)["files"]
    sending = float(summary["seconds"])
    figures["summary"] = summary
    figures["cli"] = {
        "wall_s": round(wall, 1),
        "check_s": round(wall - sending, 1) if not args.skip_invalid else 0.0,
        "send_s": round(sending, 1),
        "cpu_s": round(cpu, 1),
        "cpu_ms_per_event": round(cpu / records * 1000, 3),
        "records_per_s": round(records / wall, 1),
        "send_events_per_s": summary["events_per_s"],
    }
    c = figures["cli"]
    print(
        f"\nrecords {summary['records']:,}: accepted {summary['accepted']:,}, duplicate "
        f"{summary['duplicate']:,}, rejected {summary['rejected']:,}, conflict {summary['conflict']:,}"
    )
    print(f"egret submit:   {c['wall_s']} s wall (check {c['check_s']} s, send {c['send_s']} s)")
    print(f"file:           {c['records_per_s']:>10,.0f} records/s over the whole command")
    print(f"sending:        {c['send_events_per_s']:>10,.0f} events/s (first batch → last acknowledgement)")
    print(f"CLI CPU:        {c['cpu_s']} s, {c['cpu_ms_per_event']} ms per event")
    if "end_to_end_s" in figures:
        rate, seconds = figures["end_to_end_events_per_s"], figures["end_to_end_s"]
        print(f"end to end:     {rate:>10,.0f} events/s ({seconds} s, CLI start → drained)")
    print(f"services' CPU:  {figures['service_cpu_s']}")
    print(f"load average:   {figures['load_average_before']} → {figures['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
