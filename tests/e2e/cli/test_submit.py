"""`egret submit` against the four real services, as the library: a CSV file with bad lines is
refused whole with each line's number and field path, or sent without them under
--skip-invalid with a rejects file; a JSON Lines file; a run killed mid-file (SIGKILL) and
resumed stores every event exactly once, and a file changed since its checkpoint is
refused; the wrong role is denied. What ingest holds is read from its database."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support.cli import EGRET, RESIDENT_ID, Egret, ingest_rows, rows
from tests.support.events import resident_id

DAY = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
HEADER = ["event_id", "event_type", "subject_kind", "id_scheme", "id_value", "occurred_at"]


def at(days_ago: int = 0) -> str:
    return (DAY - timedelta(days=days_ago)).isoformat().replace("+00:00", "Z")


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*HEADER, "attr.on_time", "attr.days_late"])
        writer.writerows(rows)
    return path


def returned(
    event_id: str, *, on_time: str = "true", subject: str = RESIDENT_ID, when: str = ""
) -> list[str]:
    return [event_id, "library.book_returned", "person", "resident-id", subject, when or at(), on_time, ""]


def late(event_id: str, days_late: str, subject: str = RESIDENT_ID) -> list[str]:
    return [event_id, "library.book_returned_late", "person", "resident-id", subject, at(), "", days_late]


def jsonl_event(event_id: str, subject: str, days_late: int = 5) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "event_type": "library.book_returned_late",
        "subject": {"kind": "SUBJECT_KIND_PERSON", "id_scheme": "resident-id", "id_value": subject},
        "occurred_at": at(),
        "attributes": {"days_late": days_late},
    }


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return path


def stored(egret: Egret, prefix: str) -> tuple[int, int]:
    """(rows, distinct event ids) of the library's events whose id starts with `prefix`."""
    ((rows, distinct),) = ingest_rows(
        egret,
        "SELECT count(*), count(DISTINCT event_id) FROM ingest_events "
        "WHERE source = 'library' AND event_id LIKE :prefix",
        prefix=prefix + "%",
    )
    return int(rows), int(distinct)


def settled(egret: Egret, prefix: str) -> int:
    """The rows of `stored` once they stop changing (0.5 s apart)."""
    rows = stored(egret, prefix)[0]
    while True:
        time.sleep(0.5)
        now = stored(egret, prefix)[0]
        if now == rows:
            return rows
        rows = now


def table_row(stdout: str, first: str) -> list[str]:
    """The cells of the table row that starts with `first`."""
    found = [cells for cells in rows(stdout) if cells[0] == first]
    assert found, f"no row {first!r} in:\n{stdout}"
    return found[0]


BAD_LINES = [
    returned("bad-ok-1"),  # line 2
    late("bad-late-0", "0"),  # line 3: below the catalogue's minimum (ingest's validator)
    returned(""),  # line 4: no event_id
    returned("bad-when", when="yesterday"),  # line 5: not RFC 3339
    returned("bad-ok-2", subject=resident_id(7)),  # line 6
    late("bad-id", "4", subject="110105194912310021"),  # line 7: wrong check character
]


def test_a_csv_with_bad_lines_sends_nothing_and_names_each_line_and_field(egret: Egret) -> None:
    path = write_csv(egret.cwd / "bad.csv", BAD_LINES)
    refused = egret("-p", "department", "submit", path.name)
    assert refused.code == 2, refused.stderr
    for line, field in (
        (3, "attributes.days_late"),
        (4, "event_id"),
        (5, "occurred_at"),
        (7, "subject.id_value"),
    ):
        assert f"bad.csv: line {line}: {field}: " in refused.stderr
    assert "line 2:" not in refused.stderr
    assert "line 6:" not in refused.stderr
    assert "4 record(s) refused; nothing sent" in refused.stderr
    assert refused.stdout == ""
    assert stored(egret, "bad-") == (0, 0)
    assert not (egret.cwd / "bad.csv.checkpoint").exists()

    checked = egret("-p", "department", "submit", path.name, "--check", "-o", "json")
    assert checked.code == 2
    (summary,) = checked.json()["files"]
    assert (summary["records"], summary["would_accept"], summary["rejected"], summary["invalid"]) == (
        6,
        2,
        2,
        2,
    )
    assert stored(egret, "bad-") == (0, 0)


