"""The `egret` command: global options, then one group per area.

    egret [--config FILE] [--profile NAME] [--output table|json|yaml] COMMAND ...

Exit codes: 0 done; 1 the service refused or failed the call; 2 bad arguments or bad
input; 3 configuration (config file, profile, TLS or token files); 4 not authenticated
or not permitted; 5 the service could not be reached in time.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from egret_client.cli import audit, cases, dev, events, policy, profiles, reads, rules, submit
from egret_client.cli.common import State
from egret_client.cli.output import Format

app = typer.Typer(
    name="egret",
    help="Egret's command line: submit events, read scores, manage rule sets, decide disputes, audit.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option(
            "--config", envvar="EGRET_CONFIG", help="Config file (default ~/.config/egret/config.yaml)."
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", envvar="EGRET_PROFILE", help="Profile (default: current-profile)."),
    ] = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="Output format.")] = Format.TABLE,
) -> None:
    ctx.obj = State(config=config, profile_name=profile, output=output)


app.add_typer(profiles.app, name="profile")
app.command("submit")(submit.submit)
app.add_typer(events.app, name="events")  # events retract|correct
app.add_typer(rules.app, name="rules")
app.add_typer(policy.app, name="policy")
app.add_typer(reads.app)  # score …, eligibility …, access-log
app.add_typer(cases.app)  # disputes …, repairs …
app.add_typer(audit.app)  # audit verify
app.add_typer(dev.app, name="dev")


def hoist_output(argv: list[str]) -> list[str]:
    """Move `-o/--output FORMAT` to the front, so it may follow the command as in kubectl
    (`egret score get … -o json`) while it stays one global option."""
    head: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        if arg in ("-o", "--output"):
            head += [arg, next(args, "")]
        elif arg.startswith("--output=") or (arg.startswith("-o") and len(arg) > 2):
            head.append(arg)
        else:
            rest.append(arg)
    return head + rest


def run() -> None:
    """The console script's entry point."""
    app(args=hoist_output(sys.argv[1:]), prog_name="egret")


if __name__ == "__main__":
    run()
