"""`egret disputes list|show|resolve`, `egret repairs list|decide`: a reviewer's casework.
The queues are query's reads (a purpose, recorded in each subject's access log); the
decisions are score's acts (audited under the caller's name), confirmed before they are
sent unless `--yes` (docs/due-process.md, docs/cli-reads.md)."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from egret.common.v1 import due_process_pb2, event_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret.score.v1 import score_service_pb2 as score_pb
from egret_client.cli.common import (
    Exit,
    State,
    fail,
    joined,
    listing,
    optional_subject,
    read_pages,
    run,
    show,
    when,
    word,
    yes_no,
)
from egret_client.cli.options import AllPages, PageSize, PageToken, Purpose, PurposeNote, reflowed
from egret_client.cli.output import fields, table
from egret_client.cli.reads import event_ref, rule
from egret_client.connection import Connection

app = typer.Typer()
disputes_app = typer.Typer(
    help="Disputes of ledger entries: the queue, one dispute with its evidence, a decision.",
    no_args_is_help=True,
)
repairs_app = typer.Typer(help="Credit repair applications: the queue and a decision.", no_args_is_help=True)
app.add_typer(disputes_app, name="disputes")
app.add_typer(repairs_app, name="repairs")


class DisputeState(StrEnum):
    OPEN = "open"
    UPHELD = "upheld"
    OVERTURNED = "overturned"


class RepairState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class DisputeDecision(StrEnum):
    UPHOLD = "uphold"
    OVERTURN = "overturn"


class RepairDecision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


_DISPUTE_STATUS = {
    DisputeState.OPEN: due_process_pb2.DISPUTE_STATUS_OPEN,
    DisputeState.UPHELD: due_process_pb2.DISPUTE_STATUS_UPHELD,
    DisputeState.OVERTURNED: due_process_pb2.DISPUTE_STATUS_OVERTURNED,
}
_REPAIR_STATUS = {
    RepairState.PENDING: due_process_pb2.REPAIR_STATUS_PENDING,
    RepairState.APPROVED: due_process_pb2.REPAIR_STATUS_APPROVED,
    RepairState.REJECTED: due_process_pb2.REPAIR_STATUS_REJECTED,
}
_DISPUTE_DECISION = {
    DisputeDecision.UPHOLD: due_process_pb2.DISPUTE_DECISION_UPHOLD,
    DisputeDecision.OVERTURN: due_process_pb2.DISPUTE_DECISION_OVERTURN,
}
_REPAIR_DECISION = {
    RepairDecision.APPROVE: due_process_pb2.REPAIR_DECISION_APPROVE,
    RepairDecision.REJECT: due_process_pb2.REPAIR_DECISION_REJECT,
}
# What a decision does, for the confirmation.
_EFFECT = {
    DisputeDecision.UPHOLD: "the entry stands and counts again",
    DisputeDecision.OVERTURN: "the entry is reversed and the subject's score recomputed",
    RepairDecision.APPROVE: "the entry stops counting from now on",
    RepairDecision.REJECT: "the entry keeps counting until it expires",
}

SubjectFilter = Annotated[
    str | None,
    typer.Option(
        "--subject",
        help="Only this subject's (SCHEME:VALUE, KIND/SCHEME:VALUE or key:HEX).",
        show_default=False,
    ),
]
Overdue = Annotated[bool, typer.Option("--overdue", help="Only those past their deadline, still undecided.")]
Reason = Annotated[
    str,
    typer.Option("--reason", "-r", help="Why (required, at most 4,000 characters; the subject reads it)."),
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Decide without asking for confirmation.")]


def confirm(question: str, yes: bool) -> None:
    """Ask before a decision; refuse to ask when no one can answer (stdin not a terminal)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise fail("a decision needs confirmation and stdin is not a terminal: pass --yes", Exit.USAGE)
    if not typer.confirm(question, default=False, err=True):
        raise fail("not confirmed; nothing was decided", Exit.FAILED)


def _short(text: str, width: int = 48) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- disputes ----------------------------------------------------------------------------------


def dispute_row(d: due_process_pb2.Dispute) -> tuple[object, ...]:
    return (
        d.dispute_id, d.entry_id, word(due_process_pb2.DisputeStatus, d.status), when(d.deadline),
        yes_no(d.overdue), d.assignee, f"{d.filed_by_role} {when(d.filed_at)}", _short(d.statement),
    )  # fmt: skip


DISPUTE_COLUMNS = ("dispute", "entry", "status", "deadline", "overdue", "assignee", "filed", "statement")


def dispute_fields(d: due_process_pb2.Dispute) -> list[tuple[str, object]]:
    decided = [
        ("decided", f"{when(d.resolved_at)} by {d.resolved_by}"),
        ("reason", d.resolution_reason),
    ]
    return [
        ("dispute", d.dispute_id),
        ("status", word(due_process_pb2.DisputeStatus, d.status)),
        ("entry", d.entry_id),
        ("subject key", d.subject_key),
        ("filed", f"{when(d.filed_at)} by {d.filed_by} ({d.filed_by_role})"),
        ("statement", d.statement),
        ("deadline", when(d.deadline) + (" (overdue)" if d.overdue else "")),
        ("assignee", f"{d.assignee} since {when(d.assigned_at)}" if d.assignee else "no one"),
        *(decided if d.status != due_process_pb2.DISPUTE_STATUS_OPEN else []),
    ]


