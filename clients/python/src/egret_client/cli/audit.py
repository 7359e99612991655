"""`egret audit verify`: every service's hash-chained audit log walked by the service itself
(egret.common.v1.AuditChainService, as its `verify-audit` command does), with the anchors
given and the service's automatic ones. Exit 1 when any chain is broken."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from egret.common.v1 import audit_chain_pb2
from egret_client.cli.common import Exit, State, fail, run, show, when, yes_no
from egret_client.cli.options import reflowed
from egret_client.cli.output import fields
from egret_client.connection import Connection
from egret_client.profile import SERVICES

app = typer.Typer()
audit_app = typer.Typer(help="The services' hash-chained audit logs.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def anchors_by_service(given: list[str]) -> dict[str, list[str]]:
    """`--anchor SERVICE=SEQ:HASH` options, grouped by service (each service checks its own)."""
    grouped: dict[str, list[str]] = {name: [] for name in SERVICES}
    for text in given:
        service, sep, anchor = text.partition("=")
        if not sep or service not in grouped or not anchor:
            raise typer.BadParameter(
                f"{text!r}: write SERVICE=SEQ:HASH, SERVICE one of {', '.join(SERVICES)}",
                param_hint="'--anchor'",
            )
        grouped[service].append(anchor)
    return grouped


def chain_fields(chain: audit_chain_pb2.VerifyAuditChainResponse) -> list[tuple[str, object]]:
    anchor = f"{chain.last_seq}:{chain.last_hash}" if chain.records else "none (empty log)"
    return [
        ("intact", yes_no(chain.intact)),
        ("records", chain.records),
        ("anchor", anchor),
        ("anchors checked", chain.anchors_checked),
        ("verified at", when(chain.verified_at)),
        *(("problem", problem) for problem in chain.problems),
    ]


@audit_app.command("verify")
@reflowed
def verify(
    ctx: typer.Context,
    *,
    anchor: Annotated[
        list[str] | None,
        typer.Option(
            "--anchor",
            help="An anchor kept outside the database, SERVICE=SEQ:HASH as a verification printed"
            " it (repeatable); checked with the service's automatic anchors.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Verify the audit chains of all four services; exit 1 if any is broken.

    AuditChainService.VerifyAuditChain on each: records walked, the anchor to keep outside
    the database (SEQ:HASH), anchors checked and every problem found. For auditors and
    admins.
    """
    anchors = anchors_by_service(anchor or [])

    async def work(egret: Connection, settings: State) -> list[audit_chain_pb2.VerifyAuditChainResponse]:
        return await asyncio.gather(
            *(
                egret.audit_chain(service).VerifyAuditChain(
                    audit_chain_pb2.VerifyAuditChainRequest(anchors=anchors[service])
                )
                for service in SERVICES
            )
        )

    chains = run(ctx, work)
    intact = all(chain.intact for chain in chains)

    def draw() -> None:
        for chain in chains:
            fields(chain_fields(chain), title=f"{chain.service}: {'intact' if chain.intact else 'BROKEN'}")

    show(ctx.obj.output, {"intact": intact, "chains": chains}, draw)
    if not intact:
        broken = ", ".join(chain.service for chain in chains if not chain.intact)
        raise fail(f"audit chain broken: {broken}", Exit.FAILED)
