"""What `make run` hands a newcomer: a client profile per role, tokens, a sample CSV of
events and a candidate rule set under var/demo/, a README there, and commands that work
when copied (the `egret` CLI, and grpcurl with the TLS files and a token).

The README and the printed hints come from the same list of commands, and
tests/e2e/test_first_contact.py runs each of them against a cluster set up this way.
"""

from __future__ import annotations

import asyncio
import csv
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from devtools.client_config import default_identities, write_client_config
from devtools.cluster import Cluster
from devtools.localpki import OPERATOR
from devtools.oidc.config import SAMPLE_RESIDENT_ID
from egret.rules.v1 import rules_service_pb2
from egret_client import Connection, load_profile

# config/rulesets/ holds the rule sets rules starts with; the candidate is the active one
# with the late-library-book penalty doubled, so a backtest has something to show.
RULESETS = Path(__file__).resolve().parents[1] / "config" / "rulesets"
SAMPLE_EVENTS = 12


@dataclass(frozen=True)
class Command:
    """One thing to try: what it shows and the shell command, relative to the repository."""

    what: str
    shell: str


@dataclass(frozen=True)
class FirstContact:
    directory: Path
    config: Path
    commands: tuple[Command, ...]


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_sample_events(path: Path, resident_id: str = SAMPLE_RESIDENT_ID) -> Path:
    """A department's CSV export (the format `egret submit` reads, docs/cli-submit.md): the library's
    returns for the sample resident over the last weeks, twelve on time (a window rule awards
    points for 12 in a year) and one 45 days late (a penalty)."""
    today = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    header = ["event_id", "event_type", "subject_kind", "id_scheme", "id_value", "occurred_at"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "attr.on_time", "attr.days_late"])
        for i in range(SAMPLE_EVENTS):
            at = (today - timedelta(days=3 * (SAMPLE_EVENTS - i))).isoformat().replace("+00:00", "Z")
            row = [f"lib-demo-{i:04d}", "library.book_returned", "person", "resident-id", resident_id, at]
            writer.writerow([*row, "true", ""])
        late = (today - timedelta(days=1)).isoformat().replace("+00:00", "Z")
        row = ["lib-demo-late", "library.book_returned_late", "person", "resident-id", resident_id, late]
        writer.writerow([*row, "", "45"])
    return path


def write_candidate_rules(path: Path) -> Path:
    """The active sample rule set with the late-return penalty doubled: a candidate to backtest."""
    source = (RULESETS / "sample.yaml").read_text(encoding="utf-8")
    rule = source.index("id: library.late_return")
    points = source.index("points: -3", rule)
    candidate = source[:points] + "points: -6" + source[points + len("points: -3") :]
    candidate = candidate.replace("\nversion: 2\n", "\nversion: 3\n", 1)
    path.write_text(
        "# A candidate written by `make run`: config/rulesets/sample.yaml with the late-return\n"
        "# penalty doubled (-3 -> -6), as version 3. Backtest it (var/demo/README.md).\n" + candidate,
        encoding="utf-8",
    )
    return path


def store_candidate(config: Path, path: Path) -> int:
    """Store the candidate as a draft, as the reviewer profile (reviewers author rule sets);
    its id, for the admin's backtest command."""

    request = rules_service_pb2.CreateDraftRequest(source=path.read_text(encoding="utf-8"))

    async def draft() -> int:
        async with Connection(load_profile("reviewer", config)) as egret:
            return int((await egret.rules.CreateDraft(request)).rule_set.rule_set_id)

    return asyncio.run(draft())


