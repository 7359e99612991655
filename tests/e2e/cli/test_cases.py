"""`egret disputes list|show|resolve` and `egret repairs list|decide` against the four real
services. The library reports three late returns of the subject profile's resident and one
of another resident (-3 civic each, minor: repairable at once) through the raw API; through
score's API the resident disputes two entries and applies for repair of the third, and the
other resident disputes its own (as tests/e2e/test_due_process.py does). A reviewer then
works the queues with the CLI. The tests run in file order: the lists before the decisions."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from devtools.cluster import Cluster
from egret.common.v1 import due_process_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from tests.support.cli import EGRET, RESIDENT_ID, Egret, late_returns, record, rows, submit_as_library
from tests.support.events import resident_id
from tests.support.waiting import wait_until

SUBJECT = f"resident-id:{RESIDENT_ID}"
NEIGHBOUR_ID = resident_id(77)
NEIGHBOUR = f"resident-id:{NEIGHBOUR_ID}"


@dataclass(frozen=True)
class Filed:
    """What the residents filed through score's API."""

    own: list[due_process_pb2.Dispute]  # the resident's, of late-0 and late-1
    neighbour: due_process_pb2.Dispute
    repair: due_process_pb2.RepairApplication  # the resident's, of late-2


async def _file(
    cluster: Cluster, subject_id: str, disputes: dict[str, str], repair: str = ""
) -> tuple[list[due_process_pb2.Dispute], due_process_pb2.RepairApplication | None]:
    """As the subject through the raw API: dispute the entries of the events named in
    `disputes` (event id → statement) and apply for repair of the entry of `repair`."""
    token = cluster.token(f"person:resident-id:{subject_id}", Role.SUBJECT)
    async with cluster.channel("query", token) as channel:
        listed = await query_grpc.QueryServiceStub(channel).ListEntries(
            query_pb.ListEntriesRequest(), timeout=10
        )
    by_event = {entry.event_refs[0].event_id: entry.entry_id for entry in listed.entries}
    filed = []
    application = None
    async with cluster.channel("score", token) as channel:
        score = score_grpc.ScoreServiceStub(channel)
        for event_id, statement in disputes.items():
            request = score_pb.FileDisputeRequest(entry_id=by_event[event_id], statement=statement)
            filed.append((await score.FileDispute(request, timeout=10)).dispute)
        if repair:
            applied = score_pb.ApplyForRepairRequest(
                entry_id=by_event[repair], evidence="I volunteered at the library for a month"
            )
            application = (await score.ApplyForRepair(applied, timeout=10)).application
    return filed, application


@pytest.fixture(scope="module")
def filed(egret: Egret) -> Filed:
    cluster = egret.cluster
    submit_as_library(
        cluster, [*late_returns(12, 9, 6), *late_returns(8, subject_id=NEIGHBOUR_ID, prefix="nb")]
    )
    own, application = asyncio.run(
        _file(
            cluster,
            RESIDENT_ID,
            {"late-0": "I returned it on time, at the night box", "late-1": "The book was already damaged"},
            repair="late-2",
        )
    )
    neighbour, _ = asyncio.run(_file(cluster, NEIGHBOUR_ID, {"nb-0": "I was abroad then"}))
    assert application is not None
    return Filed(own, neighbour[0], application)


def _ids(listed: dict[str, Any], key: str, id_field: str) -> list[str]:
    return [str(item[id_field]) for item in listed.get(key, [])]


def _open_disputes(egret: Egret) -> list[str]:
    """The resident's open disputes, as the reviewer lists them."""
    listed = egret("-p", "reviewer", "disputes", "list", "--status", "open", "--subject", SUBJECT, "-ojson")
    return _ids(listed.json(), "disputes", "dispute_id")


