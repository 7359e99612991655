"""Retractions and corrections in ingest's domain and servicer: what is checked before the
store is asked, and that a department never acts on another department's events."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from egret.common.v1 import event_pb2
from egret.ingest.v1 import ingest_service_pb2 as pb
from kit.errors import InvalidArgument, PermissionDenied
from kit.principal import Principal, Role, bind_principal
from services.ingest.domain import EventStatus
from services.ingest.servicer import IngestServicer
from tests.support.intake import NOW, MemoryStore, late, make_intake


def fields(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def test_a_reason_is_required_and_at_most_1000_characters() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    intake.submit("library", [late("a", 40)])
    for reason in ("", "  ", "x" * 1001):
        with pytest.raises(InvalidArgument) as raised:
            intake.retract("library", "a", reason, "library")
        assert fields(raised.value) == ["reason"]
    assert intake.retract("library", "a", "x" * 1000, "library").already_retracted is False
    assert intake.retract("library", "a", "another", "library").already_retracted is True


def test_a_replacement_is_validated_like_a_submitted_event_under_replacement() -> None:
    store = MemoryStore()
    intake = make_intake(store)
    intake.submit("library", [late("a", 40)])
    with pytest.raises(InvalidArgument) as raised:
        intake.correct("library", "a", "", late("b", -1), "library")
    assert fields(raised.value) == ["reason", "replacement.attributes.days_late"]
    with pytest.raises(InvalidArgument) as raised:
        intake.correct("library", "a", "typo", late("a", 4), "library")
    assert fields(raised.value) == ["replacement.event_id"]
    # The replacement comes from the same source: a type the library may not send is refused.
    other = replace(late("b", 4), event_type="traffic.red_light", attributes={"camera_id": "C-1"})
    with pytest.raises(InvalidArgument) as raised:
        intake.correct("library", "a", "typo", other, "library")
    assert all(f.startswith("replacement.") for f in fields(raised.value))
    corrected = intake.correct("library", "a", "typo", late("b", 4), "library")
    assert corrected.replacement.status is EventStatus.ACCEPTED
    assert corrected.retraction.replaced_by == ("library", "b")
    assert corrected.retraction.retracted_at == NOW


async def test_another_department_is_denied_before_anything_is_read() -> None:
    store = MemoryStore()
    servicer = IngestServicer(make_intake(store), ThreadPoolExecutor(1), committed=lambda: None)
    token = bind_principal(Principal("metro", Role.DEPARTMENT))
    try:
        ref = event_pb2.EventRef(source="library", event_id="a")
        with pytest.raises(PermissionDenied, match="may not retract events of source 'library'"):
            await servicer.RetractEvent(pb.RetractEventRequest(ref=ref, reason="x"), None)
        with pytest.raises(PermissionDenied, match="may not correct events of source 'library'"):
            await servicer.CorrectEvent(pb.CorrectEventRequest(ref=ref, reason="x"), None)
    finally:
        bind_principal(None)
        del token
    assert store.calls == 0
