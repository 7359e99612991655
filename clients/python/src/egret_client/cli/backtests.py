"""`egret rules backtest ID` and `egret rules backtests list|get|cancel`: a rule set's
backtest as a long-running operation on the rules service (docs/backtests.md).

StartBacktest answers at once with the job; the command then polls GetBacktest, showing
events replayed over events to replay on stderr, and prints the stored report. Nothing
lives in the client: `--detach` returns with the id, and `backtests get ID` reads the
job (and its report) again, or follows it with `--watch`. Ctrl-C on the command that
started a backtest asks the service to cancel it (CancelBacktest); Ctrl-C on a `--watch`
only stops watching. docs/cli-rules.md is the reference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any

import grpc
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from egret.rules.v1 import backtest_pb2 as bt
from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret_client.cli.common import State, fail, listing, pages, run, show, state, when, word
from egret_client.cli.documents import read_document, refused_in_place
from egret_client.cli.options import AllPages, PageSize, PageToken, instant, reflowed
from egret_client.cli.output import err, fields, out, table
from egret_client.connection import Connection
from egret_client.errors import error_report

app = typer.Typer(help="Backtests run in the background: list them, read one again, cancel one.")

# The exit code of a command stopped by Ctrl-C, as shells report SIGINT.
INTERRUPTED = 130
# CancelBacktest answers once the replay has stopped, waiting up to 30 s for it: more than
# the default deadline leaves it room.
CANCEL_DEADLINE_S = 45.0

_FINISHED = frozenset({bt.BACKTEST_STATE_SUCCEEDED, bt.BACKTEST_STATE_FAILED, bt.BACKTEST_STATE_CANCELLED})

# Not the profile's default purpose: the report's subjects are read only when asked for.
Purpose = Annotated[
    str,
    typer.Option(
        "--purpose",
        help="A purpose code (rule-backtest): lists the subjects the candidate moves most. The read"
        " is recorded in rules' audit log. Without it the report has no subjects.",
    ),
]
PurposeNote = Annotated[
    str, typer.Option("--purpose-note", help="A case or ticket number recorded with the purpose.")
]
Interval = Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between progress reads.")]
BacktestId = Annotated[str, typer.Argument(metavar="BACKTEST_ID", help="The id the backtest started with.")]


def state_word(value: int) -> str:
    return word(bt.BacktestState, value)


# -- following a job ---------------------------------------------------------------------------


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TimeElapsedColumn(),
        console=err,
    )


async def follow(
    rules: pb_grpc.RulesServiceAsyncStub, job: bt.BacktestJob, interval_s: float
) -> bt.BacktestJob:
    """Poll the job until it is finished, showing events replayed over events to replay."""
    with progress_bar() as bar:
        task = bar.add_task("", total=None)
        while True:
            bar.update(
                task,
                description=f"backtest {job.backtest_id} {state_word(job.state)}",
                total=job.events_total or None,
                completed=job.events_replayed,
            )
            if job.state in _FINISHED:
                return job
            await asyncio.sleep(interval_s)
            job = (await rules.GetBacktest(bt.GetBacktestRequest(backtest_id=job.backtest_id))).backtest


async def with_subjects(
    rules: pb_grpc.RulesServiceAsyncStub, job: bt.BacktestJob, purpose: str, note: str
) -> bt.BacktestJob:
    """The finished job read once more with the purpose, when one is stated: only such a
    read returns the report's subjects (and it is recorded), so polling states none."""
    if job.state != bt.BACKTEST_STATE_SUCCEEDED or not purpose:
        return job
    request = bt.GetBacktestRequest(backtest_id=job.backtest_id, purpose=purpose, purpose_note=note)
    return (await rules.GetBacktest(request)).backtest