def test_disputes_list_shows_the_queue_and_applies_every_filter(egret: Egret, filed: Filed) -> None:
    own, neighbour = filed.own, filed.neighbour
    every = {d.dispute_id for d in own} | {neighbour.dispute_id}

    shown = egret("-p", "reviewer", "disputes", "list", "--purpose", "dispute-review")
    assert shown.code == 0, shown.stderr
    table = {cells[0]: cells for cells in rows(shown.stdout)}
    assert every <= set(table)
    first = own[0]
    assert table[first.dispute_id][1:3] == [first.entry_id, "open"]
    assert table[first.dispute_id][5] == ""  # no one holds it
    assert table[first.dispute_id][6].startswith("subject ")
    assert table[first.dispute_id][7] == "I returned it on time, at the night box"

    def listed(*options: str) -> list[str]:
        result = egret("-p", "reviewer", "disputes", "list", *options, "-o", "json")
        assert result.code == 0, result.stderr
        return _ids(result.json(), "disputes", "dispute_id")

    assert set(listed()) == every
    assert set(listed("--subject", SUBJECT)) == {d.dispute_id for d in own}
    assert listed("--subject", NEIGHBOUR) == [neighbour.dispute_id]
    assert set(listed("--status", "open", "--department", "library", "--category", "civic")) == every
    assert listed("--status", "upheld") == []
    assert listed("--department", "metro") == []
    assert listed("--overdue") == []
    assert set(listed("--unassigned")) == every
    assert listed("--mine") == []

    one = egret("-p", "reviewer", "disputes", "list", "--page-size", "1", "-o", "json").json()
    assert len(one["disputes"]) == 1
    assert one["next_page_token"]
    assert set(listed("--page-size", "1", "--all")) == every
    paged = egret("-p", "reviewer", "disputes", "list", "--page-size", "1")
    assert f"--page-token {one['next_page_token']}" in paged.stderr


def test_a_subject_lists_only_its_own_disputes(egret: Egret, filed: Filed) -> None:
    own = filed.own
    result = egret("-p", "subject", "disputes", "list", "-o", "json")
    assert result.code == 0, result.stderr
    assert set(_ids(result.json(), "disputes", "dispute_id")) == {d.dispute_id for d in own}


def _noted_reads(egret: Egret, subject: str, note: str) -> list[str]:
    """The reads of the subject's data recorded with this purpose note, newest first."""
    log = egret("-p", "auditor", "access-log", subject, "--all", "-o", "json").json()
    return [r["method"] for r in log.get("records", []) if r.get("purpose_note") == note]


def test_disputes_show_gives_the_dispute_its_entry_and_the_evidence(egret: Egret, filed: Filed) -> None:
    own = filed.own
    dispute = own[0]
    shown = egret(
        "-p", "reviewer", "disputes", "show", dispute.dispute_id,
        "--purpose", "dispute-review", "--purpose-note", "case 4711",
    )  # fmt: skip
    assert shown.code == 0, shown.stderr
    # Only that dispute was read: its subject's access log records the read, no one else's.
    assert _noted_reads(egret, SUBJECT, "case 4711") == ["GetEntry", "ListDisputes"]
    assert _noted_reads(egret, NEIGHBOUR, "case 4711") == []
    fields = record(shown.stdout)
    assert fields["dispute"] == dispute.dispute_id
    assert fields["statement"] == "I returned it on time, at the night box"
    assert fields["assignee"] == "no one"
    assert fields["rule"].startswith("library.late_return")
    assert fields["points"] == "-3 civic"
    evidence = [cells for cells in rows(shown.stdout) if cells[0] == "library/late-0"]
    assert evidence
    assert evidence[0][1] == "library.book_returned_late"
    assert evidence[0][4] == "days_late=40"
    assert evidence[0][5] == "https://records.example.gov/late-0"

    as_json = egret(
        "-p", "reviewer", "disputes", "show", dispute.dispute_id, "--subject", SUBJECT, "-o", "json"
    )
    assert as_json.code == 0, as_json.stderr
    answer = as_json.json()
    assert answer["dispute"]["dispute_id"] == dispute.dispute_id
    assert answer["dispute"]["status"] == "DISPUTE_STATUS_OPEN"
    assert answer["entry"]["entry_id"] == dispute.entry_id
    assert answer["entry"]["status"] == "ENTRY_STATUS_DISPUTED"
    (event,) = answer["entry"]["evidence"]
    assert event["ref"] == {"source": "library", "event_id": "late-0"}
    assert event["attributes"]["days_late"] == {"int_value": "40"}