def test_skip_invalid_sends_the_good_lines_and_writes_the_rejects_with_reasons(egret: Egret) -> None:
    path = write_csv(
        egret.cwd / "skip.csv", [[cell.replace("bad-", "skip-") for cell in row] for row in BAD_LINES]
    )
    sent = egret("-p", "department", "submit", path.name, "--skip-invalid")
    assert sent.code == 0, sent.stderr
    assert table_row(sent.stdout, "skip.csv")[1:7] == ["6", "2", "0", "2", "0", "2"]
    assert "skip.csv: line 3: attributes.days_late: must be at least 1 (OUT_OF_RANGE)" in sent.stderr
    assert stored(egret, "skip-") == (2, 2)

    rejects = [json.loads(line) for line in (egret.cwd / "skip.csv.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["status"], [e["field"] for e in r["errors"]]) for r in rejects] == [
        (3, "rejected", ["attributes.days_late"]),
        (4, "invalid", ["event_id"]),
        (5, "invalid", ["occurred_at"]),
        (7, "rejected", ["subject.id_value"]),
    ]
    assert rejects[0]["errors"][0]["reason"] == "OUT_OF_RANGE"
    assert rejects[0]["record"]["attr.days_late"] == "0"
    assert not (egret.cwd / "skip.csv.checkpoint").exists()


def test_a_json_lines_file_is_checked_then_submitted(egret: Egret) -> None:
    path = write_jsonl(
        egret.cwd / "returns.jsonl", [jsonl_event(f"jl-{i}", resident_id(100 + i)) for i in range(3)]
    )
    checked = egret("-p", "department", "submit", path.name, "--check")
    assert checked.code == 0, checked.stderr
    assert table_row(checked.stdout, "returns.jsonl")[1:3] == ["3", "3"]
    assert stored(egret, "jl-") == (0, 0)

    sent = egret("-p", "department", "submit", path.name, "-o", "json")
    assert sent.code == 0, sent.stderr
    (summary,) = sent.json()["files"]
    assert (summary["source"], summary["records"], summary["accepted"], summary["sent"]) == (
        "library",
        3,
        3,
        3,
    )
    assert summary["events_per_s"] > 0
    assert "3 events sent in" in sent.stderr
    assert stored(egret, "jl-") == (3, 3)

    # The same file again: every event a duplicate, nothing stored twice.
    again = egret("-p", "department", "submit", path.name, "-o", "yaml")
    assert again.code == 0, again.stderr
    assert "duplicate: 3" in again.stdout
    assert stored(egret, "jl-") == (3, 3)


def start(egret: Egret, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "NO_COLOR": "1", "EGRET_CONFIG": str(egret.config)}
    return subprocess.Popen(
        [EGRET, *args], cwd=egret.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def acknowledged(checkpoint: Path) -> int:
    return max(0, len(checkpoint.read_text().splitlines()) - 1) if checkpoint.exists() else 0


def test_a_run_killed_mid_file_resumes_and_stores_each_event_once(egret: Egret) -> None:
    total = 3000
    path = write_jsonl(
        egret.cwd / "backfill.jsonl",
        [jsonl_event(f"bf-{i:05d}", resident_id(1000 + i)) for i in range(total)],
    )
    checkpoint = egret.cwd / "backfill.jsonl.checkpoint"
    args = ("-p", "department", "submit", path.name, "--batch-size", "50", "--in-flight", "2")

    running = start(egret, *args)
    deadline = time.monotonic() + 120
    while acknowledged(checkpoint) < 8:
        assert running.poll() is None, running.communicate()
        assert time.monotonic() < deadline, "no batch acknowledged in time"
        time.sleep(0.05)
    running.send_signal(signal.SIGKILL)
    running.communicate()
    done_before = acknowledged(checkpoint)
    assert 8 <= done_before < total // 50
    # Batches the server was committing when the client died still land: wait for them.
    rows_before = settled(egret, "bf-")
    assert rows_before >= done_before * 50

    # A changed file is not resumed by mistake: refused, nothing more sent.
    original = path.read_bytes()
    path.write_bytes(original + (json.dumps(jsonl_event("bf-extra", resident_id(999))) + "\n").encode())
    refused = egret(*args)
    assert refused.code == 2
    assert "changed since the checkpoint" in refused.stderr
    assert stored(egret, "bf-")[0] == rows_before
    path.write_bytes(original)

    resumed = egret(*args, "-o", "json", timeout_s=300)
    assert resumed.code == 0, resumed.stderr
    assert "resuming:" in resumed.stderr
    (summary,) = resumed.json()["files"]
    assert summary["resumed_batches"] >= done_before
    assert summary["records"] == total
    # Batches in flight at the kill were sent again: ingest answered them as duplicates.
    assert summary["accepted"] + summary["duplicate"] == total
    assert summary["rejected"] == summary["conflict"] == summary["invalid"] == 0
    assert stored(egret, "bf-") == (total, total)
    assert not checkpoint.exists()


def test_the_wrong_role_or_another_department_is_denied(egret: Egret) -> None:
    path = write_csv(egret.cwd / "denied.csv", [returned("denied-1")])
    for args in (
        ("-p", "reviewer", "submit", path.name),
        ("-p", "reviewer", "submit", path.name, "--skip-invalid"),
    ):
        denied = egret(*args)
        assert denied.code == 4, denied.stderr
        assert "PERMISSION_DENIED" in denied.stderr
    other = egret("-p", "department", "submit", path.name, "--source", "metro")
    assert other.code == 4
    assert "may not submit as source 'metro'" in other.stderr
    assert stored(egret, "denied-") == (0, 0)


def test_bad_arguments_and_unreadable_files_are_usage_errors(egret: Egret) -> None:
    path = write_csv(egret.cwd / "usage.csv", [returned("usage-1")])
    both = egret("-p", "department", "submit", path.name, "--check", "--skip-invalid")
    assert both.code == 2
    assert "give one of them" in both.stderr
    missing = egret("-p", "department", "submit", "nowhere.csv")
    assert missing.code == 2
    assert "cannot read" in missing.stderr
    (egret.cwd / "events.txt").write_text("x\n")
    unknown = egret("-p", "department", "submit", "events.txt")
    assert unknown.code == 2
    assert "--format jsonl or csv" in unknown.stderr
    (egret.cwd / "odd.csv").write_text("event_id,colour\n1,red\n")
    header = egret("-p", "department", "submit", "odd.csv")
    assert header.code == 2
    assert "unknown column(s) 'colour'" in header.stderr
