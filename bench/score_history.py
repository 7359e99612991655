"""CPU and ledger rows read per applied outcome as subjects' histories grow: N batches to the
same subjects through score's `Ledger` on a SQLite store, the clock moving on between
batches, once reading only the live part of each ledger (services/score/live.py) and once
the whole ledger (what every batch did before). Prints one line per tenth of the batches;
both runs must end with the same score rows and history, and `verify` with 0 mismatches.

    .venv/bin/python -m bench.score_history --subjects 1000 --batches 100
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.meter import load_average, machine
from contracts.score_store import StoredHistory, StoredScore
from domain.entries import RuleRef
from domain.intake import IncomingOutcome
from domain.policy import ActivatedPolicy, PolicyBook, load_policy
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.migrations import upgrade
from kit.settings import SqliteTuning
from services.score.bootstrap import MIGRATIONS
from services.score.ledger import Ledger
from services.score.stores.ledger import SqlLedgerStore
from services.score.stores.policies import SqlPolicyStore

POLICY_FILE = Path(__file__).parents[1] / "config" / "policy.yaml"
START = datetime(2020, 1, 1, tzinfo=UTC)
CATEGORIES = ("transport", "library", "tax", "utilities", "volunteering")
SEVERITIES = ("positive", "positive", "positive", "minor", "general", "serious")


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _outcome(rng: random.Random, subject: int, batch: int, now: datetime) -> IncomingOutcome:
    severity = rng.choice(SEVERITIES)
    points = rng.choice((5, 10, 20)) if severity == "positive" else -rng.choice((5, 10, 30))
    # Mostly recent events; one in twenty arrives up to 60 days late.
    late = rng.random() < 0.05
    occurred = now - timedelta(days=rng.uniform(1, 60) if late else rng.uniform(0, 1))
    return IncomingOutcome(
        # Hexadecimal, as rules' outcome ids and subject keys are (score stores them as bytes).
        outcome_id=f"{batch:06d}{subject:06d}",
        subject_key=f"{subject:064x}",
        subject_kind="person",
        rule=RuleRef("r", "bench", 1),
        points=points,
        category=rng.choice(CATEGORIES),
        severity=severity,
        occurred_at=occurred.replace(microsecond=0),
        reason="bench",
        black_list=False,
        snapshot=b"",
    )


def run(
    path: Path, *, whole: bool, subjects: int, batches: int, step: timedelta, seed: int
) -> tuple[list[dict[str, Any]], Ledger, sa.Engine]:
    engine = create_engine(f"sqlite:///{path}", sqlite=SqliteTuning(synchronous="OFF"))
    upgrade(engine, MIGRATIONS, "score_alembic_version")
    sessions = make_session_factory(engine)
    store = SqlLedgerStore(sessions, audit_keys=audit.UNKEYED, key_id="k1", whole_ledger=whole)
    clock = _Clock(START)
    book = PolicyBook((ActivatedPolicy(load_policy(POLICY_FILE), START - timedelta(days=1), "bench", ""),))
    ledger = Ledger(
        policies=book,
        store=store,
        policy_store=SqlPolicyStore(sessions, audit_keys=audit.UNKEYED),
        clock=clock,
    )
    rng = random.Random(seed)
    tenth = max(1, batches // 10)
    lines: list[dict[str, Any]] = []
    cpu = applied = 0.0
    read_before = 0
    for batch in range(batches):
        clock.now = START + step * batch
        outcomes = [_outcome(rng, s, batch, clock.now) for s in range(subjects)]
        started = time.process_time()
        result = ledger.apply(outcomes)
        cpu += time.process_time() - started
        applied += result.applied
        if (batch + 1) % tenth == 0:
            lines.append(
                {
                    "read": "whole" if whole else "live",
                    "batches": batch + 1,
                    "entries_per_subject": batch + 1,
                    "cpu_us_per_outcome": round(cpu / applied * 1e6, 1),
                    "rows_read_per_outcome": round((store.entries_read - read_before) / applied, 1),
                    "live_parts": store.live_parts,
                }
            )
            print(json.dumps(lines[-1]), flush=True)
            cpu = applied = 0.0
            read_before = store.entries_read
    return lines, ledger, engine


def _rows(engine: sa.Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as connection:
        scores = connection.execute(sa.select(StoredScore).order_by(StoredScore.subject_key)).all()
        history = connection.execute(sa.select(StoredHistory).order_by(StoredHistory.history_id)).all()
    return [tuple(r)[:-1] for r in scores], [tuple(r)[1:] for r in history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--step-days", type=float, default=30.0, help="clock step between batches")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join([sys.executable, *sys.argv])}
    print(f"machine: {report['machine']}")
    print(f"command: {report['command']}")
    print(f"load average before: {load_average()}")
    step = timedelta(days=args.step_days)
    with tempfile.TemporaryDirectory() as directory:
        runs = {}
        for name, whole in (("live", False), ("whole", True)):
            lines, ledger, engine = run(
                Path(directory) / f"{name}.db",
                whole=whole,
                subjects=args.subjects,
                batches=args.batches,
                step=step,
                seed=args.seed,
            )
            verified = ledger.verify(max_mismatches=5)
            runs[name] = {"tenths": lines, "mismatches": verified.mismatch_count}
            report[name] = runs[name]
            print(f"{name}: verify mismatches {verified.mismatch_count} of {verified.subjects_checked}")
            runs[name]["rows"] = _rows(engine)
            engine.dispose()
        same = runs["live"].pop("rows") == runs["whole"].pop("rows")
    print(f"score rows and history identical: {same}")
    report["identical"] = same
    report["load_average_after"] = load_average()
    print(f"load average after: {report['load_average_after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if same and all(r["mismatches"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