def test_disputes_show_of_an_unknown_dispute_is_not_found(egret: Egret, filed: Filed) -> None:
    missing = egret("-p", "reviewer", "disputes", "show", "999999")
    assert missing.code == 1
    assert "NOT_FOUND" in missing.stderr
    assert missing.stdout == ""
    # Another subject's dispute is not found among this subject's.
    neighbour = filed.neighbour
    elsewhere = egret("-p", "reviewer", "disputes", "show", neighbour.dispute_id, "--subject", SUBJECT)
    assert elsewhere.code == 1
    assert "NOT_FOUND" in elsewhere.stderr


def test_repairs_list_shows_the_pending_application(egret: Egret, filed: Filed) -> None:
    application = filed.repair
    shown = egret("-p", "reviewer", "repairs", "list", "--purpose", "repair-review")
    assert shown.code == 0, shown.stderr
    table = {cells[0]: cells for cells in rows(shown.stdout)}
    assert table[application.application_id][1:3] == [application.entry_id, "pending"]
    assert table[application.application_id][7] == "I volunteered at the library for a month"

    listed = egret(
        "-p", "reviewer", "repairs", "list", "--status", "pending", "--subject", SUBJECT, "-o", "json"
    )
    assert listed.code == 0, listed.stderr
    (found,) = listed.json()["applications"]
    assert (found["application_id"], found["status"]) == (application.application_id, "REPAIR_STATUS_PENDING")
    assert egret("-p", "reviewer", "repairs", "list", "--status", "approved", "-o", "json").json() == {}
    own = egret("-p", "subject", "repairs", "list", "-o", "json").json()
    assert _ids(own, "applications", "application_id") == [application.application_id]


def test_a_decision_asks_for_confirmation_and_refuses_to_ask_without_a_terminal(
    egret: Egret, filed: Filed
) -> None:
    own, application = filed.own, filed.repair
    for command in (
        ("disputes", "resolve", own[0].dispute_id, "overturn"),
        ("repairs", "decide", application.application_id, "approve"),
    ):
        refused = egret("-p", "reviewer", *command, "--reason", "checked", input_text="y\n")
        assert refused.code == 2, (refused.stdout, refused.stderr)
        assert "pass --yes" in refused.stderr
    assert own[0].dispute_id in _open_disputes(egret)


def test_a_decision_not_confirmed_at_the_terminal_sends_nothing(egret: Egret, filed: Filed) -> None:
    """At a terminal the question is asked on stderr; answering no decides nothing (exit 1)."""
    dispute = filed.own[0]
    controller, terminal = os.openpty()
    try:
        with subprocess.Popen(
            [EGRET, "-p", "reviewer", "disputes", "resolve", dispute.dispute_id, "overturn", "-r", "checked"],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "EGRET_CONFIG": str(egret.config), "NO_COLOR": "1", "COLUMNS": "200"},
        ) as asked:
            os.write(controller, b"n\n")
            stdout, stderr = asked.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert asked.returncode == 1, (stdout, stderr)
    assert f"Overturn dispute {dispute.dispute_id}" in stderr
    assert "nothing was decided" in stderr
    assert dispute.dispute_id in _open_disputes(egret)


def test_a_reviewer_overturns_and_upholds_disputes(egret: Egret, filed: Filed) -> None:
    own, neighbour = filed.own, filed.neighbour
    reason = "the night box log shows the return on time"
    overturned = egret(
        "-p", "reviewer", "disputes", "resolve", own[0].dispute_id, "overturn", "-r", reason, "--yes"
    )
    assert overturned.code == 0, overturned.stderr
    fields = record(overturned.stdout)
    assert fields["status"] == "overturned"
    assert fields["reason"] == reason
    assert fields["decided"].endswith("by reviewer-demo")

    upheld = egret(
        "-p", "reviewer", "disputes", "resolve", neighbour.dispute_id, "uphold",
        "--reason", "the loan record", "--yes", "-o", "json",
    )  # fmt: skip
    assert upheld.code == 0, upheld.stderr
    decided = upheld.json()
    assert (decided["status"], decided["resolved_by"]) == ("DISPUTE_STATUS_UPHELD", "reviewer-demo")

    again = egret(
        "-p", "reviewer", "disputes", "resolve", own[0].dispute_id, "uphold", "-r", "second look", "-y"
    )
    assert again.code == 1
    assert "FAILED_PRECONDITION" in again.stderr
    assert "ALREADY_DECIDED" in again.stderr
    listed = egret("-p", "reviewer", "disputes", "list", "--status", "overturned", "-o", "json").json()
    assert _ids(listed, "disputes", "dispute_id") == [own[0].dispute_id]


