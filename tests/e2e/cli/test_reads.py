"""`egret score get|explain|history|entries`, `egret eligibility check`, `egret access-log` and
`egret audit verify` against the four real services: the library reports two late returns
of the subject profile's resident (-3 civic each, so 994, tier A) through the raw API, and
each command reads them back as a table and as JSON; refusals exit non-zero with the
status in words on stderr."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from tests.support.cli import DAY, RESIDENT_ID, Egret, late_returns, record, rows, submit_as_library
from tests.support.events import resident_id

SUBJECT = f"resident-id:{RESIDENT_ID}"
# A well-formed resident Egret holds nothing for.
STRANGER = f"resident-id:{resident_id(424242)}"
NOTE = "case 2026-118"


@pytest.fixture(scope="module")
def world(egret: Egret) -> Egret:
    submit_as_library(egret.cluster, late_returns(10, 5))
    return egret


def test_score_get_shows_the_score_as_a_table_json_and_yaml(world: Egret) -> None:
    shown = world("-p", "reviewer", "score", "get", SUBJECT)
    assert shown.code == 0, shown.stderr
    fields = record(shown.stdout)
    assert (fields["score"], fields["tier"], fields["counting entries"]) == ("994", "A", "2")
    assert ["civic", "-6", "2", "0"] in rows(shown.stdout)

    score = world("-p", "reviewer", "score", "get", SUBJECT, "-o", "json").json()
    assert (score["score"], score["tier"], score["entry_count"]) == (994, "A", 2)
    assert score["categories"] == [{"category": "civic", "points": -6, "entry_count": 2}]
    assert score["subject_kind"] == "SUBJECT_KIND_PERSON"

    as_yaml = yaml.safe_load(world("-p", "reviewer", "-o", "yaml", "score", "get", SUBJECT).stdout)
    assert as_yaml["score"] == 994


def test_a_subject_reads_its_own_score_without_naming_itself(world: Egret) -> None:
    own = world("-p", "subject", "score", "get", "-o", "json")
    assert own.code == 0, own.stderr
    assert own.json()["score"] == 994


def test_score_get_as_of_a_past_instant_and_its_refusals(world: Egret) -> None:
    # Nothing was recorded a day ago: NOT_FOUND, exit 1.
    before = (DAY - timedelta(days=1)).isoformat()
    missing = world("-p", "reviewer", "score", "get", SUBJECT, "--as-of", before)
    assert missing.code == 1
    assert "NOT_FOUND" in missing.stderr
    bad = world("-p", "reviewer", "score", "get", SUBJECT, "--as-of", "last tuesday")
    assert bad.code == 2
    assert "--as-of" in bad.stderr
    unknown = world("-p", "reviewer", "score", "get", STRANGER)
    assert unknown.code == 1
    assert "NOT_FOUND" in unknown.stderr


def test_score_explain_shows_each_entry_and_the_path_to_the_next_tier(world: Egret) -> None:
    shown = world("-p", "reviewer", "score", "explain", SUBJECT)
    assert shown.code == 0, shown.stderr
    assert "library.late_return" in shown.stdout
    assert "AA at 1030: 36 points to go" in shown.stdout
    assert "projection" in shown.stdout

    explanation = world("-p", "reviewer", "score", "explain", SUBJECT, "-o", "json").json()
    assert explanation["score"] == 994
    assert [e["contribution"] for e in explanation["entries"]] == [-3, -3]
    assert all(e["counting"] for e in explanation["entries"])
    assert explanation["next_tier"] == {"tier": "AA", "min_score": 1030, "points_needed": 36}


def test_score_history_lists_the_changes_newest_first(world: Egret) -> None:
    shown = world("-p", "reviewer", "score", "history", SUBJECT)
    assert shown.code == 0, shown.stderr
    assert "entries" in shown.stdout  # the cause
    assert "994" in shown.stdout

    changes = world("-p", "reviewer", "score", "history", SUBJECT, "-o", "json").json()["changes"]
    assert changes[0]["score"] == 994
    assert changes[0]["cause"] == "CHANGE_CAUSE_ENTRIES"
    assert sum(len(c.get("added_entry_ids", [])) for c in changes) == 2


def test_score_entries_pages_and_follows_every_page_with_all(world: Egret) -> None:
    first = world("-p", "reviewer", "score", "entries", SUBJECT, "--page-size", "1", "-o", "json").json()
    assert len(first["entries"]) == 1
    assert first["next_page_token"]
    second = world(
        "-p", "reviewer", "score", "entries", SUBJECT, "--page-size", "1", "--page-token",
        first["next_page_token"], "-o", "json",
    ).json()  # fmt: skip
    assert [e["entry_id"] for e in second["entries"]] != [e["entry_id"] for e in first["entries"]]

    every = world(
        "-p", "reviewer", "score", "entries", SUBJECT, "--page-size", "1", "--all", "-o", "json"
    ).json()
    assert len(every["entries"]) == 2
    assert "next_page_token" not in every
    assert {e["rule"]["rule_id"] for e in every["entries"]} == {"library.late_return"}

    table = world("-p", "reviewer", "score", "entries", SUBJECT, "--page-size", "1")
    assert table.code == 0, table.stderr
    (entry,) = (cells for cells in rows(table.stdout) if cells[0] == first["entries"][0]["entry_id"])
    assert entry[2:8] == ["library.late_return", "civic", "-3", "minor", "active", entry[7]]
    assert f"--page-token {first['next_page_token']}" in table.stderr


def test_eligibility_check_for_the_provider_and_the_subject_itself(world: Egret) -> None:
    shown = world("-p", "benefit-provider", "eligibility", "check", SUBJECT, "library.deposit_free")
    assert shown.code == 0, shown.stderr
    assert record(shown.stdout)["eligible"] == "yes"
    assert record(shown.stdout)["categories considered"] == "civic"
    assert any(cells[:1] == ["tier at least A"] and cells[2] == "yes" for cells in rows(shown.stdout))

    answer = world(
        "-p", "benefit-provider", "eligibility", "check", SUBJECT, "library.deposit_free",
        "--purpose-note", "application 77", "-o", "json",
    ).json()  # fmt: skip
    assert answer["eligible"] is True
    assert answer["purpose_bound_score"]["considers"] == ["civic"]
    assert answer["purpose_bound_score"]["score"] == 994
    assert len(answer["reasons"][0]["entry_ids"]) == 2

    own = world("-p", "subject", "eligibility", "check", "library.deposit_free", "-o", "json")
    assert own.code == 0, own.stderr
    assert own.json()["eligible"] is True


def test_access_log_shows_who_read_with_which_purpose_and_note(world: Egret) -> None:
    read = world("-p", "reviewer", "score", "get", SUBJECT, "--purpose-note", NOTE)
    assert read.code == 0, read.stderr

    records = world("-p", "auditor", "access-log", SUBJECT, "-o", "json").json()["records"]
    noted = [r for r in records if r.get("purpose_note") == NOTE]
    assert noted
    assert noted[0]["actor"] == "reviewer-demo"
    assert (noted[0]["role"], noted[0]["purpose"], noted[0]["method"]) == (
        "reviewer",
        "subject-request",
        "GetScore",
    )
    assert records[0]["method"] == "ListAccessLog"  # the read of the log is recorded first

    shown = world("-p", "subject", "access-log")
    assert shown.code == 0, shown.stderr
    readers = {(cells[1], cells[2], cells[4]) for cells in rows(shown.stdout)}
    assert ("reviewer-demo", "reviewer", "subject-request") in readers
    assert ("library", "benefit_provider", "eligibility-check") in readers
    assert NOTE in shown.stdout


READS = [
    ("score", "get", SUBJECT),
    ("score", "explain", SUBJECT),
    ("score", "history", SUBJECT),
    ("score", "entries", SUBJECT),
    ("eligibility", "check", SUBJECT, "library.deposit_free"),
    ("access-log", SUBJECT),
]


@pytest.mark.parametrize("command", READS, ids=lambda c: " ".join(c[:2]))
def test_a_department_is_refused_every_read_with_exit_4(world: Egret, command: tuple[str, ...]) -> None:
    refused = world("-p", "department", *command, "--purpose", "subject-request")
    assert refused.code == 4, (refused.stdout, refused.stderr)
    assert "PERMISSION_DENIED" in refused.stderr
    assert refused.stdout == ""


@pytest.mark.parametrize("command", READS, ids=lambda c: " ".join(c[:2]))
def test_staff_without_a_purpose_are_refused_with_exit_2_naming_the_field(
    world: Egret, command: tuple[str, ...]
) -> None:
    profile = "auditor" if command[0] == "access-log" else "reviewer"
    refused = world("-p", profile, *command, "--purpose", "")
    assert refused.code == 2, (refused.stdout, refused.stderr)
    assert "INVALID_ARGUMENT" in refused.stderr
    assert "  purpose:" in refused.stderr


def test_bad_input_is_refused_with_exit_2(world: Egret) -> None:
    unnamed = world("-p", "reviewer", "score", "get")  # only a subject may leave itself out
    assert unnamed.code == 2
    assert "  subject:" in unnamed.stderr
    malformed = world("-p", "reviewer", "score", "get", "11010519491231002X")
    assert malformed.code == 2
    assert "SCHEME:VALUE" in malformed.stderr
    noted = world("-p", "reviewer", "score", "entries", SUBJECT, "--purpose-note", f"about {RESIDENT_ID}")
    assert noted.code == 2
    assert "  purpose_note:" in noted.stderr
    paged = world("-p", "reviewer", "score", "history", SUBJECT, "--page-size", "501")
    assert paged.code == 2


def test_a_reviewer_may_not_read_the_access_log(world: Egret) -> None:
    refused = world("-p", "reviewer", "access-log", SUBJECT)
    assert refused.code == 4
    assert "PERMISSION_DENIED" in refused.stderr


def test_audit_verify_checks_all_four_chains_and_the_anchors_given(world: Egret) -> None:
    shown = world("-p", "auditor", "audit", "verify")
    assert shown.code == 0, shown.stderr
    for service in ("ingest", "rules", "score", "query"):
        assert f"{service}: intact" in shown.stdout

    report = world("-p", "auditor", "audit", "verify", "-o", "json").json()
    assert report["intact"] is True
    chains = {c["service"]: c for c in report["chains"]}
    assert set(chains) == {"ingest", "rules", "score", "query"}
    # Query's log holds the reads above; its anchor checks, a forged one does not.
    query = chains["query"]
    assert int(query["records"]) > 0
    anchor = f"{query['last_seq']}:{query['last_hash']}"
    kept = world("-p", "auditor", "audit", "verify", "--anchor", f"query={anchor}", "-o", "json").json()
    again = {c["service"]: c for c in kept["chains"]}["query"]
    assert again["intact"] is True
    assert again.get("anchors_checked", 0) == query.get("anchors_checked", 0) + 1

    forged = world("-p", "auditor", "audit", "verify", "--anchor", f"query={query['last_seq']}:{'0' * 64}")
    assert forged.code == 1
    assert "query: BROKEN" in forged.stdout
    assert "score: intact" in forged.stdout
    assert "hash differs from its anchor" in forged.stdout
    assert "audit chain broken: query" in forged.stderr


def test_audit_verify_refusals(world: Egret) -> None:
    denied = world("-p", "reviewer", "audit", "verify")
    assert denied.code == 4
    assert "PERMISSION_DENIED" in denied.stderr
    malformed = world("-p", "auditor", "audit", "verify", "--anchor", "score=12")
    assert malformed.code == 2
    assert "anchors[0]" in malformed.stderr
    unknown = world("-p", "auditor", "audit", "verify", "--anchor", "portal=1:ab")
    assert unknown.code == 2
    assert "SERVICE=SEQ:HASH" in unknown.stderr
