"""What the score service tells Prometheus (kit.metrics): outcomes applied and reversals, subjects
by tier, and the due-process queues (disputes open and past their deadline, repair decisions
overdue). Tiers and queues are counted periodically (kit.metrics.refreshing), never per read.

Labels: tiers and subject kinds of the policy, nothing about a subject.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from kit.metrics import Reading, gauge, meter
from services.score.ledger import ApplyResult
from services.score.stores.due_process import SqlDueProcessStore
from services.score.stores.ledger import SqlLedgerStore

_meter = meter("egret.score")
_applied = _meter.create_counter(
    "egret.score.outcomes.applied", unit="{outcome}", description="Outcomes written to the ledger"
)
_reversals = _meter.create_counter(
    "egret.score.reversals",
    unit="{entry}",
    description="Ledger entries reversed (retractions, supersessions)",
)


def batch_applied(result: ApplyResult) -> None:
    if result.applied:
        _applied.add(result.applied)
    if result.reversed:
        _reversals.add(result.reversed)


class ScoreGauges:
    """Subjects by tier and the due-process queues, as of the last `refresh`."""

    def __init__(
        self, ledger: SqlLedgerStore, due_process: SqlDueProcessStore, clock: Callable[[], datetime]
    ) -> None:
        self._ledger = ledger
        self._due_process = due_process
        self._clock = clock
        self._tiers: dict[tuple[str, str], int] | None = None
        self._queues: tuple[int, int, int] | None = None
        for counter in (_applied, _reversals):
            counter.add(0)  # exported from the start, not from the first batch
        gauge(
            _meter, "egret.score.subjects", self._subjects, unit="{subject}", description="Subjects by tier"
        )
        for index, (name, description) in enumerate(
            (
                ("egret.score.disputes.open", "Disputes waiting for a decision"),
                ("egret.score.disputes.overdue", "Disputes open past their deadline"),
                ("egret.score.repairs.overdue", "Repair applications past their decision date"),
            )
        ):
            gauge(_meter, name, self._queue(index), unit="{case}", description=description)

    def _subjects(self) -> Reading:
        if self._tiers is None:
            return None
        return {(("tier", tier), ("subject_kind", kind)): float(n) for (tier, kind), n in self._tiers.items()}

    def _queue(self, index: int) -> Callable[[], Reading]:
        def read() -> Reading:
            return None if self._queues is None else float(self._queues[index])

        return read

    def refresh(self) -> None:
        self._tiers = self._ledger.tier_counts()
        self._queues = self._due_process.queue_counts(self._clock())
