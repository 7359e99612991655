"""A backtest run in the background (pure): its stored record, its states and its progress.

QUEUED (accepted) → RUNNING (replaying) → SUCCEEDED (report stored) or FAILED (error
stored), or CANCELLED (CancelBacktest) from either unfinished state. A job whose instance
died cannot finish: the instance fails its own unfinished jobs when it starts again, and
any instance reading a job whose heartbeat stopped fails it then (docs/backtests.md,
"Background backtests").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, TypeAlias

from kit.errors import FailedPrecondition, PermissionDenied

JobState: TypeAlias = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UNFINISHED: Final[tuple[JobState, ...]] = ("queued", "running")

INTERRUPTED: Final = "interrupted by a restart of the instance"
# A running job writes its progress at most this often, and its heartbeat at least every
# HEARTBEAT; one whose heartbeat is older than STALE_AFTER is taken for dead.
PROGRESS_INTERVAL: Final = timedelta(seconds=1)
HEARTBEAT: Final = timedelta(seconds=15)
STALE_AFTER: Final = timedelta(minutes=2)
# An error is stored in words, not with a worker's whole traceback.
MAX_ERROR_LENGTH: Final = 2000
# CancelBacktest waits this long for the replay to stop (one page on the engine thread,
# or the workers' exit) before it answers: a step that cannot be interrupted (scoring
# every subject at the end of a large replay) may hold the slot a little longer.
CANCEL_WAIT: Final = timedelta(seconds=30)


@dataclass(frozen=True)
class StoredJob:
    """A job as stored; ``request`` and ``report`` are serialized BacktestRuleSetRequest
    and BacktestRuleSetResponse (``report`` None until it succeeded, or when not loaded)."""

    row_id: int
    backtest_id: str
    rule_set_id: int
    state: JobState
    events_replayed: int
    events_total: int
    started_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    started_by: str
    instance: str
    subject_key_id: str
    request: bytes
    report: bytes | None
    error: str
    cancelled_by: str = ""

    @property
    def progress(self) -> float:
        if self.state == "succeeded":
            return 1.0
        if self.events_total <= 0:
            return 0.0
        return min(1.0, self.events_replayed / self.events_total)


class Progress:
    """Stored events a replay has read, counted by whoever reads them (the engine thread,
    or the threads receiving from worker processes) and read from the event loop.

    With several workers each reads every stored event (skipping other workers'
    subjects), so the events replayed are the workers' mean."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[int, int] = {}
        self._workers = 1
        self.total = 0

    def expect(self, total: int, *, workers: int = 1) -> None:
        with self._lock:
            self.total = total
            self._workers = max(1, workers)

    def read(self, rows: int, *, worker: int = 0) -> None:
        """``rows`` more stored events read by ``worker``."""
        with self._lock:
            self._read[worker] = self._read.get(worker, 0) + rows

    def reached(self, rows: int, *, worker: int) -> None:
        """``worker`` has read ``rows`` stored events so far."""
        with self._lock:
            self._read[worker] = rows

    @property
    def replayed(self) -> int:
        with self._lock:
            # Batches committed between the count and the replay's read may add a few.
            return min(self.total, sum(self._read.values()) // self._workers)


def cancels(job: StoredJob, *, by: str, any_job: bool) -> bool:
    """Whether cancelling ``job`` for ``by`` changes it: False when it is cancelled already
    (the call answers it unchanged). Only its starter, or anyone when ``any_job`` (an
    admin), may cancel it (PERMISSION_DENIED); a job that succeeded or failed can no longer
    be (FAILED_PRECONDITION)."""
    if not any_job and job.started_by != by:
        raise PermissionDenied("a backtest is cancelled by whoever started it, or by an admin")
    if job.state == "cancelled":
        return False
    if job.state not in UNFINISHED:
        raise FailedPrecondition(
            f"the backtest {job.state} already; only a queued or running one can be cancelled",
            reason="BACKTEST_FINISHED",
            metadata={"state": job.state},
        )
    return True


def in_words(error: BaseException) -> str:
    """What a failed job stores as its error."""
    text = str(error).strip() or type(error).__name__
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text
