"""`egret events retract|correct`: a department withdraws or corrects an event it sent."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from egret.common.v1 import event_pb2
from egret.ingest.v1 import ingest_service_pb2 as pb
from egret_client.cli.common import Exit, State, fail, run, when
from egret_client.cli.output import emit, err
from egret_client.cli.submit import acting_source
from egret_client.connection import Connection
from egret_client.eventfiles import event_from_json

app = typer.Typer(
    help="Retract or correct events your department submitted (ingest's RetractEvent, CorrectEvent).",
    no_args_is_help=True,
)

Reason = Annotated[
    str,
    typer.Option(
        "--reason", help="Why (required, at most 1,000 characters): shown to the subject and reviewers."
    ),
]
Source = Annotated[
    str | None, typer.Option(help="The department that sent the event (default: the one the token names).")
]


def _retraction_rows(retraction: Any) -> list[tuple[str, str]]:
    ref = retraction.ref
    rows = [
        ("event", f"{ref.source}/{ref.event_id}"),
        ("reason", retraction.reason),
        ("retracted at", when(retraction.retracted_at)),
        ("retracted by", retraction.retracted_by),
    ]
    if retraction.HasField("replaced_by"):
        rows.append(("replaced by", f"{retraction.replaced_by.source}/{retraction.replaced_by.event_id}"))
    return rows


@app.command()
def retract(
    ctx: typer.Context,
    event_id: Annotated[
        str, typer.Argument(metavar="EVENT_ID", help="The event_id your department gave the event.")
    ],
    reason: Reason,
    source: Source = None,
) -> None:
    """Retract an event: every ledger entry it caused is reversed and the subject's scores
    are recomputed. The event itself stays on record; retracting it again changes nothing."""

    async def work(egret: Connection, settings: State) -> None:
        ref = event_pb2.EventRef(source=await acting_source(egret, source), event_id=event_id)
        reply = await egret.ingest.RetractEvent(pb.RetractEventRequest(ref=ref, reason=reason))
        state_row = (
            "status",
            "already retracted: nothing changed" if reply.already_retracted else "retracted",
        )
        emit(
            settings.output,
            reply,
            columns=("field", "value"),
            rows=[state_row, *_retraction_rows(reply.retraction)],
        )

    run(ctx, work)


_STATUS = {
    pb.EVENT_STATUS_ACCEPTED: "accepted",
    pb.EVENT_STATUS_DUPLICATE: "duplicate (this correction was made before)",
}


def _replacement(path: Path) -> pb.Event:
    """The corrected event from a JSON file (`-`: standard input), in the JSON form of a
    JSON Lines record of `egret submit`."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}", Exit.USAGE) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(
            f"{path}: not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", Exit.USAGE
        ) from None
    event, problems = event_from_json(value)
    if event is None or problems:
        err.print(f"{path}: not a valid event:", highlight=False, markup=False)
        for problem in problems:
            path_text = f"replacement.{problem.field}" if problem.field else "replacement"
            err.print(
                f"  {path_text}: {problem.description} ({problem.reason})", highlight=False, markup=False
            )
        raise typer.Exit(int(Exit.USAGE))
    return event


@app.command()
def correct(
    ctx: typer.Context,
    event_id: Annotated[
        str, typer.Argument(metavar="EVENT_ID", help="The event_id of the event to correct.")
    ],
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            "-f",
            help="The corrected event as JSON (as one line of a JSON Lines file for `egret submit`), "
            "with its own new event_id; - reads standard input.",
        ),
    ],
    reason: Reason,
    source: Source = None,
) -> None:
    """Correct an event: retract it and submit its replacement in one step. The replacement
    needs a new event_id (the original's stays taken by the retracted event)."""
    replacement = _replacement(file)

    async def work(egret: Connection, settings: State) -> None:
        ref = event_pb2.EventRef(source=await acting_source(egret, source), event_id=event_id)
        reply = await egret.ingest.CorrectEvent(
            pb.CorrectEventRequest(ref=ref, reason=reason, replacement=replacement)
        )
        outcome = reply.replacement
        emit(
            settings.output,
            reply,
            columns=("field", "value"),
            rows=[
                *_retraction_rows(reply.retraction),
                ("replacement", outcome.event_id),
                ("replacement status", _STATUS.get(outcome.status, pb.EventStatus.Name(outcome.status))),
            ],
        )

    run(ctx, work)
