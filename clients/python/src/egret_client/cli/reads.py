"""`egret score get|explain|history|entries`, `egret eligibility check`, `egret access-log`:
query's reads of one subject. Each states a purpose (the profile's unless `--purpose`),
which query records with the read in the access log the subject sees (docs/cli-reads.md).

The options and helpers every command shares are in options.py and common.py; what query's
reads of cases and entries share (a rule, an event reference) is here, for cases.py too."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

from egret.common.v1 import due_process_pb2, event_pb2, outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret_client.cli.common import (
    State,
    day,
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
from egret_client.cli.options import (
    AllPages,
    AsOf,
    PageSize,
    PageToken,
    Purpose,
    PurposeNote,
    instant,
    reflowed,
)
from egret_client.cli.output import fields, table
from egret_client.connection import Connection

# Merged into the root command: its groups and commands are top-level (`egret score …`).
app = typer.Typer()
score_app = typer.Typer(
    help="A subject's score, why it is what it is, how it changed, and the ledger entries behind it.",
    no_args_is_help=True,
)
eligibility_app = typer.Typer(help="Whether a subject is eligible for a benefit.", no_args_is_help=True)
app.add_typer(score_app, name="score")
app.add_typer(eligibility_app, name="eligibility")

SUBJECT_HELP = (
    "The subject: SCHEME:VALUE (resident-id:…, passport:…, uscc:…), KIND/SCHEME:VALUE for another"
    " scheme, or key:HEX (a subject key). A subject's own profile may leave it out."
)
SubjectArg = Annotated[str | None, typer.Argument(metavar="SUBJECT", help=SUBJECT_HELP, show_default=False)]


def event_ref(ref: event_pb2.EventRef) -> str:
    return f"{ref.source}/{ref.event_id}"


def rule(ref: outcome_pb2.RuleRef) -> str:
    return f"{ref.rule_id} ({ref.rule_set} v{ref.rule_set_version})" if ref.rule_set else ref.rule_id


def case_of(entry: query_pb.LedgerEntry) -> str:
    """The entry's latest dispute and repair application, in words."""
    cases = []
    if entry.HasField("dispute"):
        cases.append(
            f"dispute {entry.dispute.dispute_id} {word(due_process_pb2.DisputeStatus, entry.dispute.status)}"
        )
    if entry.HasField("repair"):
        cases.append(
            f"repair {entry.repair.application_id} {word(due_process_pb2.RepairStatus, entry.repair.status)}"
        )
    return joined(cases)


def _categories(categories: Iterable[query_pb.CategoryScore], title: str = "categories") -> None:
    table(
        ("category", "points", "entries", "capped points"),
        ((c.category, c.points, c.entry_count, c.capped_points) for c in categories),
        title=title,
    )


def _lists(lists: Iterable[query_pb.ListMembership]) -> str:
    return joined((f"{m.list_name} ({joined(m.reasons)})" for m in lists), "none")


# -- egret score get ---------------------------------------------------------------------------