def commands(directory: Path, config: Path, query_address: str, draft_id: int) -> tuple[Command, ...]:
    """The commands a newcomer copies, relative to the repository when the files are in it."""
    pki = directory / "pki"
    events = _relative(directory / "sample-events.csv")
    candidate = _relative(directory / "candidate-ruleset.yaml")
    subject = f"resident-id:{SAMPLE_RESIDENT_ID}"
    # Whole commands, so that any one can be copied alone: the venv's egret (make setup) with
    # the config make run wrote (or `source .venv/bin/activate; export EGRET_CONFIG=...`).
    egret = f".venv/bin/egret --config {shlex.quote(_relative(config))}"
    grpcurl_body = (
        '{"subject": {"subject": {"kind": "SUBJECT_KIND_PERSON", "id_scheme": "resident-id", '
        f'"id_value": "{SAMPLE_RESIDENT_ID}"}}}}, "purpose": "subject-request"}}'
    )
    token = _relative(directory / "tokens" / "reviewer.token")
    grpcurl = " ".join(
        [
            "grpcurl",
            f"-cacert {shlex.quote(_relative(pki / 'ca.pem'))}",
            f"-cert {shlex.quote(_relative(pki / f'{OPERATOR}.pem'))}",
            f"-key {shlex.quote(_relative(pki / f'{OPERATOR}-key.pem'))}",
            f'-H "authorization: Bearer $(cat {shlex.quote(token)})"',
            f"-d {shlex.quote(grpcurl_body)}",
            query_address,
            "egret.query.v1.QueryService/GetScore",
        ]
    )
    return (
        Command("submit a CSV file as a department (the library)", f"{egret} -p department submit {events}"),
        Command("read the sample resident's score as a reviewer", f"{egret} -p reviewer score get {subject}"),
        Command("why: each entry, its rule and evidence", f"{egret} -p reviewer score explain {subject}"),
        Command(
            f"backtest draft {draft_id} ({candidate}) against the stored history, as an admin",
            f"{egret} -p admin rules backtest {draft_id}",
        ),
        Command("the same score read with grpcurl (TLS, client certificate, token)", grpcurl),
    )


def write_first_contact(cluster: Cluster, directory: Path) -> FirstContact:
    """Tokens and profiles (devtools.client_config), the sample files and README.md."""
    config = write_client_config(cluster, directory, default_identities(SAMPLE_RESIDENT_ID))
    write_sample_events(directory / "sample-events.csv")
    candidate = write_candidate_rules(directory / "candidate-ruleset.yaml")
    steps = commands(directory, config, cluster.address("query"), store_candidate(config, candidate))
    readme = [
        "# This local Egret",
        "",
        "Written by `make run` (devtools/first_contact.py) and rewritten on every run; the",
        "services listen on loopback with TLS and signed tokens, as in production.",
        "",
        "| service | address |",
        "|---|---|",
        *(f"| {name} | `{cluster.address(name)}` |" for name in ("ingest", "rules", "score", "query")),
        "",
        "- `egret.yaml`: one `egret` profile per role (department, reviewer, auditor, admin,",
        "  benefit-provider, subject), each with its token in `tokens/` (24 h; renew with",
        "  `egret -p admin dev token --role ROLE -w var/demo/tokens/ROLE.token`).",
        "- `pki/`: the throwaway CA (`ca.pem`) and the client certificate every profile uses",
        "  (`operator.pem`, `operator-key.pem`; score requires mutual TLS).",
        "- `sample-events.csv`: a library's export about the sample resident;",
        "  `candidate-ruleset.yaml`: the sample rule set with one penalty doubled, stored as a",
        "  draft by the reviewer profile (reviewers author rule sets; admins may backtest them).",
        "",
        "From the repository's root, try in order (or `source .venv/bin/activate` and",
        f"`export EGRET_CONFIG={_relative(config)}`, then `egret -p ROLE ...`):",
        "",
        "```sh",
        *(line for step in steps for line in (f"# {step.what}", step.shell)),
        "```",
        "",
        "docs/integrators.md explains tokens, deadlines, retries and error details; docs/cli.md",
        "every `egret` command.",
        "",
    ]
    (directory / "README.md").write_text("\n".join(readme), encoding="utf-8")
    return FirstContact(directory, config, steps)


def print_first_contact(contact: FirstContact) -> None:
    print(f"\nTry it ({_relative(contact.directory / 'README.md')} says the same):")
    for step in contact.commands:
        print(f"  # {step.what}\n  {step.shell}")
