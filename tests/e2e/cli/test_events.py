"""`egret events retract|correct` against the four real services: the library withdraws and
corrects late returns it reported through the raw API, shown as a table and as JSON, and
what ingest records is read from its database; refusals (an unknown or already retracted
event, an invalid replacement, the wrong role, a missing reason) exit non-zero with the
status in words on stderr."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from tests.support.cli import RESIDENT_ID, Egret, ingest_rows, record
from tests.support.events import event

DAY = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)


def retractions(egret: Egret) -> dict[str, tuple[str, str | None]]:
    """event_id → (reason, replaced by) of the library's retractions in ingest's database."""
    rows = ingest_rows(
        egret,
        "SELECT event_id, reason, replaced_by_event_id FROM ingest_retractions WHERE source = 'library'",
    )
    return {row[0]: (row[1], row[2]) for row in rows}


def replacement(path: Path, event_id: str, days_late: int) -> Path:
    document: dict[str, Any] = {
        "event_id": event_id,
        "event_type": "library.book_returned_late",
        "subject": {"kind": "person", "id_scheme": "resident-id", "id_value": RESIDENT_ID},
        "occurred_at": DAY.isoformat().replace("+00:00", "Z"),
        "attributes": {"days_late": days_late},
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(egret: Egret) -> Egret:
    """The library's late returns ev-1 … ev-6 about the subject profile's resident."""
    events = [
        event(f"ev-{n}", "library.book_returned_late", RESIDENT_ID, {"days_late": 40}, occurred_at=DAY)
        for n in range(1, 7)
    ]

    async def submit() -> ingest_pb.SubmitEventsResponse:
        async with egret.cluster.department_channel("library") as channel:
            request = ingest_pb.SubmitEventsRequest(source="library", events=events)
            return await ingest_grpc.IngestServiceStub(channel).SubmitEvents(request, timeout=10)

    assert asyncio.run(submit()).counts.accepted == len(events)
    egret.cluster.wait_drained(timeout_s=60)
    return egret


def test_retract_withdraws_an_event_once_as_a_table_and_json(world: Egret) -> None:
    done = world("-p", "department", "events", "retract", "ev-1", "--reason", "sent twice by mistake")
    assert done.code == 0, done.stderr
    shown = record(done.stdout)
    assert (shown["status"], shown["event"], shown["reason"]) == (
        "retracted",
        "library/ev-1",
        "sent twice by mistake",
    )
    assert shown["retracted by"] == "library"
    assert retractions(world)["ev-1"] == ("sent twice by mistake", None)

    again = world("-p", "department", "events", "retract", "ev-1", "--reason", "again", "-o", "json")
    assert again.code == 0, again.stderr
    reply = again.json()
    assert reply["already_retracted"] is True
    assert reply["retraction"]["ref"] == {"source": "library", "event_id": "ev-1"}
    # The first retraction stands.
    assert reply["retraction"]["reason"] == "sent twice by mistake"


def test_correct_replaces_an_event_as_a_table_and_json(world: Egret) -> None:
    path = replacement(world.cwd / "ev-2.json", "ev-2-fixed", 4)
    done = world(
        "-p", "department", "events", "correct", "ev-2", "--file", str(path), "--reason", "4 days, not 40"
    )
    assert done.code == 0, done.stderr
    shown = record(done.stdout)
    assert (shown["event"], shown["replaced by"], shown["replacement status"]) == (
        "library/ev-2",
        "library/ev-2-fixed",
        "accepted",
    )
    assert retractions(world)["ev-2"] == ("4 days, not 40", "ev-2-fixed")

    path = replacement(world.cwd / "ev-3.json", "ev-3-fixed", 2)
    as_json = world(
        "-p", "department", "events", "correct", "ev-3", "-f", str(path), "--reason", "two days", "-o", "json"
    )
    assert as_json.code == 0, as_json.stderr
    reply = as_json.json()
    assert reply["retraction"]["replaced_by"] == {"source": "library", "event_id": "ev-3-fixed"}
    assert (reply["replacement"]["event_id"], reply["replacement"]["status"]) == (
        "ev-3-fixed",
        "EVENT_STATUS_ACCEPTED",
    )


def test_refusals_exit_non_zero_with_the_reason_in_words(world: Egret) -> None:
    unknown = world("-p", "department", "events", "retract", "ev-404", "--reason", "no such event")
    assert unknown.code == 1
    assert "NOT_FOUND" in unknown.stderr

    denied = world("-p", "reviewer", "events", "retract", "ev-4", "--reason", "not mine to retract")
    assert denied.code == 4
    assert "PERMISSION_DENIED" in denied.stderr

    no_reason = world("-p", "department", "events", "retract", "ev-4")
    assert no_reason.code == 2
    assert "--reason" in no_reason.stderr

    # A retraction may be repeated; a correction of a retracted event may not.
    assert world("-p", "department", "events", "retract", "ev-5", "--reason", "withdrawn").code == 0
    path = replacement(world.cwd / "ev-5.json", "ev-5-fixed", 3)
    retracted = world(
        "-p", "department", "events", "correct", "ev-5", "-f", str(path), "--reason", "too late"
    )
    assert retracted.code == 1
    assert "FAILED_PRECONDITION" in retracted.stderr

    # Not readable as an event: refused before any call.
    (world.cwd / "no-id.json").write_text('{"event_type": "library.book_returned_late"}')
    unreadable = world(
        "-p", "department", "events", "correct", "ev-4", "-f", str(world.cwd / "no-id.json"), "--reason", "x"
    )
    assert unreadable.code == 2
    assert "replacement.event_id: is required" in unreadable.stderr

    # Readable but invalid for the catalogue: ingest's violations, under "replacement.".
    path = replacement(world.cwd / "zero.json", "ev-6-fixed", 0)
    invalid = world("-p", "department", "events", "correct", "ev-6", "-f", str(path), "--reason", "zero days")
    assert invalid.code == 2
    assert "replacement.attributes.days_late" in invalid.stderr
    assert "ev-6" not in retractions(world)
