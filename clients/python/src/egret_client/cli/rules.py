"""`egret rules …`: rule sets for their authors (reviewers), read by auditors and admins.

    egret rules validate FILE            egret rules draft FILE
    egret rules diff [A] B               egret rules publish|activate|retire ID
    egret rules list                     egret rules show ID|active
    egret rules backtest ID [--detach]   egret rules backtests list|get|cancel

Every command calls RulesService; the format of a rule set is the service's
(docs/rules.md), so the command line only reads it to place a problem on its line and to
compare rules by id. The backtests live in backtests.py. docs/cli-rules.md is the reference.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import typer
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from rich.text import Text

from egret.rules.v1 import rules_service_pb2 as pb
from egret.rules.v1 import rules_service_pb2_grpc as pb_grpc
from egret_client.cli import backtests
from egret_client.cli.common import Exit, State, fail, listing, pages, run, show, state, when, word
from egret_client.cli.documents import problem_lines, problems_table, read_document, refused_in_place
from egret_client.cli.options import AllPages, PageSize, PageToken, reflowed
from egret_client.cli.output import Format, as_data, emit, err, fields, out, table
from egret_client.connection import Connection

app = typer.Typer(
    help="Rule sets: validate, compare, draft, publish, activate, retire, list, and backtest them.",
    no_args_is_help=True,
)
app.command("backtest")(backtests.start)
app.add_typer(backtests.app, name="backtests", no_args_is_help=True)

RuleSetId = Annotated[int, typer.Argument(metavar="ID", help="The rule set's id (egret rules list).")]
SourceFile = Annotated[str, typer.Argument(metavar="FILE", help="A rule-set YAML file, or - for stdin.")]


def status_word(status: int) -> str:
    return word(pb.RuleSetStatus, status)


@app.command()
@reflowed
def validate(ctx: typer.Context, file: SourceFile) -> None:
    """Check a rule-set file; nothing is stored.

    RulesService.ValidateRuleSet reports every problem at once; each is shown with its
    path in the document (rules[2] (traffic.red_light).points) and its line in the file.
    Exits 2 when the file is not a valid rule set.
    """
    source = read_document(file)

    async def work(egret: Connection, settings: State) -> pb.ValidateRuleSetResponse:
        return await egret.rules.ValidateRuleSet(pb.ValidateRuleSetRequest(source=source))

    answer = run(ctx, work)
    fmt = state(ctx).output
    if fmt is not Format.TABLE:
        data = {"valid": answer.valid, **as_data(answer)}  # proto3 JSON leaves a false out
        lines = problem_lines(source, answer.problems, "source")
        for item, line in zip(data.get("problems", []), lines, strict=True):
            item["line"] = line
        emit(fmt, data)
    elif answer.valid:
        fields(
            [
                ("valid", "yes"),
                ("name", answer.name),
                ("version", answer.version),
                ("rules", f"{len(answer.rule_ids)}: {', '.join(answer.rule_ids)}"),
            ]
        )
    else:
        problems_table(source, answer.problems, "source")
    if not answer.valid:
        count = len(answer.problems)
        raise fail(f"{file} is not a valid rule set: {count} problem{'s' if count != 1 else ''}", Exit.USAGE)


# -- comparing two rule sets -------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    ref: str  # as named on the command line
    label: str  # what it is, for the diff's header
    source: str


async def fetch_side(rules: pb_grpc.RulesServiceAsyncStub, ref: str, local: Mapping[str, str]) -> Side:
    """A rule set named on the command line: `active`, a stored id, or a file read before."""
    if ref in local:
        return Side(ref, ref, local[ref])
    if ref == "active":
        active = await rules.GetActiveRuleSet(pb.GetActiveRuleSetRequest())
        summary = active.rule_set
        label = f"active: {summary.name} v{summary.version} (id {summary.rule_set_id})"
        return Side(ref, label, active.source)
    stored = (await rules.GetRuleSet(pb.GetRuleSetRequest(rule_set_id=int(ref)))).rule_set
    label = f"id {stored.rule_set_id}: {stored.name} v{stored.version} ({status_word(stored.status)})"
    return Side(ref, label, stored.source)


def _rules_by_id(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The document's fields but `rules`, and its rules by id; empty when it does not parse."""
    try:
        document = yaml.safe_load(source)
    except yaml.YAMLError:
        return {}, {}
    if not isinstance(document, dict):
        return {}, {}
    rules = document.get("rules")
    by_id = {
        str(rule["id"]): rule
        for rule in (rules if isinstance(rules, list) else [])
        if isinstance(rule, dict) and "id" in rule
    }
    return {k: v for k, v in document.items() if k != "rules"}, by_id


def _changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [key for key in dict.fromkeys([*before, *after]) if before.get(key) != after.get(key)]


