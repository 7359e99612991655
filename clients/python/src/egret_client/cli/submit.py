"""`egret submit FILE…`: a department's events from JSON Lines or CSV files, checked by
ingest's own validator first, then streamed with a progress bar, resumable from a
checkpoint (egret_client.backfill does the work; this module talks to the person)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import grpc
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from egret_client.backfill import EventFile, Rejection, submit_file, validate_file
from egret_client.checkpoint import Checkpoint, CheckpointMismatch, Counts, Identity, file_sha256
from egret_client.cli.common import Exit, State, fail, run
from egret_client.cli.output import Format, emit, err
from egret_client.connection import Connection
from egret_client.eventfiles import FileError, FileFormat, catalogue_types, format_of
from egret_client.submitter import StreamFailed
from egret_client.tokens import token_source

HELP = """Submit events from JSON Lines or CSV files, as your department.

Every record is first checked by ingest's own validator (the catalogue, subject ids, event
time, and event ids used before with another payload); nothing is stored by the check. A
bad record is reported as `FILE: line N: FIELD: problem (REASON)` and, unless
--skip-invalid is given, nothing is sent (exit 2). Then the records are streamed in
batches with a progress bar; the summary (accepted, duplicate, rejected, conflict,
events/s) goes to stdout.

[bold]Resumable[/bold]: each batch ingest acknowledges is noted in FILE.checkpoint. Run
the same command again after an interruption (Ctrl-C, a crash, a lost connection) and it
goes on from there; batches in flight when it stopped are sent again and come back as
duplicates, never stored twice. A file changed since its checkpoint is refused. The
checkpoint is removed once the file has gone through.

[bold]JSON Lines[/bold] (.jsonl, .ndjson): one Event per line, as JSON; attributes as
plain JSON values or typed ({"int_value": 3}):

  {"event_id": "lib-1", "event_type": "library.book_returned_late", "subject": {"kind":
  "person", "id_scheme": "resident-id", "id_value": "11010519491231002X"},
  "occurred_at": "2026-06-01T12:00:00Z", "attributes": {"days_late": 3}}

[bold]CSV[/bold] (.csv): a header, then one event per row; columns event_id, event_type,
subject_kind, id_scheme, id_value, occurred_at (RFC 3339), optional evidence_uri, and
attr.NAME per attribute (an empty cell leaves it out). Cells are typed by --catalogue
when given, else by their value (true/false, whole number, decimal, else text):

  event_id,event_type,subject_kind,id_scheme,id_value,occurred_at,attr.days_late
  lib-1,library.book_returned_late,person,resident-id,11010519491231002X,2026-06-01T12:00:00Z,3

