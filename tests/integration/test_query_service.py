"""The query service's gRPC API on loopback, reading a store the real score service wrote,
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from egret.common.v1 import outcome_pb2, subject_pb2
from egret.query.v1 import query_service_pb2 as pb
from egret.query.v1 import query_service_pb2_grpc as pb_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.db import is_sqlite
from kit.pseudonym import Pseudonymiser
from services.query.bootstrap import MIGRATIONS as QUERY_MIGRATIONS
from services.query.bootstrap import build as build_query
from services.score.bootstrap import MIGRATIONS
from services.score.bootstrap import build as build_score
from tests.support.events import PERSON, TEST_SUBJECT_KEY, full_width
from tests.support.outcomes import oid
from tests.support.outcomes import outcome as make_outcome
from tests.support.query import query_settings, score_beside_query_settings
from tests.support.servers import running
from tests.support.status import bad_request
from tests.support.waiting import until

RESIDENT_ID = "350200199001011230"
ALICE = Pseudonymiser(TEST_SUBJECT_KEY, "k1").subject_key("person", "resident-id", RESIDENT_ID)
# A month ago, so that no entry has reached its visible_until (the shortest period, minor,
# is 90 days); expiry itself is tested at its boundaries with an injected clock.
OCCURRED = (datetime.now(UTC) - timedelta(days=30)).replace(microsecond=0)


def outcome(
    outcome_id: str, points: int, category: str, *, occurred_at: datetime = OCCURRED, subject_key: str = ALICE
) -> outcome_pb2.Outcome:
    return make_outcome(outcome_id, subject_key, points, category, occurred_at=occurred_at, events=2)


def by_key(key: str = ALICE) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(subject_key=key)


def by_raw_id(value: str = RESIDENT_ID) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(
        subject=subject_pb2.Subject(
            kind=subject_pb2.SUBJECT_KIND_PERSON, id_scheme="resident-id", id_value=value
        )
    )


@dataclass
class Services:
    score: score_grpc.ScoreServiceAsyncStub
    query: pb_grpc.QueryServiceAsyncStub

    async def apply(self, *outcomes: outcome_pb2.Outcome) -> None:
        await self.score.ApplyOutcomes(score_pb.ApplyOutcomesRequest(outcomes=outcomes))


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    async with (
        running(
            score_beside_query_settings(database_url, tmp_path), build_score, MIGRATIONS
        ) as score_address,
        running(query_settings(database_url, tmp_path), build_query, QUERY_MIGRATIONS) as query_address,
        grpc.aio.insecure_channel(score_address) as score_channel,
        grpc.aio.insecure_channel(query_address) as query_channel,
    ):
        yield Services(score_grpc.ScoreServiceStub(score_channel), pb_grpc.QueryServiceStub(query_channel))


async def test_get_score_by_raw_id_and_by_subject_key(services: Services) -> None:
    await services.apply(
        outcome(oid("o1"), 10, "civic"), outcome(oid("o2"), -5, "traffic"), outcome(oid("o3"), -3, "civic")
    )
    by_raw = await services.query.GetScore(pb.GetScoreRequest(subject=by_raw_id()))
    # The raw id is normalised and hashed exactly as ingest hashes it.
    padded = await services.query.GetScore(pb.GetScoreRequest(subject=by_raw_id(f"  {RESIDENT_ID} ")))
    keyed = await services.query.GetScore(pb.GetScoreRequest(subject=by_key()))
    assert by_raw == keyed == padded
    score = keyed.score
    assert (score.subject_key, score.subject_kind, score.score, score.tier) == (ALICE, PERSON, 1002, "A")
    assert (score.base_score, score.policy_version, score.entry_count) == (1000, "2026.2", 3)
    assert [(c.category, c.points, c.entry_count) for c in score.categories] == [
        ("civic", 7, 2),
        ("traffic", -5, 1),
    ]
    assert abs(score.as_of.ToDatetime(UTC) - datetime.now(UTC)) < timedelta(minutes=1)


async def test_a_read_by_raw_id_finds_the_subject_however_its_id_is_written(services: Services) -> None:
    # Issue 12: the check character "x" and "X" named two subjects.
    resident = "35020019920202234X"
    key = Pseudonymiser(TEST_SUBJECT_KEY, "k1").subject_key("person", "resident-id", resident)
    await services.apply(outcome(oid("o1"), 10, "civic", subject_key=key))
    for written in (
        resident,
        resident.lower(),
        "350200-19920202-234x",
        full_width(resident),
    ):
        found = await services.query.GetScore(pb.GetScoreRequest(subject=by_raw_id(written)))
        assert found.score.subject_key == key, written
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await services.query.GetScore(pb.GetScoreRequest(subject=by_raw_id("350200199202022345")))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value) == [("subject.subject.id_value", "BAD_CHECK_CHARACTER")]


async def test_an_unknown_subject_is_not_found(services: Services) -> None:
    await services.apply(outcome(oid("o1"), 10, "civic"))
    for ref in (by_raw_id("350200199001019996"), by_key("0" * 64)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await services.query.GetScore(pb.GetScoreRequest(subject=ref))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_an_empty_or_invalid_subject_ref_is_an_invalid_argument(services: Services) -> None:
    cases = [
        (subject_pb2.SubjectRef(), [("subject", "REQUIRED")]),
        (by_key("not-a-key"), [("subject.subject_key", "INVALID")]),
        (by_key(ALICE.upper()), [("subject.subject_key", "INVALID")]),
        (
            subject_pb2.SubjectRef(subject=subject_pb2.Subject(id_scheme="Resident ID", id_value=" ")),
            [
                ("subject.subject.kind", "REQUIRED"),
                ("subject.subject.id_scheme", "INVALID"),
                ("subject.subject.id_value", "INVALID"),
            ],
        ),
    ]
    for ref, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await services.query.GetScore(pb.GetScoreRequest(subject=ref))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value) == expected
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await services.query.ListEntries(pb.ListEntriesRequest(subject=ref))
        assert bad_request(caught.value) == expected


async def test_a_subject_with_no_entries_yet_lists_an_empty_page(services: Services) -> None:
    await services.apply(outcome(oid("o1"), 10, "civic"))
    page = await services.query.ListEntries(pb.ListEntriesRequest(subject=by_key("0" * 64)))
    assert list(page.entries) == []
    assert page.next_page_token == ""


async def test_list_entries_pages_every_entry_once_newest_first(services: Services) -> None:
    same_time = OCCURRED - timedelta(days=3)
    await services.apply(
        outcome(oid("o-a"), -5, "traffic", occurred_at=OCCURRED - timedelta(days=10)),
        outcome(oid("o-b"), 10, "civic", occurred_at=same_time),
        outcome(oid("o-c"), -3, "civic", occurred_at=same_time),
        outcome(oid("o-d"), 2, "transport", occurred_at=OCCURRED),
        outcome(oid("o-e"), -10, "finance", occurred_at=same_time),
        outcome(oid("o-other"), 1, "civic", subject_key="f" * 64),
    )
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await services.query.ListEntries(
            pb.ListEntriesRequest(subject=by_raw_id(), page_size=2, page_token=token)
        )
        pages.append([e.entry_id for e in page.entries])
        token = page.next_page_token
        if not token:
            break
    # Newest event time first; equal times in a stable order (entry id, descending).
    assert pages == [[oid("o-d"), oid("o-e")], [oid("o-c"), oid("o-b")], [oid("o-a")]]
    everything = await services.query.ListEntries(pb.ListEntriesRequest(subject=by_key()))
    assert [e.entry_id for e in everything.entries] == [
        oid("o-d"),
        oid("o-e"),
        oid("o-c"),
        oid("o-b"),
        oid("o-a"),
    ]
    assert everything.next_page_token == ""


async def test_a_full_last_page_ends_without_a_token(services: Services) -> None:
    await services.apply(
        *(outcome(oid(f"o{i}"), 1, "civic", occurred_at=OCCURRED - timedelta(hours=i)) for i in range(4))
    )
    first = await services.query.ListEntries(pb.ListEntriesRequest(subject=by_key(), page_size=2))
    second = await services.query.ListEntries(
        pb.ListEntriesRequest(subject=by_key(), page_size=2, page_token=first.next_page_token)
    )
    assert [e.entry_id for e in [*first.entries, *second.entries]] == [oid(f"o{i}") for i in range(4)]
    assert second.next_page_token == ""


async def test_listed_entries_carry_event_refs_but_no_evidence(services: Services) -> None:
    await services.apply(outcome(oid("o1"), -5, "traffic"))
    (entry,) = (await services.query.ListEntries(pb.ListEntriesRequest(subject=by_key()))).entries
    assert list(entry.evidence) == []
    assert [(r.source, r.event_id) for r in entry.event_refs] == [
        ("library", f"{oid('o1')}-{n}") for n in range(2)
    ]
    assert (entry.status, entry.severity, entry.points, entry.category) == (
        pb.ENTRY_STATUS_ACTIVE,
        outcome_pb2.SEVERITY_MINOR,
        -5,
        "traffic",
    )
    assert entry.visible_until.ToDatetime(UTC) == OCCURRED + timedelta(days=90)


async def test_a_bad_page_size_or_token_is_an_invalid_argument(services: Services) -> None:
    await services.apply(outcome(oid("o1"), -5, "traffic"))
    not_json = base64.urlsafe_b64encode(b"hello").decode()
    naive_time = base64.urlsafe_b64encode(f'["2026-06-01T12:00:00","{oid("o1")}"]'.encode()).decode()
    cases = [
        (pb.ListEntriesRequest(subject=by_key(), page_size=501), [("page_size", "OUT_OF_RANGE")]),
        (pb.ListEntriesRequest(subject=by_key(), page_size=-1), [("page_size", "OUT_OF_RANGE")]),
        (pb.ListEntriesRequest(subject=by_key(), page_token="%%%"), [("page_token", "INVALID_PAGE_TOKEN")]),
        (
            pb.ListEntriesRequest(subject=by_key(), page_token=not_json),
            [("page_token", "INVALID_PAGE_TOKEN")],
        ),
        (
            pb.ListEntriesRequest(subject=by_key(), page_token=naive_time),
            [("page_token", "INVALID_PAGE_TOKEN")],
        ),
    ]
    for request, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await services.query.ListEntries(request)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value) == expected
    largest = await services.query.ListEntries(pb.ListEntriesRequest(subject=by_key(), page_size=500))
    assert len(largest.entries) == 1


async def test_a_page_token_pages_only_the_listing_it_came_from(services: Services) -> None:
    await services.apply(outcome(oid("o1"), -5, "traffic"), outcome(oid("o2"), -5, "traffic"))
    first = await services.query.ListEntries(pb.ListEntriesRequest(subject=by_key(), page_size=1))
    rest = await services.query.ListEntries(
        pb.ListEntriesRequest(subject=by_key(), page_size=1, page_token=first.next_page_token)
    )
    assert [e.entry_id for e in [*first.entries, *rest.entries]] in (
        [oid("o1"), oid("o2")],
        [oid("o2"), oid("o1")],
    )
    other = Pseudonymiser(b"o" * 32, "k1").subject_key("person", "resident-id", RESIDENT_ID)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await services.query.ListEntries(
            pb.ListEntriesRequest(subject=by_key(other), page_size=1, page_token=first.next_page_token)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value) == [("page_token", "INVALID_PAGE_TOKEN")]


async def test_get_entry_returns_the_rule_and_the_evidence_snapshot(services: Services) -> None:
    sent = outcome(oid("o1"), -5, "traffic")
    await services.apply(sent)
    entry = (await services.query.GetEntry(pb.GetEntryRequest(entry_id=oid("o1")))).entry
    assert (entry.entry_id, entry.subject_key, entry.reason, entry.black_list) == (
        oid("o1"),
        ALICE,
        f"because of {oid('o1')}",
        False,
    )
    assert entry.rule == sent.rule
    assert list(entry.evidence) == list(sent.events)
    assert [r.event_id for r in entry.event_refs] == [f"{oid('o1')}-{n}" for n in range(2)]
    assert entry.occurred_at == sent.occurred_at
    assert abs(entry.recorded_at.ToDatetime(UTC) - datetime.now(UTC)) < timedelta(minutes=1)


async def test_get_entry_not_found_and_missing_id(services: Services) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await services.query.GetEntry(pb.GetEntryRequest(entry_id="nope"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await services.query.GetEntry(pb.GetEntryRequest())
    assert bad_request(caught.value) == [("entry_id", "REQUIRED")]


async def health_of(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service="egret.query.v1.QueryService"))
    return int(response.status)


async def until_health(channel: grpc.aio.Channel, status: int) -> None:
    async def reached() -> bool:
        try:
            return await health_of(channel) == status
        except grpc.aio.AioRpcError:
            return False  # the runtime has not published the service's status yet

    await until(reached, what=f"query's health to become {status}", every_s=0.05)


async def test_query_starts_before_scores_store_exists(database_url: str, tmp_path: Path) -> None:
    sqlite = is_sqlite(database_url)
    # On SQLite the store does not exist at all; on PostgreSQL the database exists but has no tables.
    url = f"sqlite:///{tmp_path / 'later' / 'score.db'}" if sqlite else database_url
    async with (
        running(query_settings(url, tmp_path), build_query, QUERY_MIGRATIONS) as query_address,
        grpc.aio.insecure_channel(query_address) as channel,
    ):
        query = pb_grpc.QueryServiceStub(channel)
        if sqlite:
            await until_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
            assert not (tmp_path / "later" / "score.db").exists()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await query.GetScore(pb.GetScoreRequest(subject=by_key()))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        if sqlite:
            assert not (tmp_path / "later" / "score.db").exists()

        async with (
            running(score_beside_query_settings(url, tmp_path), build_score, MIGRATIONS) as score_address,
            grpc.aio.insecure_channel(score_address) as score_channel,
        ):
            await score_grpc.ScoreServiceStub(score_channel).ApplyOutcomes(
                score_pb.ApplyOutcomesRequest(outcomes=[outcome(oid("o1"), 10, "civic")])
            )
            await until_health(channel, health_pb2.HealthCheckResponse.SERVING)
            response = await query.GetScore(pb.GetScoreRequest(subject=by_raw_id()))
            assert (response.score.score, response.score.tier) == (1010, "A")