def test_a_reviewer_approves_a_repair_and_the_score_recovers(egret: Egret, filed: Filed) -> None:
    application = filed.repair
    approved = egret(
        "-p", "reviewer", "repairs", "decide", application.application_id, "approve",
        "--reason", "a month of volunteering", "--yes", "-o", "json",
    )  # fmt: skip
    assert approved.code == 0, approved.stderr
    decided = approved.json()
    assert (decided["status"], decided["decided_by"]) == ("REPAIR_STATUS_APPROVED", "reviewer-demo")
    assert decided["decision_reason"] == "a month of volunteering"

    # Three entries of -3: one overturned, one repaired; the one still disputed counts.
    _wait_for_score(egret, 997)

    table = egret(
        "-p", "reviewer", "repairs", "decide", application.application_id, "reject", "-r", "no", "-y"
    )
    assert table.code == 1
    assert "ALREADY_DECIDED" in table.stderr


def _wait_for_score(egret: Egret, expected: int) -> None:
    """Reads the resident's own score until it is `expected` (score recomputes after the act)."""

    def reached() -> None:
        score = int(egret("-p", "subject", "score", "get", "-o", "json").json()["score"])
        assert score == expected, score

    wait_until(reached, what=f"the resident's score to become {expected}", within_s=5, every_s=0.25)


def test_unknown_cases_are_not_found(egret: Egret, filed: Filed) -> None:
    for command in (
        ("disputes", "resolve", "999999", "uphold"),
        ("repairs", "decide", "999999", "reject"),
    ):
        missing = egret("-p", "reviewer", *command, "--reason", "none such", "--yes")
        assert missing.code == 1, (missing.stdout, missing.stderr)
        assert "NOT_FOUND" in missing.stderr


READ = ("--purpose", "subject-request")


@pytest.mark.parametrize(
    ("profile", "command"),
    [
        ("department", ("disputes", "list", *READ)),
        ("department", ("disputes", "show", "1", *READ)),
        ("department", ("repairs", "list", *READ)),
        ("benefit-provider", ("disputes", "list", *READ)),
        ("auditor", ("disputes", "resolve", "1", "uphold", "--reason", "audit", "--yes")),
        ("admin", ("repairs", "decide", "1", "approve", "--reason", "admin", "--yes")),
        ("subject", ("disputes", "resolve", "1", "overturn", "--reason", "mine", "--yes")),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value[:2]),
)
def test_the_wrong_role_is_refused_with_exit_4(
    egret: Egret, filed: Filed, profile: str, command: tuple[str, ...]
) -> None:
    refused = egret("-p", profile, *command)
    assert refused.code == 4, (refused.stdout, refused.stderr)
    assert "PERMISSION_DENIED" in refused.stderr


def test_bad_input_is_refused_with_exit_2(egret: Egret, filed: Filed) -> None:
    for command in (("disputes", "list"), ("repairs", "list"), ("disputes", "show", "1")):
        refused = egret("-p", "reviewer", *command, "--purpose", "")
        assert refused.code == 2, (command, refused.stdout, refused.stderr)
        assert "  purpose:" in refused.stderr
    exclusive = egret("-p", "reviewer", "disputes", "list", "--mine", "--unassigned")
    assert exclusive.code == 2
    assert "unassigned_only" in exclusive.stderr
    no_reason = egret("-p", "reviewer", "disputes", "resolve", "1", "uphold", "--reason", " ", "--yes")
    assert no_reason.code == 2
    assert "  reason:" in no_reason.stderr
    missing_reason = egret("-p", "reviewer", "repairs", "decide", "1", "approve", "--yes")
    assert missing_reason.code == 2
    assert "--reason" in missing_reason.stderr
    bad_decision = egret("-p", "reviewer", "disputes", "resolve", "1", "dismiss", "-r", "x", "--yes")
    assert bad_decision.code == 2