@disputes_app.command("list")
@reflowed
def list_disputes(
    ctx: typer.Context,
    *,
    status: Annotated[
        DisputeState | None,
        typer.Option("--status", help="Only disputes in this status.", show_default=False),
    ] = None,
    subject: SubjectFilter = None,
    overdue: Overdue = False,
    department: Annotated[
        str, typer.Option("--department", help="Only entries resting on an event of this department.")
    ] = "",
    category: Annotated[str, typer.Option("--category", help="Only entries in this category.")] = "",
    assignee: Annotated[str, typer.Option("--assignee", help="Only disputes this reviewer holds.")] = "",
    mine: Annotated[bool, typer.Option("--mine", help="Only disputes you hold.")] = False,
    unassigned: Annotated[bool, typer.Option("--unassigned", help="Only disputes no one holds.")] = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """The dispute queue, earliest deadline first.

    QueryService.ListDisputes: the service applies every filter to the whole queue. A
    subject sees its own disputes.
    """
    ref = optional_subject(subject)

    request = query_pb.ListDisputesRequest(
        status=_DISPUTE_STATUS[status] if status else due_process_pb2.DISPUTE_STATUS_UNSPECIFIED,
        subject=ref,
        overdue_only=overdue,
        department=department,
        category=category,
        assignee=assignee,
        assigned_to_caller=mine,
        unassigned_only=unassigned,
        page_size=page_size,
        purpose_note=purpose_note,
    )
    response = read_pages(
        ctx,
        lambda egret: egret.query.ListDisputes,
        request,
        page_token=page_token,
        follow=all_pages,
        purpose=purpose,
    )
    listing(ctx, response, DISPUTE_COLUMNS, (dispute_row(d) for d in response.disputes))


@disputes_app.command("show")
@reflowed
def show_dispute(
    ctx: typer.Context,
    dispute_id: Annotated[str, typer.Argument(metavar="DISPUTE", help="The dispute id.")],
    *,
    subject: Annotated[
        str | None,
        typer.Option(
            "--subject",
            help="Show it only if it is this subject's dispute (otherwise: not found). The read is"
            " recorded for this subject either way.",
            show_default=False,
        ),
    ] = None,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """One dispute with its entry and the evidence behind it.

    QueryService.ListDisputes narrowed to this one dispute (dispute_ids, every status),
    then the entry with its evidence snapshot (QueryService.GetEntry). Only this dispute
    is read, so only its subject's access log records the read.
    """
    ref = optional_subject(subject)

    async def work(
        egret: Connection, settings: State
    ) -> tuple[due_process_pb2.Dispute, query_pb.LedgerEntry] | None:
        said = settings.purpose(purpose)
        listed = await egret.query.ListDisputes(
            query_pb.ListDisputesRequest(
                dispute_ids=[dispute_id], subject=ref, purpose=said, purpose_note=purpose_note
            )
        )
        if not listed.disputes:
            return None
        found = listed.disputes[0]
        entry = await egret.query.GetEntry(
            query_pb.GetEntryRequest(entry_id=found.entry_id, purpose=said, purpose_note=purpose_note)
        )
        return found, entry.entry

    answer = run(ctx, work)
    if answer is None:
        where = " of that subject" if subject is not None else ""
        raise fail(f"NOT_FOUND: no dispute {dispute_id}{where}")
    dispute, entry = answer

    def draw() -> None:
        fields(dispute_fields(dispute), title=f"dispute {dispute.dispute_id}")
        fields(
            [
                ("entry", entry.entry_id),
                ("rule", rule(entry.rule)),
                ("legal basis", entry.rule.legal_basis),
                ("reason", entry.reason),
                ("points", f"{entry.points} {entry.category}"),
                ("status", word(query_pb.EntryStatus, entry.status) + f" {entry.status_reason}".rstrip()),
                ("occurred", when(entry.occurred_at)),
                ("recorded", when(entry.recorded_at)),
                ("visible until", when(entry.visible_until)),
            ],
            title="entry",
        )
        table(
            ("event", "type", "occurred", "recorded", "attributes", "evidence"),
            (
                (event_ref(e.ref), e.event_type, when(e.occurred_at), when(e.recorded_at),
                 joined(f"{name}={_value(v)}" for name, v in sorted(e.attributes.items())), e.evidence_uri)
                for e in entry.evidence
            ),
            title="evidence",
        )  # fmt: skip

    show(ctx.obj.output, {"dispute": dispute, "entry": entry}, draw)


def _value(value: event_pb2.AttributeValue) -> str:
    """An attribute value as written in the event (whichever member is set)."""
    member = value.WhichOneof("value")
    if member is None:
        return ""
    if member == "timestamp_value":
        return when(value.timestamp_value)
    return str(getattr(value, member))


@disputes_app.command("resolve")
@reflowed
def resolve(
    ctx: typer.Context,
    dispute_id: Annotated[str, typer.Argument(metavar="DISPUTE", help="The dispute id.")],
    decision: Annotated[
        DisputeDecision,
        typer.Argument(help="uphold: the entry stands; overturn: the entry is reversed."),
    ],
    *,
    reason: Reason,
    yes: Yes = False,
) -> None:
    """Decide a dispute: uphold or overturn, with a reason.

    ScoreService.ResolveDispute, recorded under your name in score's audit log; the subject
    sees the decision and its reason. Refused if it was decided before or another reviewer
    holds it. Asks for confirmation unless --yes.
    """
    confirm(
        f"{decision.value.capitalize()} dispute {dispute_id} ({_EFFECT[decision]}), with the reason"
        f" {reason!r}?",
        yes,
    )

    async def work(egret: Connection, settings: State) -> due_process_pb2.Dispute:
        request = score_pb.ResolveDisputeRequest(
            dispute_id=dispute_id, decision=_DISPUTE_DECISION[decision], reason=reason
        )
        return (await egret.score.ResolveDispute(request)).dispute

    dispute = run(ctx, work)
    show(ctx.obj.output, dispute, lambda: fields(dispute_fields(dispute), title=f"dispute {dispute_id}"))


# -- repairs -----------------------------------------------------------------------------------


def repair_row(a: due_process_pb2.RepairApplication) -> tuple[object, ...]:
    return (
        a.application_id, a.entry_id, word(due_process_pb2.RepairStatus, a.status), when(a.applied_at),
        when(a.decision_due), yes_no(a.overdue), a.decided_by, _short(a.evidence),
    )  # fmt: skip


REPAIR_COLUMNS = (
    "application",
    "entry",
    "status",
    "applied",
    "decision due",
    "overdue",
    "decided by",
    "evidence",
)


def repair_fields(a: due_process_pb2.RepairApplication) -> list[tuple[str, object]]:
    decided = [
        ("decided", f"{when(a.decided_at)} by {a.decided_by}"),
        ("reason", a.decision_reason),
    ]
    return [
        ("application", a.application_id),
        ("status", word(due_process_pb2.RepairStatus, a.status)),
        ("entry", a.entry_id),
        ("subject key", a.subject_key),
        ("applied", when(a.applied_at)),
        ("evidence", a.evidence),
        ("evidence document", a.evidence_uri),
        ("decision due", when(a.decision_due) + (" (overdue)" if a.overdue else "")),
        *(decided if a.status != due_process_pb2.REPAIR_STATUS_PENDING else []),
    ]


@repairs_app.command("list")
@reflowed
def list_repairs(
    ctx: typer.Context,
    *,
    status: Annotated[
        RepairState | None,
        typer.Option("--status", help="Only applications in this status.", show_default=False),
    ] = None,
    subject: SubjectFilter = None,
    overdue: Overdue = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """The credit repair applications, earliest decision due first.

    QueryService.ListRepairApplications. A subject sees its own.
    """
    ref = optional_subject(subject)

    request = query_pb.ListRepairApplicationsRequest(
        status=_REPAIR_STATUS[status] if status else due_process_pb2.REPAIR_STATUS_UNSPECIFIED,
        subject=ref,
        overdue_only=overdue,
        page_size=page_size,
        purpose_note=purpose_note,
    )
    response = read_pages(
        ctx,
        lambda egret: egret.query.ListRepairApplications,
        request,
        page_token=page_token,
        follow=all_pages,
        purpose=purpose,
    )
    listing(ctx, response, REPAIR_COLUMNS, (repair_row(a) for a in response.applications))


@repairs_app.command("decide")
@reflowed
def decide(
    ctx: typer.Context,
    application_id: Annotated[str, typer.Argument(metavar="APPLICATION", help="The application id.")],
    decision: Annotated[
        RepairDecision,
        typer.Argument(help="approve: the entry stops counting from now on; reject: it keeps counting."),
    ],
    *,
    reason: Reason,
    yes: Yes = False,
) -> None:
    """Decide a credit repair application: approve or reject, with a reason.

    ScoreService.DecideRepair, recorded under your name in score's audit log; the subject
    sees the decision and its reason. Refused if it was decided before. Asks for
    confirmation unless --yes.
    """
    confirm(
        f"{decision.value.capitalize()} repair application {application_id} ({_EFFECT[decision]}),"
        f" with the reason {reason!r}?",
        yes,
    )

    async def work(egret: Connection, settings: State) -> due_process_pb2.RepairApplication:
        request = score_pb.DecideRepairRequest(
            application_id=application_id, decision=_REPAIR_DECISION[decision], reason=reason
        )
        return (await egret.score.DecideRepair(request)).application

    application = run(ctx, work)
    show(
        ctx.obj.output,
        application,
        lambda: fields(repair_fields(application), title=f"repair application {application_id}"),
    )