@score_app.command("get")
@reflowed
def get(
    ctx: typer.Context,
    subject: SubjectArg = None,
    *,
    as_of: AsOf = None,
    as_corrected: Annotated[
        bool,
        typer.Option(
            "--as-corrected", help="With --as-of: the corrected timeline (retracted entries never counted)."
        ),
    ] = False,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """A subject's score, tier, lists and points per category.

    QueryService.GetScore: now, or at a past instant with --as-of.
    """
    ref = optional_subject(subject)
    at = instant(as_of)

    async def work(egret: Connection, settings: State) -> query_pb.Score:
        request = query_pb.GetScoreRequest(
            subject=ref,
            as_of=at,
            view=query_pb.SCORE_VIEW_AS_CORRECTED if as_corrected else query_pb.SCORE_VIEW_UNSPECIFIED,
            purpose=settings.purpose(purpose),
            purpose_note=purpose_note,
        )
        return (await egret.query.GetScore(request)).score

    score = run(ctx, work)

    def draw() -> None:
        fields(
            [
                ("subject key", score.subject_key),
                ("kind", word(subject_pb2.SubjectKind, score.subject_kind)),
                ("score", score.score),
                ("tier", score.tier),
                ("base score", score.base_score),
                ("counting entries", score.entry_count),
                ("lists", _lists(score.lists)),
                ("disputed entries", joined(score.disputed_entry_ids, "none")),
                ("policy", score.policy_version),
                ("as of", when(score.as_of)),
            ]
        )
        _categories(score.categories)

    show(ctx.obj.output, score, draw)


# -- egret score explain -----------------------------------------------------------------------


@score_app.command("explain")
@reflowed
def explain(
    ctx: typer.Context, subject: SubjectArg = None, *, purpose: Purpose = None, purpose_note: PurposeNote = ""
) -> None:
    """Why a subject has its score, and how it will move.

    QueryService.Explain: every entry's contribution, the path to the next tier, the
    projected score as entries expire, and the positive behaviours that still count.
    """
    ref = optional_subject(subject)

    async def work(egret: Connection, settings: State) -> query_pb.Explanation:
        request = query_pb.ExplainRequest(
            subject=ref, purpose=settings.purpose(purpose), purpose_note=purpose_note
        )
        return (await egret.query.Explain(request)).explanation

    explanation = run(ctx, work)

    def draw() -> None:
        e = explanation
        following = (
            f"{e.next_tier.tier} at {e.next_tier.min_score}: {e.next_tier.points_needed} points to go"
            if e.HasField("next_tier")
            else "none (top tier)"
        )
        fields(
            [
                ("subject key", e.subject_key),
                ("kind", word(subject_pb2.SubjectKind, e.subject_kind)),
                ("score", f"{e.score} (base {e.base_score}, bounds {e.min_score} to {e.max_score})"),
                ("tier", e.tier),
                ("next tier", following),
                ("lists", _lists(e.lists)),
                ("policy", e.policy_version),
                ("as of", when(e.as_of)),
            ]
        )
        _categories(e.categories)
        table(
            ("entry", "occurred", "rule", "points", "contribution", "counts", "status", "visible until",
             "repair from", "case"),
            (_explained_row(x) for x in e.entries),
            title="entries",
        )  # fmt: skip
        if e.projection:
            table(
                ("from", "score", "tier", "entries ending"),
                ((when(p.at), p.score, p.tier, len(p.expiring_entry_ids)) for p in e.projection),
                title="projection (if nothing new is recorded)",
            )
        if e.positive_behaviours:
            table(
                ("rule", "title", "points", "category", "cap remaining"),
                (
                    (b.rule_id, b.title, b.points, b.category,
                     "uncapped" if b.cap_remaining < 0 else b.cap_remaining)
                    for b in e.positive_behaviours
                ),
                title=f"positive behaviours (caps over {e.cap_window_days} days)",
            )  # fmt: skip

    show(ctx.obj.output, explanation, draw)


def _explained_row(x: query_pb.ExplainedEntry) -> tuple[object, ...]:
    e = x.entry
    return (
        e.entry_id, day(e.occurred_at), e.rule.rule_id, e.points, x.contribution, yes_no(x.counting),
        word(query_pb.EntryStatus, e.status), day(e.visible_until), day(x.repair_possible_from), case_of(e),
    )  # fmt: skip


# -- egret score history -----------------------------------------------------------------------


def _change_entries(change: query_pb.ScoreChange) -> str:
    counts = (
        ("added", change.added_entry_ids),
        ("expired", change.expired_entry_ids),
        ("ended", change.ended_entry_ids),
        ("resumed", change.resumed_entry_ids),
    )
    return joined(f"{len(ids)} {name}" for name, ids in counts if ids)


@score_app.command("history")
@reflowed
def history(
    ctx: typer.Context,
    subject: SubjectArg = None,
    *,
    as_corrected: Annotated[
        bool,
        typer.Option(
            "--as-corrected", help="The history recomputed as if retracted entries had never been recorded."
        ),
    ] = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """Every change of a subject's score, tier or lists, newest first.

    QueryService.ListScoreHistory: each change with its cause, the entries behind it and
    the policy in force.
    """
    ref = optional_subject(subject)

    response = read_pages(
        ctx,
        lambda egret: egret.query.ListScoreHistory,
        query_pb.ListScoreHistoryRequest(
            subject=ref, page_size=page_size, purpose_note=purpose_note, as_corrected=as_corrected
        ),
        page_token=page_token,
        follow=all_pages,
        purpose=purpose,
    )
    listing(
        ctx,
        response,
        ("changed", "cause", "score", "tier", "lists", "entries", "policy", "note"),
        (
            (
                when(c.changed_at),
                word(query_pb.ChangeCause, c.cause),
                f"{c.score_before} → {c.score}" if c.HasField("score_before") else c.score,
                f"{c.tier_before} → {c.tier}" if c.tier_before and c.tier_before != c.tier else c.tier,
                joined(c.lists, "none"),
                _change_entries(c),
                c.policy_version,
                c.note,
            )
            for c in response.changes
        ),
    )


# -- egret score entries -----------------------------------------------------------------------


@score_app.command("entries")
@reflowed
def entries(
    ctx: typer.Context,
    subject: SubjectArg = None,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """A subject's ledger entries, newest event first.

    QueryService.ListEntries: every entry, counting or not, with its status and any
    dispute or repair.
    """
    ref = optional_subject(subject)

    response = read_pages(
        ctx,
        lambda egret: egret.query.ListEntries,
        query_pb.ListEntriesRequest(subject=ref, page_size=page_size, purpose_note=purpose_note),
        page_token=page_token,
        follow=all_pages,
        purpose=purpose,
    )
    listing(
        ctx,
        response,
        ("entry", "occurred", "rule", "category", "points", "severity", "status", "visible until",
         "events", "case"),
        (entry_row(e) for e in response.entries),
    )  # fmt: skip


def entry_row(e: query_pb.LedgerEntry) -> tuple[object, ...]:
    return (
        e.entry_id, day(e.occurred_at), e.rule.rule_id, e.category, e.points,
        word(outcome_pb2.Severity, e.severity), word(query_pb.EntryStatus, e.status),
        day(e.visible_until), joined(event_ref(r) for r in e.event_refs), case_of(e),
    )  # fmt: skip


# -- egret eligibility check -------------------------------------------------------------------


@eligibility_app.command("check")
@reflowed
def check(
    ctx: typer.Context,
    first: Annotated[
        str,
        typer.Argument(
            metavar="SUBJECT", help=f"{SUBJECT_HELP} Alone, it is the BENEFIT (a subject's own profile)."
        ),
    ],
    benefit: Annotated[
        str | None, typer.Argument(metavar="BENEFIT", help="The benefit, e.g. library.deposit_free.")
    ] = None,
    *,
    as_of: AsOf = None,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """Whether a subject is eligible for a benefit: SUBJECT BENEFIT, or BENEFIT alone for your own.

    QueryService.CheckEligibility: each condition with its reason, and the score the
    benefit may consider. A subject's own profile may name only the benefit.
    """
    subject_text, benefit_id = (first, benefit) if benefit is not None else (None, first)
    ref = optional_subject(subject_text)
    at = instant(as_of)

    async def work(egret: Connection, settings: State) -> query_pb.CheckEligibilityResponse:
        request = query_pb.CheckEligibilityRequest(
            subject=ref,
            benefit_id=benefit_id,
            as_of=at,
            purpose=settings.purpose(purpose),
            purpose_note=purpose_note,
        )
        return await egret.query.CheckEligibility(request)

    answer = run(ctx, work)

    def draw() -> None:
        bound = answer.purpose_bound_score
        fields(
            [
                ("benefit", benefit_id),
                ("eligible", yes_no(answer.eligible)),
                ("score considered", f"{bound.score} (tier {bound.tier})"),
                ("categories considered", joined(bound.considers, "all")),
                ("lists", joined(bound.lists, "none")),
                ("policy", answer.policy_version),
                ("as of", when(answer.as_of)),
            ]
        )
        table(
            ("condition", "path", "met", "explanation", "entries", "disputed"),
            (
                (
                    r.condition,
                    r.path,
                    yes_no(r.met),
                    r.explanation,
                    len(r.entry_ids),
                    len(r.disputed_entry_ids),
                )
                for r in answer.reasons
            ),
            title="conditions",
        )

    show(ctx.obj.output, answer, draw)


# -- egret access-log --------------------------------------------------------------------------


@app.command("access-log")
@reflowed
def access_log(
    ctx: typer.Context,
    subject: SubjectArg = None,
    *,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    purpose: Purpose = None,
    purpose_note: PurposeNote = "",
) -> None:
    """Who read a subject's data in the last 12 months, newest first.

    QueryService.ListAccessLog: who, in which role, for which purpose, which read. For the
    subject itself, auditors and admins; this read is recorded too, so it shows in the log
    it returns.
    """
    ref = optional_subject(subject)

    response = read_pages(
        ctx,
        lambda egret: egret.query.ListAccessLog,
        query_pb.ListAccessLogRequest(subject=ref, page_size=page_size, purpose_note=purpose_note),
        page_token=page_token,
        follow=all_pages,
        purpose=purpose,
    )
    listing(
        ctx,
        response,
        ("at", "actor", "role", "read", "purpose", "note"),
        ((when(r.at), r.actor, r.role, r.method, r.purpose, r.purpose_note) for r in response.records),
    )