def rule_changes(before: str, after: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rules added, removed and changed (with the fields that changed), by id, in the
    order of the newer source then the removed ones; and the other top-level fields changed."""
    before_head, before_rules = _rules_by_id(before)
    after_head, after_rules = _rules_by_id(after)
    changes: list[dict[str, Any]] = []
    for rule_id, rule in after_rules.items():
        old = before_rules.get(rule_id)
        if old is None:
            changes.append({"rule_id": rule_id, "change": "added", "fields": []})
        elif old != rule:
            changes.append({"rule_id": rule_id, "change": "changed", "fields": _changed_keys(old, rule)})
    changes += [
        {"rule_id": rule_id, "change": "removed", "fields": []}
        for rule_id in before_rules
        if rule_id not in after_rules
    ]
    return changes, _changed_keys(before_head, after_head)


def print_unified(text: str) -> None:
    styles = {"+": "green", "-": "red", "@": "cyan"}
    for line in text.splitlines():
        style = "bold" if line.startswith(("+++", "---")) else styles.get(line[:1], "")
        out.print(Text(line, style=style))


@app.command()
@reflowed
def diff(
    ctx: typer.Context,
    first: Annotated[
        str, typer.Argument(metavar="A", help="ID, `active`, or a FILE (./3 for a file named 3).")
    ],
    second: Annotated[
        str | None,
        typer.Argument(metavar="[B]", help="The same; without it, A is compared with the active one."),
    ] = None,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit 1 when they differ, as `git diff --exit-code`.")
    ] = False,
) -> None:
    """Compare two rule sets: stored ones by id, the active one, or files.

    Prints the rules added, removed and changed (by id, with the fields that changed), then
    a unified diff of the sources (computed here; GetRuleSet gives a stored one's source).
    With one argument, the active rule set is compared with it.
    """
    before_ref, after_ref = ("active", first) if second is None else (first, second)
    local = {
        ref: read_document(ref) for ref in (before_ref, after_ref) if ref != "active" and not ref.isdigit()
    }

    async def work(egret: Connection, settings: State) -> tuple[Side, Side]:
        before = await fetch_side(egret.rules, before_ref, local)
        return before, await fetch_side(egret.rules, after_ref, local)

    before, after = run(ctx, work)
    changes, head = rule_changes(before.source, after.source)
    unified = "".join(
        difflib.unified_diff(
            before.source.splitlines(keepends=True),
            after.source.splitlines(keepends=True),
            fromfile=before.label,
            tofile=after.label,
        )
    )
    fmt = state(ctx).output
    if fmt is not Format.TABLE:
        emit(
            fmt,
            {
                "from": {"ref": before.ref, "label": before.label},
                "to": {"ref": after.ref, "label": after.label},
                "identical": not unified,
                "rules": changes,
                "document_fields_changed": head,
                "unified_diff": unified,
            },
        )
    elif not unified:
        err.print(f"no differences between {before.label} and {after.label}", highlight=False)
    else:
        if changes:
            table(
                ("rule", "change", "fields"),
                ((c["rule_id"], c["change"], ", ".join(c["fields"])) for c in changes),
                title="Rules",
            )
        if head:
            out.print(f"Also changed: {', '.join(head)}", highlight=False)
        print_unified(unified)
    if exit_code and unified:
        raise typer.Exit(int(Exit.FAILED))


# -- the lifecycle -----------------------------------------------------------------------------


def rule_set_rows(rule_set: pb.RuleSet) -> list[tuple[str, Any]]:
    def act(at: Timestamp, by: str) -> str:
        return f"{when(at)} by {by}" if by else when(at)

    return [
        ("id", rule_set.rule_set_id),
        ("name", rule_set.name),
        ("version", rule_set.version),
        ("status", status_word(rule_set.status)),
        ("rules", len(rule_set.rule_ids) or ""),  # only GetRuleSet sends the ids
        ("sha256", rule_set.source_sha256),
        ("created", act(rule_set.created_at, rule_set.created_by)),
        ("published", act(rule_set.published_at, rule_set.published_by)),
        ("activated", act(rule_set.activated_at, rule_set.activated_by)),
        ("retired", act(rule_set.retired_at, rule_set.retired_by)),
    ]


def show_rule_set(settings: State, answer: Any, rule_set: pb.RuleSet, *extra: tuple[str, Any]) -> None:
    """The call's answer as JSON/YAML, or the rule set's fields (the empty ones left out)."""
    rows = [(name, value) for name, value in [*rule_set_rows(rule_set), *extra] if value not in ("", None)]
    show(settings.output, answer, lambda: fields(rows))


@app.command()
@reflowed
def draft(ctx: typer.Context, file: SourceFile) -> None:
    """Store a rule-set file as a new draft.

    The file must be valid: otherwise nothing is stored, its problems are listed with their
    lines and the command exits 2. Publish the draft next: egret rules publish ID.
    """
    source = read_document(file)

    async def work(egret: Connection, settings: State) -> pb.CreateDraftResponse:
        call = egret.rules.CreateDraft(pb.CreateDraftRequest(source=source))
        return await refused_in_place(call, source, file, "source")

    answer = run(ctx, work)
    show_rule_set(state(ctx), answer, answer.rule_set)


@app.command()
@reflowed
def publish(ctx: typer.Context, rule_set_id: RuleSetId) -> None:
    """Publish a draft as an immutable version.

    The version written in its source must be greater than every published version of the
    same name.
    """

    async def work(egret: Connection, settings: State) -> pb.PublishRuleSetResponse:
        return await egret.rules.PublishRuleSet(pb.PublishRuleSetRequest(rule_set_id=rule_set_id))

    answer = run(ctx, work)
    show_rule_set(state(ctx), answer, answer.rule_set)


@app.command()
@reflowed
def activate(ctx: typer.Context, rule_set_id: RuleSetId) -> None:
    """Make a published rule set the active one.

    The swap is at once and on every replica, without a restart: every batch evaluated
    from then on uses it. Backtest it first: egret rules backtest ID.
    """

    async def work(egret: Connection, settings: State) -> pb.ActivateRuleSetResponse:
        return await egret.rules.ActivateRuleSet(pb.ActivateRuleSetRequest(rule_set_id=rule_set_id))

    answer = run(ctx, work)
    previous = answer.previous_rule_set_id or "none (it was active already)"
    show_rule_set(state(ctx), answer, answer.rule_set, ("previously active", previous))


@app.command()
@reflowed
def retire(ctx: typer.Context, rule_set_id: RuleSetId) -> None:
    """Retire a draft or a published rule set: it can no longer be activated.

    The active rule set cannot be retired: activate another one first.
    """

    async def work(egret: Connection, settings: State) -> pb.RetireRuleSetResponse:
        return await egret.rules.RetireRuleSet(pb.RetireRuleSetRequest(rule_set_id=rule_set_id))

    answer = run(ctx, work)
    show_rule_set(state(ctx), answer, answer.rule_set)


@app.command("show")
@reflowed
def show_one(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="ID|active", help="A rule set's id, or `active`.")],
    source: Annotated[bool, typer.Option("--source", help="Print only its YAML source.")] = False,
) -> None:
    """One rule set: its status, who did what when, its rule ids.

    With --source, only its YAML as stored, e.g. to edit it into the next version.
    """
    if ref != "active" and not ref.isdigit():
        raise typer.BadParameter(f"{ref!r}: name a rule set by its id, or `active`")

    async def work(egret: Connection, settings: State) -> pb.RuleSet:
        if ref != "active":
            return (await egret.rules.GetRuleSet(pb.GetRuleSetRequest(rule_set_id=int(ref)))).rule_set
        active = await egret.rules.GetActiveRuleSet(pb.GetActiveRuleSetRequest())
        return (
            await egret.rules.GetRuleSet(pb.GetRuleSetRequest(rule_set_id=active.rule_set.rule_set_id))
        ).rule_set

    rule_set = run(ctx, work)
    if source:
        sys.stdout.write(rule_set.source)
        return
    show_rule_set(state(ctx), rule_set, rule_set, ("rule ids", ", ".join(rule_set.rule_ids)))


class Status(StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"
    ACTIVE = "active"
    RETIRED = "retired"


@app.command("list")
@reflowed
def list_rule_sets(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Option("--name", help="Only rule sets of this name.")] = "",
    status: Annotated[Status | None, typer.Option("--status", help="Only rule sets in this status.")] = None,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
) -> None:
    """The stored rule sets, oldest first, one page at a time (--all for every page)."""
    wanted = f"RULE_SET_STATUS_{status.upper()}" if status else None

    async def work(egret: Connection, settings: State) -> pb.ListRuleSetsResponse:
        def page(token: str) -> Awaitable[pb.ListRuleSetsResponse]:
            request = pb.ListRuleSetsRequest(name=name, status=wanted, page_size=page_size, page_token=token)
            return egret.rules.ListRuleSets(request)

        return await pages(page, page_token, all_pages)

    answer = run(ctx, work)
    listing(
        ctx,
        answer,
        ("id", "name", "version", "status", "created", "created by", "activated"),
        (
            (
                r.rule_set_id,
                r.name,
                r.version,
                status_word(r.status),
                when(r.created_at),
                r.created_by,
                when(r.activated_at),
            )
            for r in answer.rule_sets
        ),
    )
