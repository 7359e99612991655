"""A background backtest's progress: counted from any thread, read as a share."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from services.rules.backtest_job import MAX_ERROR_LENGTH, Progress, StoredJob, in_words

AT = datetime(2026, 12, 1, tzinfo=UTC)
JOB = StoredJob(
    row_id=1,
    backtest_id="b",
    rule_set_id=2,
    state="running",
    events_replayed=0,
    events_total=0,
    started_at=AT,
    heartbeat_at=AT,
    finished_at=None,
    started_by="reviewer",
    instance="rules-0",
    subject_key_id="k1",
    request=b"",
    report=None,
    error="",
)


def test_workers_progress_is_their_mean_and_never_passes_the_total() -> None:
    progress = Progress()
    progress.expect(100, workers=2)
    progress.reached(100, worker=0)
    progress.reached(40, worker=1)
    assert progress.replayed == 70
    progress.reached(130, worker=1)  # a batch committed after the count
    assert progress.replayed == 100


def test_one_replay_adds_up_its_pages() -> None:
    progress = Progress()
    progress.expect(10)
    progress.read(4)
    progress.read(3)
    assert progress.replayed == 7


def test_a_jobs_share_done() -> None:
    assert JOB.progress == 0.0  # nothing counted yet
    assert replace(JOB, events_replayed=25, events_total=100).progress == 0.25
    assert replace(JOB, state="succeeded").progress == 1.0  # an empty history is all done


def test_an_error_is_kept_in_words_and_short() -> None:
    assert in_words(RuntimeError("worker died")) == "worker died"
    assert in_words(TimeoutError()) == "TimeoutError"
    assert len(in_words(RuntimeError("x" * 10_000))) == MAX_ERROR_LENGTH
