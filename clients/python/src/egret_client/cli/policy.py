"""`egret policy preview|activate|list|show`: the score policy (tiers, bounds, visibility,
caps, lists), which changes only through ScoreService.PreviewPolicy then ActivatePolicy.

A preview writes nothing; an activation recomputes every subject, so it is confirmed at a
terminal after its preview (or given --yes), and guarded by the version the preview was
made against (expected_current_version). docs/cli-rules.md is the reference.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from egret.common.v1 import subject_pb2
from egret.score.v1 import score_service_pb2 as pb
from egret_client.cli.common import Exit, State, fail, run, show, state, when, word
from egret_client.cli.documents import read_document, refused_in_place
from egret_client.cli.options import reflowed
from egret_client.cli.output import Format, emit, fields, out, table
from egret_client.connection import Connection

app = typer.Typer(help="The score policy: preview a new one, activate it, list the activations.")

PolicyFile = Annotated[
    str,
    typer.Argument(metavar="FILE", help="A policy YAML document (as config/policy.yaml), or - for stdin."),
]


def report_tables(report: pb.PolicyReport) -> None:
    """A policy backtest: the headline, tier movements per subject kind, list moves."""
    fields(
        [
            ("active policy", report.current_version),
            ("proposed policy", report.proposed_version),
            ("as of", when(report.as_of)),
            ("subjects", f"{report.subjects:,}"),
            ("score would change", f"{report.score_changed:,}"),
            ("tier would change", f"{report.tier_changed:,}"),
        ],
        title="Policy change",
    )
    table(
        ("kind", "tier now", "tier proposed", "subjects", ""),
        ((word(subject_pb2.SubjectKind, m.subject_kind), m.from_tier, m.to_tier, f"{m.subjects:,}",
          "" if m.from_tier == m.to_tier else "moved") for m in report.migrations),
        title="Tier movement",
    )  # fmt: skip
    if not report.list_moves:
        out.print("List moves: none (no subject would enter or leave the red or black list)")
        return
    table(
        ("kind", "list", "entering", "leaving"),
        ((word(subject_pb2.SubjectKind, m.subject_kind), m.list_name, f"{m.entering:,}", f"{m.leaving:,}")
         for m in report.list_moves),
        title="List moves",
    )  # fmt: skip


@app.command()
@reflowed
def preview(ctx: typer.Context, file: PolicyFile) -> None:
    """Show how a proposed policy would move every stored subject; nothing is written.

    ScoreService.PreviewPolicy scores every subject as of now under the active policy and
    under the proposed one. A document that is not a valid policy exits 2 with each
    problem's path.
    """
    document = read_document(file)

    async def work(egret: Connection, settings: State) -> pb.PreviewPolicyResponse:
        call = egret.score.PreviewPolicy(pb.PreviewPolicyRequest(policy_yaml=document))
        return await refused_in_place(call, document, file, "policy_yaml")

    answer = run(ctx, work)
    show(state(ctx).output, answer, lambda: report_tables(answer.report))


@app.command()
@reflowed
def activate(
    ctx: typer.Context,
    file: PolicyFile,
    *,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Activate without asking.")] = False,
    expect_current: Annotated[
        str,
        typer.Option(
            "--expect-current",
            metavar="VERSION",
            help="Activate only if this is still the active version (the preview's, when asked).",
        ),
    ] = "",
) -> None:
    """Activate a policy: every subject is recomputed under it.

    Without --yes the command previews the change and asks for confirmation at a terminal
    (it refuses to run without one, exit 2), then activates only if the policy it previewed
    against is still the active one. A version is activated once: an earlier version comes
    back as a new version (egret policy show VERSION --document gives its document).
    """
    document = read_document(file)
    if not yes and not sys.stdin.isatty():
        raise fail(
            "activating a policy needs a confirmation: run it at a terminal, or pass --yes", Exit.USAGE
        )

    async def work(egret: Connection, settings: State) -> pb.ActivatePolicyResponse:
        expected = expect_current
        if not yes:
            call = egret.score.PreviewPolicy(pb.PreviewPolicyRequest(policy_yaml=document))
            planned = (await refused_in_place(call, document, file, "policy_yaml")).report
            if settings.output is Format.TABLE:
                report_tables(planned)
            question = (
                f"Activate policy {planned.proposed_version} in place of {planned.current_version}, "
                f"moving {planned.tier_changed:,} of {planned.subjects:,} subjects to another tier?"
            )
            if not typer.confirm(question, err=True):
                raise fail("not activated", Exit.FAILED)
            expected = expected or planned.current_version
        request = pb.ActivatePolicyRequest(policy_yaml=document, expected_current_version=expected)
        return await refused_in_place(egret.score.ActivatePolicy(request), document, file, "policy_yaml")

    answer = run(ctx, work)

    def draw() -> None:
        report_tables(answer.report)
        fields(
            [
                ("activated", answer.report.proposed_version),
                ("at", when(answer.activated_at)),
                ("subjects recomputed", f"{answer.subjects_recomputed:,}"),
            ]
        )

    show(state(ctx).output, answer, draw)


@app.command("list")
@reflowed
def list_policies(ctx: typer.Context) -> None:
    """Every policy activation, oldest first; the last is active."""

    async def work(egret: Connection, settings: State) -> pb.ListPoliciesResponse:
        return await egret.score.ListPolicies(pb.ListPoliciesRequest())

    answer = run(ctx, work)
    last = len(answer.activations) - 1
    emit(
        state(ctx).output,
        answer,
        columns=("version", "activated", "by", ""),
        rows=(
            (a.version, when(a.activated_at), a.activated_by, "active" if i == last else "")
            for i, a in enumerate(answer.activations)
        ),
    )


@app.command("show")
@reflowed
def show_policy(
    ctx: typer.Context,
    version: Annotated[
        str | None, typer.Argument(metavar="[VERSION]", help="An activated version; default: the active one.")
    ] = None,
    *,
    document: Annotated[bool, typer.Option("--document", help="Print only its YAML document.")] = False,
) -> None:
    """The active policy, or an earlier activated version, with its YAML document."""

    async def work(egret: Connection, settings: State) -> pb.PolicyActivation:
        if version is None:
            active = await egret.score.GetActivePolicy(pb.GetActivePolicyRequest())
            return pb.PolicyActivation(
                version=active.version, activated_at=active.activated_at, policy_yaml=active.policy_yaml
            )
        listed = await egret.score.ListPolicies(pb.ListPoliciesRequest())
        for activation in reversed(listed.activations):
            if activation.version == version:
                return activation
        known = ", ".join(a.version for a in listed.activations)
        raise fail(f"no policy version {version!r} was ever activated (activated: {known})")

    found = run(ctx, work)
    if document:
        sys.stdout.write(found.policy_yaml)
        return

    def draw() -> None:
        rows = [("version", found.version), ("activated", when(found.activated_at))]
        fields(rows + ([("by", found.activated_by)] if found.activated_by else []))
        out.print(found.policy_yaml, highlight=False, markup=False)

    show(state(ctx).output, found, draw)