def take_back_interrupt() -> None:
    """Ctrl-C reaches the coroutine as a cancellation of asyncio.run's task: take it back, so
    that the calls made in answer to it run and asyncio.run does not raise KeyboardInterrupt."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def stop_following(backtest_id: str) -> typer.Exit:
    """Ctrl-C while watching a backtest: stop watching it; it goes on."""
    take_back_interrupt()
    err.print(
        f"stopped following; backtest {backtest_id} goes on: egret rules backtests get {backtest_id} --watch",
        highlight=False,
    )
    return typer.Exit(INTERRUPTED)


async def cancel_interrupted(rules: pb_grpc.RulesServiceAsyncStub, backtest_id: str) -> typer.Exit:
    """Ctrl-C while following a backtest this command started: ask the service to cancel it
    (a finished one is refused: the refusal says so, and how to read it)."""
    take_back_interrupt()
    err.print(f"interrupted: cancelling backtest {backtest_id}", highlight=False)
    request = bt.CancelBacktestRequest(backtest_id=backtest_id)
    try:
        job = (await rules.CancelBacktest(request, timeout=CANCEL_DEADLINE_S)).backtest
    except grpc.aio.AioRpcError as exc:
        for line in error_report(exc).lines():
            err.print(line, highlight=False, markup=False)
        err.print(f"read it with: egret rules backtests get {backtest_id}", highlight=False)
        return typer.Exit(INTERRUPTED)
    err.print(
        f"backtest {backtest_id} {state_word(job.state)} by {job.cancelled_by} after "
        f"{job.events_replayed:,} of {job.events_total:,} events",
        highlight=False,
    )
    return typer.Exit(INTERRUPTED)


# -- the job and its report as tables ----------------------------------------------------------


def _scope(request: bt.BacktestRuleSetRequest) -> str:
    """Which history the backtest replays, in words."""
    bounds = [
        f"from {when(request.occurred_from)}" if request.HasField("occurred_from") else "",
        f"before {when(request.occurred_to)}" if request.HasField("occurred_to") else "",
    ]
    events = " ".join(["events occurred", *filter(None, bounds)]) if any(bounds) else "all stored events"
    share = (
        f"a {request.sample_fraction:g} sample of the subjects"
        if request.sample_fraction
        else "every subject"
    )
    return f"{events}, {share}"


def job_rows(job: bt.BacktestJob) -> list[tuple[str, Any]]:
    request = job.request
    purpose = request.purpose + (f" ({request.purpose_note})" if request.purpose_note else "")
    rows: list[tuple[str, Any]] = [
        ("backtest", job.backtest_id),
        ("rule set", job.rule_set_id),
        ("state", state_word(job.state)),
        ("progress", f"{job.events_replayed:,} of {job.events_total:,} events ({job.progress:.0%})"),
        ("scope", _scope(request)),
        ("purpose", purpose),
        ("started", f"{when(job.started_at)} by {job.started_by}"),
        ("finished", when(job.finished_at)),
        ("cancelled by", job.cancelled_by),
        ("error", job.error),
    ]
    return [(name, value) for name, value in rows if value != ""]


def _side(side: bt.BacktestedRuleSet) -> str:
    stored = f" (id {side.rule_set_id})" if side.rule_set_id else ""
    return f"{side.name} v{side.version}{stored}"


def _tier_moves(breakdown: bt.BacktestBreakdown) -> int:
    return sum(cell.subjects for cell in breakdown.migrations if cell.from_tier != cell.to_tier)


def _short(key: str) -> str:
    return key if len(key) <= 16 else key[:16] + "…"


def report_tables(report: bt.BacktestRuleSetResponse) -> None:
    """The report as people read it: overall, tier movement, score changes, the rules moving
    the most points, cohorts, and the subjects moved most when the read stated a purpose."""
    overall = report.overall
    fields(
        [
            ("candidate", _side(report.candidate)),
            ("baseline (active)", _side(report.baseline)),
            ("score policy", report.policy_version),
            ("scored as of", when(report.as_of)),
            ("events replayed", f"{report.events_replayed:,} in {report.batches_replayed:,} "
                                f"batch{'' if report.batches_replayed == 1 else 'es'}"),
            ("subjects", f"{overall.subjects:,}"),
            ("subjects changed", f"{overall.subjects_changed:,}"),
            ("tier moves", f"{_tier_moves(overall):,}"),
            ("events failing", f"baseline {report.baseline_failed_events:,}, "
                               f"candidate {report.candidate_failed_events:,}"),
            ("elapsed", f"{report.elapsed_seconds:.1f} s"),
        ],
        title="Overall",
    )  # fmt: skip
    table(
        ("baseline tier", "candidate tier", "subjects", ""),
        ((m.from_tier, m.to_tier, f"{m.subjects:,}", "" if m.from_tier == m.to_tier else "moved")
         for m in overall.migrations),
        title="Tier movement",
    )  # fmt: skip
    table(
        ("score change", "subjects"),
        ((bucket.label, f"{bucket.subjects:,}") for bucket in overall.score_changes),
        title="Score changes",
    )
    if overall.rules:
        table(
            ("rule", "firings before", "firings after", "points before", "points after", "points moved"),
            ((r.rule_id, r.baseline_firings, r.candidate_firings, r.baseline_points, r.candidate_points,
              f"{r.points_moved:+d}") for r in overall.rules),
            title="Rules moving the most points",
        )  # fmt: skip
    table(
        ("cohort", "value", "subjects", "changed", "tier moves"),
        ((c.dimension, c.value or "(none)", f"{c.breakdown.subjects:,}", f"{c.breakdown.subjects_changed:,}",
          f"{_tier_moves(c.breakdown):,}") for c in report.cohorts),
        title="Per cohort",
    )  # fmt: skip
    if report.subjects:
        table(
            ("subject key", "kind", "score before", "tier before", "score after", "tier after", "change"),
            ((_short(s.subject_key), s.subject_kind, s.baseline_score, s.baseline_tier, s.candidate_score,
              s.candidate_tier, f"{s.candidate_score - s.baseline_score:+d}") for s in report.subjects),
            title="Subjects moved most (pseudonymous keys, in full with -o json)",
        )  # fmt: skip


def show_job(settings: State, job: bt.BacktestJob) -> None:
    """The job as JSON/YAML, or its fields and, once it succeeded, its report as tables; a
    job that failed or was cancelled then exits 1."""

    def draw() -> None:
        fields(job_rows(job), title="Backtest")
        if job.HasField("report"):
            report_tables(job.report)

    show(settings.output, job, draw)
    if job.state in (bt.BACKTEST_STATE_FAILED, bt.BACKTEST_STATE_CANCELLED):
        reason = job.error or f"cancelled by {job.cancelled_by}"
        raise fail(f"backtest {job.backtest_id} {state_word(job.state)}: {reason}")


# -- the commands ------------------------------------------------------------------------------


@reflowed
def start(
    ctx: typer.Context,
    candidate: Annotated[
        str,
        typer.Argument(
            metavar="ID|FILE",
            help="The candidate: a stored draft or version (egret rules list), or a rule-set file, "
            "stored as a draft first.",
        ),
    ],
    *,
    occurred_from: Annotated[
        str | None,
        typer.Option("--from", help="Replay events that occurred at or after this instant (ISO 8601)."),
    ] = None,
    occurred_to: Annotated[
        str | None, typer.Option("--to", help="Replay events that occurred before this instant.")
    ] = None,
    sample: Annotated[
        float, typer.Option("--sample", min=0.0, max=1.0, help="Share of subjects to replay; 0: all.")
    ] = 0.0,
    rule_limit: Annotated[int, typer.Option("--rules", min=0, help="Most rules listed; 0: 20.")] = 0,
    subject_limit: Annotated[
        int, typer.Option("--subjects", min=0, help="Most subjects listed, with --purpose.")
    ] = 20,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Score as of this instant; default: now.")
    ] = None,
    purpose: Purpose = "",
    purpose_note: PurposeNote = "",
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Print the backtest's id and return at once.")
    ] = False,
    interval: Interval = 1.0,
) -> None:
    """Backtest a candidate rule set: how scores and tiers would move if it were active.

    The rules service replays the stored history through the candidate and the active rule
    set in the background (StartBacktest); the command shows its progress on stderr, then
    the report as tables. Ctrl-C cancels the backtest (CancelBacktest). With --detach it
    prints the backtest's id and returns; egret rules backtests get ID reads it later.
    Given a FILE, it stores the file as a draft first (CreateDraft) and backtests that.
    """
    source = None if candidate.isdigit() else read_document(candidate)
    request = bt.BacktestRuleSetRequest(
        rule_set_id=int(candidate) if source is None else 0,
        occurred_from=instant(occurred_from, "--from"),
        occurred_to=instant(occurred_to, "--to"),
        sample_fraction=sample,
        rule_limit=rule_limit,
        subject_limit=subject_limit if purpose else 0,
        as_of=instant(as_of),
        purpose=purpose,
        purpose_note=purpose_note,
    )

    async def work(egret: Connection, settings: State) -> bt.BacktestJob:
        if source is not None:
            call = egret.rules.CreateDraft(pb.CreateDraftRequest(source=source))
            drafted = await refused_in_place(call, source, candidate, "source")
            request.rule_set_id = drafted.rule_set.rule_set_id
            err.print(f"{candidate} stored as draft {request.rule_set_id}", highlight=False)
        job = (await egret.rules.StartBacktest(bt.StartBacktestRequest(backtest=request))).backtest
        err.print(f"backtest {job.backtest_id} started for rule set {request.rule_set_id}", highlight=False)
        if detach:
            return job
        try:
            job = await follow(egret.rules, job, interval)
        except asyncio.CancelledError:
            raise await cancel_interrupted(egret.rules, job.backtest_id) from None
        return await with_subjects(egret.rules, job, purpose, purpose_note)

    job = run(ctx, work)
    settings = state(ctx)
    if detach:
        err.print(f"follow it with: egret rules backtests get {job.backtest_id} --watch", highlight=False)
        show(settings.output, job, lambda: out.print(job.backtest_id, highlight=False))
        return
    show_job(settings, job)


@app.command("get")
@reflowed
def get(
    ctx: typer.Context,
    backtest_id: BacktestId,
    *,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow it with a progress bar until it is finished.")
    ] = False,
    purpose: Purpose = "",
    purpose_note: PurposeNote = "",
    interval: Interval = 1.0,
) -> None:
    """A backtest's state and progress and, once it succeeded, its stored report.

    The report lists subjects only when the backtest's start and this read both state a
    purpose. With --watch the command follows the backtest until it is finished; Ctrl-C
    then stops watching and leaves the backtest running.
    """

    async def work(egret: Connection, settings: State) -> bt.BacktestJob:
        job = (await egret.rules.GetBacktest(bt.GetBacktestRequest(backtest_id=backtest_id))).backtest
        if watch and job.state not in _FINISHED:
            err.print(f"watching backtest {backtest_id}; Ctrl-C stops watching, it goes on", highlight=False)
            try:
                job = await follow(egret.rules, job, interval)
            except asyncio.CancelledError:
                raise stop_following(backtest_id) from None
        return await with_subjects(egret.rules, job, purpose, purpose_note)

    show_job(state(ctx), run(ctx, work))


@app.command("list")
@reflowed
def list_backtests(
    ctx: typer.Context,
    *,
    rule_set_id: Annotated[int, typer.Option("--rule-set", help="Only the backtests of this candidate.")] = 0,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
) -> None:
    """Stored backtests, newest first, without their reports."""

    async def work(egret: Connection, settings: State) -> bt.ListBacktestsResponse:
        def page(token: str) -> Awaitable[bt.ListBacktestsResponse]:
            request = bt.ListBacktestsRequest(rule_set_id=rule_set_id, page_size=page_size, page_token=token)
            return egret.rules.ListBacktests(request)

        return await pages(page, page_token, all_pages)

    answer = run(ctx, work)
    listing(
        ctx,
        answer,
        ("backtest", "rule set", "state", "progress", "started", "started by", "finished"),
        (
            (j.backtest_id, j.rule_set_id, state_word(j.state), f"{j.progress:.0%}", when(j.started_at),
             j.started_by, when(j.finished_at))
            for j in answer.backtests
        ),
    )  # fmt: skip


@app.command("cancel")
@reflowed
def cancel(ctx: typer.Context, backtest_id: BacktestId) -> None:
    """Stop a queued or running backtest; its progress is kept, no report is stored.

    A reviewer cancels the backtests it started, an admin any. Cancelling a cancelled
    backtest changes nothing; a finished one is refused.
    """

    async def work(egret: Connection, settings: State) -> bt.CancelBacktestResponse:
        request = bt.CancelBacktestRequest(backtest_id=backtest_id)
        return await egret.rules.CancelBacktest(request, timeout=CANCEL_DEADLINE_S)

    answer = run(ctx, work)
    show(state(ctx).output, answer, lambda: fields(job_rows(answer.backtest), title="Backtest"))
