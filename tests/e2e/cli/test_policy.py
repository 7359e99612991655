"""`egret policy preview|activate|list|show` against the four real services: a proposed
policy that raises tier A's minimum for persons from 960 to 998 moves the five residents
holding 997 (one late library return each) to tier B; its preview writes nothing, its
activation is confirmed at a terminal (refused without one unless --yes) and is for admins
only; the activation history and documents are read back."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import Egret, late_residents, record, rows, spawn

ROOT = Path(__file__).resolve().parents[3]
POLICY = ROOT / "config" / "policy.yaml"
RESIDENTS = 5
PERSON_A = "      - {name: A, min: 960}\n"  # the persons' tier A comes first in the file


def proposed(version: str, tier_a: int = 998) -> str:
    document = POLICY.read_text(encoding="utf-8")
    assert document.count('version: "2026.2"\n') == 1
    return document.replace('version: "2026.2"\n', f'version: "{version}"\n').replace(
        PERSON_A, f"      - {{name: A, min: {tier_a}}}\n", 1
    )


@pytest.fixture(scope="module")
def world(egret: Egret) -> Egret:
    late_residents(egret, RESIDENTS)
    (egret.cwd / "stricter.yaml").write_text(proposed("2027.1"), encoding="utf-8")
    return egret


def at_terminal(egret: Egret, answer: str, *args: str) -> tuple[int, str, str]:
    """`egret ARGS…` with a terminal as its stdin, typing `answer` and Enter."""
    primary, secondary = pty.openpty()
    process = spawn(egret, *args, stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(secondary)
    try:
        os.write(primary, answer.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=120)
    finally:
        os.close(primary)
    return process.returncode, stdout, stderr


def activations(egret: Egret) -> list[str]:
    listed = egret("-p", "auditor", "policy", "list", "-o", "json")
    assert listed.code == 0, listed.stderr
    return [a["version"] for a in listed.json()["activations"]]


def test_preview_shows_the_tier_movements_and_writes_nothing(world: Egret) -> None:
    shown = world("-p", "admin", "policy", "preview", "stricter.yaml")
    assert shown.code == 0, shown.stderr
    fields = record(shown.stdout)
    assert (fields["active policy"], fields["proposed policy"]) == ("2026.2", "2027.1")
    assert (fields["subjects"], fields["score would change"], fields["tier would change"]) == ("5", "0", "5")
    assert ["person", "A", "B", "5", "moved"] in rows(shown.stdout)
    assert "List moves: none" in shown.stdout

    report = world("-p", "reviewer", "policy", "preview", "stricter.yaml", "-o", "json").json()["report"]
    assert (report["proposed_version"], report["tier_changed"]) == ("2027.1", "5")
    assert report["migrations"] == [
        {"subject_kind": "SUBJECT_KIND_PERSON", "from_tier": "A", "to_tier": "B", "subjects": "5"}
    ]
    assert activations(world) == ["2026.2"]


def test_preview_refuses_an_invalid_policy_with_the_problems_place(world: Egret, tmp_path: Path) -> None:
    document = POLICY.read_text(encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text(document.replace("{name: B, min: 850}", "{name: B, min: lots}", 1), encoding="utf-8")
    line = document.splitlines().index("      - {name: B, min: 850}") + 1
    refused = world("-p", "admin", "policy", "preview", str(broken))
    assert refused.code == 2
    assert "INVALID_ARGUMENT: invalid policy" in refused.stderr
    assert f"policies.person.tiers[3].min (line {line}): must be a whole number" in refused.stderr
    assert refused.stdout == ""


@pytest.mark.parametrize(
    ("profile", "args"),
    [
        ("department", ("policy", "preview", "stricter.yaml")),
        ("auditor", ("policy", "preview", "stricter.yaml")),
        ("reviewer", ("policy", "activate", "stricter.yaml", "--yes")),
        ("subject", ("policy", "list")),
    ],
)
def test_a_role_the_service_refuses_exits_4(world: Egret, profile: str, args: tuple[str, ...]) -> None:
    refused = world("-p", profile, *args)
    assert refused.code == 4, (refused.stdout, refused.stderr)
    assert "PERMISSION_DENIED" in refused.stderr
    assert activations(world) == ["2026.2"]


def test_activate_asks_at_a_terminal_and_refuses_to_ask_without_one(world: Egret) -> None:
    piped = world("-p", "admin", "policy", "activate", "stricter.yaml", input_text="y\n")
    assert piped.code == 2
    assert "needs a confirmation: run it at a terminal, or pass --yes" in piped.stderr
    assert activations(world) == ["2026.2"]

    code, stdout, stderr = at_terminal(world, "n", "-p", "admin", "policy", "activate", "stricter.yaml")
    assert code == 1, stderr
    assert "Activate policy 2027.1 in place of 2026.2, moving 5 of 5 subjects to another tier?" in stderr
    assert "not activated" in stderr
    assert ["person", "A", "B", "5", "moved"] in rows(stdout)  # the preview it asked about
    assert activations(world) == ["2026.2"]

    code, stdout, stderr = at_terminal(world, "y", "-p", "admin", "policy", "activate", "stricter.yaml")
    assert code == 0, stderr
    fields = record(stdout)
    assert (fields["activated"], fields["subjects recomputed"]) == ("2027.1", "5")
    assert activations(world) == ["2026.2", "2027.1"]

    listed = world("-p", "reviewer", "policy", "list")
    assert [cells[0] for cells in rows(listed.stdout)] == ["2026.2", "2027.1"]
    assert rows(listed.stdout)[-1][2:] == ["admin-demo", "active"]


def test_activate_with_yes_is_guarded_and_a_version_is_activated_once(world: Egret) -> None:
    assert activations(world)[-1] == "2027.1"  # activated at a terminal by the test before
    again = world("-p", "admin", "policy", "activate", "stricter.yaml", "--yes")
    assert again.code == 1
    assert "ALREADY_EXISTS" in again.stderr

    (world.cwd / "looser.yaml").write_text(proposed("2027.2", tier_a=960), encoding="utf-8")
    stale = world("-p", "admin", "policy", "activate", "looser.yaml", "--yes", "--expect-current", "2026.2")
    assert stale.code == 1
    assert "FAILED_PRECONDITION" in stale.stderr

    done = world(
        "-p",
        "admin",
        "policy",
        "activate",
        "looser.yaml",
        "--yes",
        "--expect-current",
        "2027.1",
        "-o",
        "json",
    )
    assert done.code == 0, done.stderr
    answer = done.json()
    assert (answer["report"]["current_version"], answer["report"]["proposed_version"]) == ("2027.1", "2027.2")
    assert answer["subjects_recomputed"] == str(RESIDENTS)
    assert activations(world) == ["2026.2", "2027.1", "2027.2"]


def test_show_prints_the_active_policy_or_an_earlier_document(world: Egret) -> None:
    active = world("-p", "auditor", "policy", "show", "-o", "json")
    assert active.code == 0, active.stderr
    assert active.json()["version"] == activations(world)[-1]

    original = world("-p", "auditor", "policy", "show", "2026.2", "--document")
    assert original.code == 0, original.stderr
    assert original.stdout == POLICY.read_text(encoding="utf-8")

    shown = world("-p", "department", "policy", "show")
    assert shown.code == 0, shown.stderr
    assert record(shown.stdout)["version"] == activations(world)[-1]

    unknown = world("-p", "admin", "policy", "show", "1999.1")
    assert unknown.code == 1
    assert "no policy version '1999.1'" in unknown.stderr


def test_every_command_says_what_it_does(world: Egret) -> None:
    for command in [
        ("policy",),
        ("policy", "preview"),
        ("policy", "activate"),
        ("policy", "list"),
        ("policy", "show"),
    ]:
        helped = world(*command, "--help")
        assert helped.code == 0, (command, helped.stderr)
        assert "Usage: egret " + " ".join(command) in helped.stdout
