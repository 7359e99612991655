"""`egret rules …` against the four real services: a rule set's lifecycle from a file (the
sample rule set, and a candidate made from it that takes 60 points instead of 3 for a late
library return), its problems at their path and line, comparisons, and backtests in the
background (followed to their report, detached and read again, cancelled by Ctrl-C).

History: 40 residents each returned a book 40 days late yesterday, so the active sample
gives each 997 (tier A) and the candidate 940 (tier B)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import Egret, late_residents, record, rows, spawn

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "config" / "rulesets" / "sample.yaml"
RESIDENTS = 40


def candidate_source() -> str:
    source = SAMPLE.read_text(encoding="utf-8")
    assert source.count("\nversion: 2\n") == 1
    assert source.count("    points: -3\n") == 1
    return source.replace("\nversion: 2\n", "\nversion: 3\n").replace("    points: -3\n", "    points: -60\n")


def line_of(source: str, text: str, after: str) -> int:
    """The 1-based line of the first line `text` that follows the line `after`."""
    lines = source.splitlines()
    start = lines.index(after)
    return lines.index(text, start) + 1


@pytest.fixture(scope="module")
def world(egret: Egret) -> Egret:
    late_residents(egret, RESIDENTS)
    (egret.cwd / "candidate.yaml").write_text(candidate_source(), encoding="utf-8")
    return egret


@pytest.fixture(scope="module")
def candidate(world: Egret) -> int:
    """The candidate stored as a draft and published: its rule_set_id."""
    drafted = world("-p", "reviewer", "rules", "draft", "candidate.yaml", "-o", "json")
    assert drafted.code == 0, drafted.stderr
    rule_set = drafted.json()["rule_set"]
    assert (rule_set["name"], rule_set["version"], rule_set["status"]) == (
        "egret-sample",
        3,
        "RULE_SET_STATUS_DRAFT",
    )
    assert rule_set["created_by"] == "reviewer-demo"
    published = world("-p", "reviewer", "rules", "publish", str(rule_set["rule_set_id"]))
    assert published.code == 0, published.stderr
    fields = record(published.stdout)
    assert (fields["status"], fields["version"]) == ("published", "3")
    assert fields["published"].endswith("by reviewer-demo")
    return int(rule_set["rule_set_id"])


def active_id(egret: Egret) -> int:
    shown = egret("-p", "auditor", "rules", "show", "active", "-o", "json")
    assert shown.code == 0, shown.stderr
    return int(shown.json()["rule_set_id"])


# -- validate ----------------------------------------------------------------------------------


def test_validate_accepts_the_sample_and_places_each_problem_on_its_path_and_line(
    world: Egret, tmp_path: Path
) -> None:
    valid = world("-p", "reviewer", "rules", "validate", str(SAMPLE))
    assert valid.code == 0, valid.stderr
    fields = record(valid.stdout)
    assert (fields["valid"], fields["name"], fields["version"]) == ("yes", "egret-sample", "2")
    assert world("-p", "reviewer", "rules", "validate", str(SAMPLE), "-o", "json").json()["valid"] is True

    # A minor (negative) rule that adds points: refused by the service, placed here.
    source = SAMPLE.read_text(encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text(source.replace("    points: -5\n", "    points: 5\n", 1), encoding="utf-8")
    line = line_of(source, "    points: -5", "  - id: traffic.red_light")
    refused = world("-p", "reviewer", "rules", "validate", str(broken))
    assert refused.code == 2
    problem = "5 contradicts severity 'minor': only positive rules add points"
    assert ["rules[2] (traffic.red_light).points", str(line), problem] in rows(refused.stdout)
    assert "is not a valid rule set: 1 problem" in refused.stderr

    as_json = world("-p", "reviewer", "rules", "validate", str(broken), "-o", "json")
    assert as_json.code == 2
    assert as_json.json()["valid"] is False
    assert as_json.json()["problems"] == [
        {
            "field": "source.rules[2] (traffic.red_light).points",
            "description": problem,
            "reason": "INVALID_RULE_SET",
            "line": line,
        }
    ]

    # Broken YAML: the service's message names the line, and so does the table.
    unparsable = tmp_path / "unparsable.yaml"
    unparsable.write_text("name: x\nversion: 1\nrules:\n  - id: a\n    title: [\n", encoding="utf-8")
    syntax = world("-p", "reviewer", "rules", "validate", str(unparsable), "-o", "json")
    assert syntax.code == 2
    assert syntax.json()["problems"][0]["line"] == 6

    missing = world("-p", "reviewer", "rules", "validate", str(tmp_path / "absent.yaml"))
    assert missing.code == 2
    assert "cannot read" in missing.stderr


def test_a_broken_draft_is_not_stored_and_its_problems_are_on_stderr(world: Egret, tmp_path: Path) -> None:
    source = SAMPLE.read_text(encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text(source.replace("    points: -5\n", "    points: 5\n", 1), encoding="utf-8")
    before = world("-p", "reviewer", "rules", "list", "--all", "-o", "json").json()

    refused = world("-p", "reviewer", "rules", "draft", str(broken))
    assert refused.code == 2
    assert "INVALID_ARGUMENT" in refused.stderr
    line = line_of(source, "    points: -5", "  - id: traffic.red_light")
    assert f"rules[2] (traffic.red_light).points (line {line}): 5 contradicts" in refused.stderr
    assert refused.stdout == ""
    assert world("-p", "reviewer", "rules", "list", "--all", "-o", "json").json() == before


# -- the lifecycle -----------------------------------------------------------------------------


def test_diff_shows_the_changed_rule_and_a_unified_diff(world: Egret, candidate: int) -> None:
    base = active_id(world)
    compared = world("-p", "reviewer", "rules", "diff", str(base), str(candidate))
    assert compared.code == 0, compared.stderr
    assert ["library.late_return", "changed", "points"] in rows(compared.stdout)
    assert "Also changed: version" in compared.stdout
    assert "-    points: -3" in compared.stdout
    assert "+    points: -60" in compared.stdout
    assert f"+++ id {candidate}: egret-sample v3 (published)" in compared.stdout

    # One argument: the active rule set against a file; --exit-code as git's.
    against = world("-p", "auditor", "rules", "diff", "candidate.yaml", "-o", "json", "--exit-code")
    assert against.code == 1
    data = against.json()
    assert data["from"]["label"] == f"active: egret-sample v2 (id {base})"
    assert data["to"] == {"ref": "candidate.yaml", "label": "candidate.yaml"}
    assert data["rules"] == [{"rule_id": "library.late_return", "change": "changed", "fields": ["points"]}]
    assert data["document_fields_changed"] == ["version"]
    assert data["identical"] is False

    same = world("-p", "reviewer", "rules", "diff", str(SAMPLE), "--exit-code")
    assert same.code == 0, same.stderr
    assert "no differences" in same.stderr

    unknown = world("-p", "reviewer", "rules", "diff", "active", "99999")
    assert unknown.code == 1
    assert "NOT_FOUND" in unknown.stderr


def test_list_pages_and_filters_the_rule_sets(world: Egret, candidate: int) -> None:
    listed = world("-p", "auditor", "rules", "list")
    assert listed.code == 0, listed.stderr
    by_id = {cells[0]: cells for cells in rows(listed.stdout)}
    assert by_id[str(candidate)][1:4] == ["egret-sample", "3", "published"]
    assert by_id[str(active_id(world))][3] == "active"

    first = world("-p", "reviewer", "rules", "list", "--page-size", "1", "-o", "json").json()
    assert len(first["rule_sets"]) == 1
    assert first["next_page_token"]
    paged = world("-p", "reviewer", "rules", "list", "--page-size", "1")
    assert f"more: --page-token {first['next_page_token']}" in paged.stderr
    every = world("-p", "reviewer", "rules", "list", "--page-size", "1", "--all", "-o", "json").json()
    assert len(every["rule_sets"]) >= 2
    assert "next_page_token" not in every

    published = world("-p", "reviewer", "rules", "list", "--status", "published", "-o", "yaml")
    assert published.code == 0, published.stderr
    assert f"rule_set_id: '{candidate}'" in published.stdout
    assert "RULE_SET_STATUS_ACTIVE" not in published.stdout

    bad = world("-p", "reviewer", "rules", "list", "--status", "sleeping")
    assert bad.code == 2


# -- backtests ---------------------------------------------------------------------------------


def test_a_backtest_is_followed_to_its_report_with_tables(world: Egret, candidate: int) -> None:
    ran = world(
        "-p", "reviewer", "rules", "backtest", str(candidate),
        "--purpose", "rule-backtest", "--subjects", "5", "--interval", "0.2",
    )  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert "started for rule set" in ran.stderr
    assert f"{RESIDENTS}/{RESIDENTS} events" in ran.stderr  # the progress bar, on stderr
    report = record(ran.stdout)
    assert report["state"] == "succeeded"
    assert report["candidate"] == f"egret-sample v3 (id {candidate})"
    assert report["baseline (active)"].startswith("egret-sample v2")
    assert (report["subjects"], report["subjects changed"], report["tier moves"]) == ("40", "40", "40")
    assert ["A", "B", "40", "moved"] in rows(ran.stdout)  # tier movement
    assert ["-99..-50", "40"] in rows(ran.stdout)  # score changes
    assert ["library.late_return", "40", "40", "-120", "-2400", "-2280"] in rows(ran.stdout)
    assert ["subject_kind", "person", "40", "40", "40"] in rows(ran.stdout)  # per cohort
    subjects = [cells for cells in rows(ran.stdout) if cells[1:2] == ["person"] and len(cells) == 7]
    assert len(subjects) == 5
    assert all(cells[2:] == ["997", "A", "940", "B", "-57"] for cells in subjects)

    # Without a purpose the report has no subjects.
    job = world("-p", "reviewer", "rules", "backtest", str(candidate), "-o", "json", "--interval", "0.2")
    assert job.code == 0, job.stderr
    data = job.json()
    assert data["state"] == "BACKTEST_STATE_SUCCEEDED"
    assert data["events_replayed"] == data["events_total"] == str(RESIDENTS)
    assert data["report"]["overall"]["subjects_changed"] == str(RESIDENTS)
    assert "subjects" not in data["report"]


def test_a_detached_backtest_is_read_again_by_its_id(world: Egret, candidate: int) -> None:
    detached = world(
        "-p", "reviewer", "rules", "backtest", str(candidate), "--detach", "--purpose", "rule-backtest"
    )
    assert detached.code == 0, detached.stderr
    backtest_id = detached.stdout.strip()
    assert backtest_id
    assert f"egret rules backtests get {backtest_id} --watch" in detached.stderr

    watched = world(
        "-p", "reviewer", "rules", "backtests", "get", backtest_id, "--watch", "--interval", "0.2"
    )
    assert watched.code == 0, watched.stderr
    assert record(watched.stdout)["state"] == "succeeded"
    assert ["A", "B", "40", "moved"] in rows(watched.stdout)

    # Read again later, by anyone who may: the stored report, subjects only with a purpose.
    again = world("-p", "auditor", "rules", "backtests", "get", backtest_id, "-o", "json").json()
    assert again["report"]["overall"]["subjects"] == str(RESIDENTS)
    assert "subjects" not in again["report"]
    with_purpose = world(
        "-p", "reviewer", "rules", "backtests", "get", backtest_id, "--purpose", "rule-backtest", "-o", "json"
    )  # fmt: skip
    assert len(with_purpose.json()["report"]["subjects"]) == 20

    listed = world("-p", "admin", "rules", "backtests", "list", "--rule-set", str(candidate))
    assert listed.code == 0, listed.stderr
    # This module's three backtests so far, newest first.
    assert [backtest_id, str(candidate), "succeeded", "100%"] == rows(listed.stdout)[0][:4]
    assert len(rows(listed.stdout)) == 3

    finished = world("-p", "admin", "rules", "backtests", "cancel", backtest_id)
    assert finished.code == 1
    assert "FAILED_PRECONDITION" in finished.stderr

    unknown = world("-p", "reviewer", "rules", "backtests", "get", "no-such-backtest")
    assert unknown.code == 1
    assert "NOT_FOUND" in unknown.stderr


def test_ctrl_c_cancels_the_backtest_the_command_started(world: Egret, candidate: int) -> None:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    # Its starter pressing Ctrl-C cancels it. Score is paused meanwhile, so the backtest waits
    # for score's active policy (its first step, up to rules' 10-second deadline) and cannot
    # finish before the cancel arrives, however slow the machine (a 40-event backtest otherwise
    # takes about a second, and under CI's load it once finished first).
    score = world.cluster.pid("score")
    os.kill(score, signal.SIGSTOP)
    try:
        started = spawn(
            world, "-p", "reviewer", "rules", "backtest", str(candidate), "--interval", "0.2", **pipes
        )
        assert started.stderr is not None
        line = started.stderr.readline()
        assert "started for rule set" in line, line
        backtest_id = line.split()[1]
        started.send_signal(signal.SIGINT)
        stdout, stderr = started.communicate(timeout=60)
    finally:
        os.kill(score, signal.SIGCONT)
    assert started.returncode == 130, stderr
    assert f"interrupted: cancelling backtest {backtest_id}" in stderr
    assert f"backtest {backtest_id} cancelled by reviewer-demo after" in stderr
    assert stdout == ""

    stored = world("-p", "reviewer", "rules", "backtests", "get", backtest_id, "-o", "json")
    assert stored.code == 1  # a cancelled backtest has no report
    job = stored.json()
    assert (job["state"], job["cancelled_by"]) == ("BACKTEST_STATE_CANCELLED", "reviewer-demo")
    assert "report" not in job
    assert f"backtest {backtest_id} cancelled: cancelled by reviewer-demo" in stored.stderr

    # Cancelling it again changes nothing; the slot is free for the next backtest.
    again = world("-p", "admin", "rules", "backtests", "cancel", backtest_id)
    assert again.code == 0, again.stderr
    assert record(again.stdout)["state"] == "cancelled"
    assert record(again.stdout)["cancelled by"] == "reviewer-demo"

    # The slot is free again: the next backtest runs, and a watch follows it to its report.
    detached = world("-p", "reviewer", "rules", "backtest", str(candidate), "-d", "-o", "json")
    assert detached.code == 0, detached.stderr
    assert world(
        "-p", "reviewer", "rules", "backtests", "get", detached.json()["backtest_id"], "--watch"
    ).code == 0  # fmt: skip


# -- activation and retirement; roles ----------------------------------------------------------


def test_activate_then_retire_the_former_version(world: Egret, candidate: int) -> None:
    former = active_id(world)
    activated = world("-p", "reviewer", "rules", "activate", str(candidate))
    assert activated.code == 0, activated.stderr
    fields = record(activated.stdout)
    assert (fields["status"], fields["previously active"]) == ("active", str(former))
    assert fields["activated"].endswith("by reviewer-demo")
    assert active_id(world) == candidate

    again = world("-p", "reviewer", "rules", "activate", str(candidate), "-o", "json")
    assert again.code == 0, again.stderr
    assert "previous_rule_set_id" not in again.json()

    retired = world("-p", "reviewer", "rules", "retire", str(former), "-o", "json")
    assert retired.code == 0, retired.stderr
    assert retired.json()["rule_set"]["status"] == "RULE_SET_STATUS_RETIRED"
    listed = {cells[0]: cells[3] for cells in rows(world("-p", "auditor", "rules", "list").stdout)}
    assert (listed[str(former)], listed[str(candidate)]) == ("retired", "active")

    active = world("-p", "reviewer", "rules", "retire", str(candidate))
    assert active.code == 1
    assert "FAILED_PRECONDITION" in active.stderr
    shown = world("-p", "reviewer", "rules", "show", "active", "--source")
    assert shown.stdout == candidate_source()


@pytest.mark.parametrize(
    ("profile", "args"),
    [
        ("auditor", ("rules", "draft", "candidate.yaml")),
        ("admin", ("rules", "validate", "candidate.yaml")),
        ("admin", ("rules", "publish", "1")),
        ("auditor", ("rules", "activate", "1")),
        ("department", ("rules", "list")),
        ("subject", ("rules", "diff", "candidate.yaml")),
        ("auditor", ("rules", "backtest", "1")),
        ("auditor", ("rules", "backtests", "cancel", "any")),
        ("department", ("rules", "backtests", "list")),
    ],
)
def test_a_role_the_service_refuses_exits_4_with_the_status_in_words(
    world: Egret, profile: str, args: tuple[str, ...]
) -> None:
    refused = world("-p", profile, *args)
    assert refused.code == 4, (refused.stdout, refused.stderr)
    assert "PERMISSION_DENIED" in refused.stderr
    assert refused.stdout == ""


def test_every_command_says_what_it_does(world: Egret) -> None:
    commands = [
        ("rules",), ("rules", "validate"), ("rules", "diff"), ("rules", "draft"), ("rules", "publish"),
        ("rules", "activate"), ("rules", "retire"), ("rules", "show"), ("rules", "list"),
        ("rules", "backtest"), ("rules", "backtests", "get"), ("rules", "backtests", "list"),
        ("rules", "backtests", "cancel"),
    ]  # fmt: skip
    for command in commands:
        helped = world(*command, "--help")
        assert helped.code == 0, (command, helped.stderr)
        assert "Usage: egret " + " ".join(command) in helped.stdout
