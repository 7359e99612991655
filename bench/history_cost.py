"""CPU per ListScoreHistory call with `as_corrected` for one subject with a large ledger:
the corrected timeline computed incrementally (services.query.corrected.corrected_history,
what the call runs) against its definition, every instant scored from scratch
(corrected_history_by_definition, what the call ran before). Both compute the same rows
(checked here on every run); the figure is process CPU seconds per call, which the call
pays again for every page. The ledger's database read is not included.

    .venv/bin/python -m bench.history_cost --entries 1000 10000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from bench.meter import load_average, machine
from domain.entries import DISPUTE, REPAIR, EntryStatus, Pause, ScoredEntry
from domain.policy import ActivatedPolicy, PolicyBook, load_policy
from services.query.corrected import corrected_history, corrected_history_by_definition

POLICY_FILE = Path(__file__).parents[1] / "config" / "policy.yaml"
START = datetime(2016, 1, 1, tzinfo=UTC)


def ledger(entries: int, seed: int) -> list[ScoredEntry]:
    """A long-lived subject: `entries` events spread over ten years, a few disputed or repaired."""
    rng = random.Random(seed)
    span_s = 10 * 365 * 86_400
    built = []
    for i in range(entries):
        occurred = START + timedelta(seconds=rng.randrange(span_s))
        severity = rng.choice(("positive", "positive", "minor", "general", "serious"))
        pauses: tuple[Pause, ...] = ()
        if rng.random() < 0.05:
            start = occurred + timedelta(days=rng.randrange(10, 200))
            pauses = (Pause(start, start + timedelta(days=rng.randrange(1, 30)), False, DISPUTE, str(i)),)
        elif severity != "positive" and rng.random() < 0.03:
            pauses = (Pause(occurred + timedelta(days=rng.randrange(90, 400)), None, False, REPAIR, str(i)),)
        built.append(
            ScoredEntry(
                entry_id=f"entry-{i:06d}",
                points=rng.choice((2, 5, 10)) if severity == "positive" else -rng.choice((5, 10, 30, 100)),
                category=rng.choice(("transport", "library", "tax", "utilities", "volunteering")),
                severity=severity,
                status=EntryStatus.ACTIVE,
                occurred_at=occurred,
                recorded_at=occurred + timedelta(hours=rng.randrange(0, 72)),
                pauses=pauses,
            )
        )
    return built


def cpu_per_call(run: Callable[[], Any], calls: int) -> tuple[float, Any]:
    started = time.process_time()
    for _ in range(calls):
        result = run()
    return (time.process_time() - started) / calls, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, nargs="+", default=[1000, 10000], help="ledger sizes")
    parser.add_argument("--calls", type=int, default=5, help="calls timed per size (incremental)")
    parser.add_argument("--definition-calls", type=int, default=1, help="calls timed per size (definition)")
    parser.add_argument(
        "--skip-definition", action="store_true", help="time only the incremental computation"
    )
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    book = PolicyBook((ActivatedPolicy(load_policy(POLICY_FILE), START - timedelta(days=1), "bench", ""),))
    until = START + timedelta(days=10 * 365 + 30)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join([sys.executable, *sys.argv])}
    print(f"machine: {report['machine']}")
    print(f"command: {report['command']}")
    print(f"load average before: {load_average()}")
    figures = []
    for size in args.entries:
        entries = ledger(size, args.seed)
        new_s, rows = cpu_per_call(partial(corrected_history, entries, book, "person", until), args.calls)
        line = {"entries": size, "rows": len(rows), "incremental_cpu_s": round(new_s, 4)}
        if not args.skip_definition:
            old_s, old_rows = cpu_per_call(
                partial(corrected_history_by_definition, entries, book, "person", until),
                args.definition_calls,
            )
            if old_rows != rows:
                print(f"MISMATCH at {size} entries: the incremental rows differ from the definition's")
                return 1
            line |= {"definition_cpu_s": round(old_s, 3), "speed-up": round(old_s / new_s, 1)}
        line["load_average"] = load_average()
        figures.append(line)
        print(json.dumps(line))
    report["figures"] = figures
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