Every record needs its event_id: it is what makes a resend harmless.
"""


async def acting_source(egret: Connection, explicit: str | None) -> str:
    """The source to act as: --source, else the department the token names (its `sub`
    claim, which ingest requires the request's source to equal)."""
    if explicit:
        return explicit
    token = await token_source(egret.profile).token()
    subject = _token_subject(token or "")
    if not subject:
        raise fail(
            f"cannot tell which department the token of profile {egret.profile.name!r} names; say --source",
            Exit.USAGE,
        )
    return subject


def _token_subject(token: str) -> str:
    """The `sub` claim of a JWT, read without verifying it (ingest verifies it)."""
    parts = token.split(".")
    if len(parts) != 3:
        return ""
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return ""
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else ""


class _Rate(ProgressColumn):
    """The throughput, in events per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} events/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def _estimated_records(path: Path, fmt: FileFormat) -> int:
    """Lines in the file (less a CSV header): the progress bar's total when no validation
    pass has counted the records."""
    lines = 0
    last = b"\n"
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"
    return max(0, lines - (fmt is FileFormat.CSV))


@dataclass
class _Job:
    """One file of the command line and what this run did with it."""

    file: EventFile
    # None with --check, which sends nothing and so resumes nothing.
    checkpoint: Checkpoint | None
    rejects_path: Path | None
    # What earlier runs got acknowledged (from the checkpoint), in how many batches.
    earlier: Counts = field(default_factory=Counts)
    resumed_batches: int = 0
    checked: Counts | None = None
    submitted: Counts = field(default_factory=Counts)
    sent: int = 0
    seconds: float = 0.0
    rejects: IO[str] | None = None

    @property
    def name(self) -> str:
        return str(self.file.path)

    def reporter(self, stack: ExitStack, write: bool) -> Callable[[Rejection], None]:
        """Each refused record on stderr, one line per problem, and in the rejects file if
        `write` (appended to on a resumed run)."""

        def report(rejection: Rejection) -> None:
            for violation in rejection.violations:
                err.print(
                    f"{self.name}: line {rejection.line}: {violation.field or '(record)'}: "
                    f"{violation.description}" + (f" ({violation.reason})" if violation.reason else ""),
                    highlight=False,
                    markup=False,
                )
            if write and self.rejects_path is not None:
                if self.rejects is None:
                    resumed = self.checkpoint is not None and self.checkpoint.resumed
                    self.rejects = stack.enter_context(
                        self.rejects_path.open("a" if resumed else "w", encoding="utf-8")
                    )
                self.rejects.write(json.dumps(rejection.as_json(), ensure_ascii=False) + "\n")
                # Before the batch is noted in the checkpoint: a resumed run never loses one.
                self.rejects.flush()

        return report

    def totals(self) -> Counts:
        total = Counts()
        total.add(self.earlier)
        total.add(self.submitted)
        return total

    def sent_row(self) -> dict[str, Any]:
        total = self.totals()
        return {
            "file": self.name,
            "source": self.file.source,
            "records": total.records,
            "accepted": total.accepted,
            "duplicate": total.duplicate,
            "rejected": total.rejected,
            "conflict": total.conflict,
            "invalid": total.invalid,
            "resumed_batches": self.resumed_batches,
            "sent": self.sent,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.sent / self.seconds, 1) if self.seconds > 0 else 0.0,
            "rejects": str(self.rejects_path) if self.rejects is not None else "",
        }

    def checked_row(self) -> dict[str, Any]:
        checked = self.checked or Counts()
        return {
            "file": self.name,
            "source": self.file.source,
            "records": checked.records,
            "would_accept": checked.accepted,
            "duplicate": checked.duplicate,
            "rejected": checked.rejected,
            "conflict": checked.conflict,
            "invalid": checked.invalid,
        }

    def refused(self) -> int:
        checked = self.checked or Counts()
        return checked.invalid + checked.rejected + checked.conflict


def _job(
    path: Path,
    fmt: FileFormat | None,
    source: str,
    types: dict[str, dict[str, str]] | None,
    batch_size: int,
    *,
    checkpoint: Path | None,
    rejects: Path | None,
    check: bool,
) -> _Job:
    try:
        file = EventFile(path, format_of(path, fmt), source, types, batch_size)
        sha256 = file_sha256(path)
    except FileError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from None
    rejects_path = rejects or path.with_name(path.name + ".rejects.jsonl")
    if check:
        return _Job(file, None, rejects_path)
    try:
        saved = Checkpoint.open(
            checkpoint or path.with_name(path.name + ".checkpoint"),
            Identity(sha256, source, batch_size),
            file_name=str(path),
        )
    except CheckpointMismatch as exc:
        raise fail(str(exc), Exit.USAGE) from None
    if saved.identity.batch_size != batch_size:
        err.print(
            f"{path}: resuming in the checkpoint's batches of {saved.identity.batch_size}", highlight=False
        )
    # The checkpoint's batch size cuts the batches, so that their ids name the same events.
    job = _Job(
        EventFile(path, file.fmt, source, types, saved.identity.batch_size),
        saved,
        rejects_path,
        earlier=saved.totals(),
        resumed_batches=len(saved.acked),
    )
    if saved.resumed:
        err.print(
            f"{path}: resuming: {len(saved.acked):,} batches ({job.earlier.records:,} records) were "
            f"acknowledged before (checkpoint {saved.path})",
            highlight=False,
        )
    return job


async def _check(egret: Connection, jobs: list[_Job], stack: ExitStack, write_rejects: bool) -> None:
    with _progress() as progress:
        for job in jobs:
            estimate = _estimated_records(job.file.path, job.file.fmt) - job.earlier.records
            task = progress.add_task(f"checking {job.name}", total=max(0, estimate))
            job.checked = await validate_file(
                egret.ingest,
                job.file,
                skip_batch=job.checkpoint.done if job.checkpoint is not None else None,
                on_rejection=job.reporter(stack, write_rejects),
                on_progress=lambda n, task=task: progress.advance(task, n),  # type: ignore[misc]
            )
            progress.update(task, total=job.checked.records, completed=job.checked.records)


async def _send(egret: Connection, jobs: list[_Job], stack: ExitStack, in_flight: int) -> None:
    with _progress() as progress:
        for job in jobs:
            checkpoint = job.checkpoint
            assert checkpoint is not None
            total = (
                job.checked.records
                if job.checked is not None
                else max(0, _estimated_records(job.file.path, job.file.fmt) - job.earlier.records)
            )
            task = progress.add_task(f"sending {job.name}", total=total)
            try:
                done = await submit_file(
                    egret.channel("ingest"),
                    job.file,
                    checkpoint,
                    in_flight=in_flight,
                    on_rejection=job.reporter(stack, write=True),
                    on_progress=lambda n, task=task: progress.advance(task, n),  # type: ignore[misc]
                )
            except StreamFailed as exc:
                checkpoint.close()
                progress.stop()
                if checkpoint.acked:
                    err.print(
                        f"{job.name}: stopped; the {len(checkpoint.acked):,} batches acknowledged are noted "
                        f"in {checkpoint.path}: run the same command again to resume",
                        highlight=False,
                    )
                if isinstance(exc.__cause__, grpc.RpcError):
                    raise exc.__cause__ from None
                raise fail(str(exc), Exit.UNAVAILABLE) from None
            progress.update(task, total=done.counts.records, completed=done.counts.records)
            checkpoint.remove()
            job.submitted, job.sent, job.seconds = done.counts, done.events, done.seconds
            rate = f" ({done.events / done.seconds:,.0f} events/s)" if done.seconds > 0 else ""
            progress.console.print(
                f"{job.name}: {done.events:,} events sent in {done.seconds:.1f} s{rate}", highlight=False
            )
            if job.rejects is not None:
                progress.console.print(
                    f"{job.name}: the refused records are in {job.rejects_path}", highlight=False
                )


_SENT_COLUMNS = ("file", "records", "accepted", "duplicate", "rejected", "conflict", "invalid", "events/s")
_CHECKED_COLUMNS = ("file", "records", "would accept", "duplicate", "rejected", "conflict", "invalid")


def submit(
    ctx: typer.Context,
    *,
    files: Annotated[
        list[Path],
        typer.Argument(
            metavar="FILE", help="JSON Lines (.jsonl, .ndjson) or CSV (.csv) files.", show_default=False
        ),
    ],
    file_format: Annotated[
        FileFormat | None, typer.Option("--format", help="The files' format (default: from the extension).")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Submit as this department (default: the one the token names).")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate only; send nothing.")] = False,
    skip_invalid: Annotated[
        bool,
        typer.Option("--skip-invalid", help="Send the valid records; write the others to the rejects file."),
    ] = False,
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="Where refused records go, a JSON object each with its line and reasons "
            "(default FILE.rejects.jsonl with --skip-invalid; otherwise written only when given).",
            show_default=False,
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="The checkpoint of acknowledged batches (default FILE.checkpoint).", show_default=False
        ),
    ] = None,
    catalogue: Annotated[
        Path | None,
        typer.Option(help="The city's catalogue (YAML), to type attribute values as it declares them."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, help="Records per batch (at most ingest's maximum batch size).")
    ] = 500,
    in_flight: Annotated[int, typer.Option(min=1, max=64, help="Batches awaiting acknowledgement.")] = 4,
) -> None:
    if check and skip_invalid:
        raise fail(
            "--check sends nothing, so --skip-invalid has nothing to skip: give one of them", Exit.USAGE
        )
    if len(files) > 1 and (rejects is not None or checkpoint is not None):
        raise fail(
            "--rejects and --checkpoint name one file's; with several files each has its own "
            "FILE.rejects.jsonl and FILE.checkpoint",
            Exit.USAGE,
        )
    try:
        types = catalogue_types(catalogue) if catalogue is not None else None
    except FileError as exc:
        raise fail(str(exc), Exit.USAGE) from None

    sending = False

    async def work(egret: Connection, settings: State) -> Exit:
        nonlocal sending
        acting = await acting_source(egret, source)
        jobs = [
            _job(
                path,
                file_format,
                acting,
                types,
                batch_size,
                checkpoint=checkpoint,
                rejects=rejects,
                check=check,
            )
            for path in files
        ]
        if skip_invalid or rejects is not None:
            for job in jobs:
                if job.checkpoint is not None and not job.checkpoint.resumed and job.rejects_path:
                    # A fresh run's rejects file holds this run's records only.
                    job.rejects_path.unlink(missing_ok=True)
        with ExitStack() as stack:
            if not skip_invalid:
                await _check(egret, jobs, stack, write_rejects=rejects is not None)
                refused = sum(job.refused() for job in jobs)
                if check:
                    _emit_checked(settings.output, jobs)
                    return Exit.USAGE if refused else Exit.OK
                if refused:
                    err.print(
                        f"{refused:,} record(s) refused; nothing sent. Fix them and run again, or "
                        "send the others with --skip-invalid.",
                        highlight=False,
                    )
                    return Exit.USAGE
            sending = True
            await _send(egret, jobs, stack, in_flight)
        _emit_sent(settings.output, jobs)
        late = sum(job.submitted.rejected + job.submitted.conflict for job in jobs)
        if late and not skip_invalid:
            # Checked as valid, yet refused when sent (the clock or the catalogue moved on).
            err.print(f"{late:,} record(s) were refused when sent; see the lines above", highlight=False)
            return Exit.FAILED
        return Exit.OK

    async def guarded(egret: Connection, settings: State) -> Exit:
        try:
            return await work(egret, settings)
        except FileError as exc:
            # A CSV file's header or encoding found bad while reading it.
            raise fail(str(exc), Exit.USAGE) from None

    try:
        code = run(ctx, guarded)
    except KeyboardInterrupt:
        err.print(
            "interrupted: what ingest acknowledged is noted in the checkpoint; run the same command "
            "again to resume"
            if sending
            else "interrupted while checking: nothing was sent",
            highlight=False,
        )
        raise typer.Exit(130) from None
    if code is not Exit.OK:
        raise typer.Exit(int(code))


def _emit_sent(fmt: Format, jobs: list[_Job]) -> None:
    rows = [job.sent_row() for job in jobs]
    emit(
        fmt,
        {"files": rows},
        columns=_SENT_COLUMNS,
        rows=(
            (
                r["file"], f"{r['records']:,}", f"{r['accepted']:,}", f"{r['duplicate']:,}",
                f"{r['rejected']:,}", f"{r['conflict']:,}", f"{r['invalid']:,}", f"{r['events_per_s']:,.0f}",
            )
            for r in rows
        ),
    )  # fmt: skip


def _emit_checked(fmt: Format, jobs: list[_Job]) -> None:
    rows = [job.checked_row() for job in jobs]
    emit(
        fmt,
        {"checked_only": True, "files": rows},
        columns=_CHECKED_COLUMNS,
        rows=(
            (
                r["file"], f"{r['records']:,}", f"{r['would_accept']:,}", f"{r['duplicate']:,}",
                f"{r['rejected']:,}", f"{r['conflict']:,}", f"{r['invalid']:,}",
            )
            for r in rows
        ),
        title="Checked only: nothing was sent",
    )  # fmt: skip


submit.__doc__ = HELP
