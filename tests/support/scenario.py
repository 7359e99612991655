"""The pipeline scenario: events of residents and a company, the scores they must end with, sending them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from devtools.cluster import Cluster
from egret.common.v1 import subject_pb2
from egret.ingest.v1 import ingest_service_pb2 as ingest_pb
from egret.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from kit.protoconv import Scalar
from tests.support.events import ORGANIZATION, PERSON, event
from tests.support.purposes import purposed

# Score counts an entry only until its visible_until (minor: 90 days), measured against the
# real clock the services run on, so the scenario is dated a month ago rather than on a fixed
# day: every entry below still counts and the hand-computed scores hold on any run date.
# (Expiry itself is proven at its boundaries in tests/integration/test_score_policy_in_time.py.)
# Caps (+50 per category per 12 months for persons, +30 for organizations) do not bite here:
# Carol's civic +40 and Acme's finance +10 / commerce +5 stay under them.
WHEN = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=30)
ALICE = "350200199001011230"
BOB = "350200198502023454"
CAROL = "350200197703035676"
DAVE = "350200196604047896"
ACME = "91350200MA2XY0123A"


def at(day: int) -> datetime:
    return WHEN + timedelta(days=day)


# (source, event id, event type, subject, kind, attributes, day): points per DOMAIN.md's sample rules.
SCENARIO: list[tuple[str, str, str, str, int, dict[str, Scalar], int]] = [
    ("library", "lib-1", "library.book_returned_late", ALICE, PERSON, {"days_late": 40}, 1),  # -3 civic
    ("library", "lib-2", "library.book_returned_late", ALICE, PERSON, {"days_late": 20}, 2),  # 0
    ("health-commission", "blood-1", "civic.blood_donation", ALICE, PERSON, {"ml": 400}, 3),  # +10 civic
    ("traffic-police", "red-1", "traffic.red_light", ALICE, PERSON, {"camera_id": "C-17"}, 4),  # -5 traffic
    ("civil-affairs", "vol-1", "civic.volunteer_hours", ALICE, PERSON, {"hours": 25}, 5),  # +4 civic
    (
        "metro",
        "fare-1",
        "transport.metro.fare_evasion",
        ALICE,
        PERSON,
        {"station": "Lianban", "amount": 4.0},
        6,
    ),
    ("traffic-police", "dui-1", "traffic.drunk_driving", BOB, PERSON, {"bac": 92.0}, 1),  # -50 traffic
    ("tax-office", "arr-1", "finance.tax_arrears", BOB, PERSON, {"months": 3, "amount": 1200.0}, 2),  # -30
    (
        "courts",
        "case-1",
        "legal.judgment_defaulter",
        BOB,
        PERSON,
        {"case_id": "(2026)Min0203Zhi1"},
        3,
    ),  # -100
    ("market-regulator", "insp-1", "commerce.inspection_passed", ACME, ORGANIZATION, {"score": 95}, 1),  # +5
    ("tax-office", "tax-1", "finance.tax_paid_on_time", ACME, ORGANIZATION, {"amount": 90000.0}, 2),  # +10
    (
        "market-regulator",
        "food-1",
        "commerce.food_safety_violation",
        ACME,
        ORGANIZATION,
        {"level": "major"},
        3,
    ),
    (
        "market-regulator",
        "food-2",
        "commerce.food_safety_violation",
        ACME,
        ORGANIZATION,
        {"level": "minor"},
        4,
    ),
    ("tax-office", "tax-2", "finance.tax_paid_on_time", CAROL, PERSON, {"amount": 3000.0}, 1),  # +10
    ("health-commission", "blood-2", "civic.blood_donation", CAROL, PERSON, {"ml": 300}, 2),  # +10
    ("health-commission", "blood-3", "civic.blood_donation", CAROL, PERSON, {"ml": 300}, -200),  # +10
    ("transport-bureau", "bike-1", "transport.bike.parked_in_fence", CAROL, PERSON, {"fence_id": "F1"}, 3),
    ("transport-bureau", "bike-2", "transport.bike.parked_in_fence", CAROL, PERSON, {"fence_id": "F2"}, 4),
    ("transport-bureau", "bike-3", "transport.bike.parked_in_fence", CAROL, PERSON, {"fence_id": "F1"}, 5),
    ("civil-affairs", "vol-2", "civic.volunteer_hours", CAROL, PERSON, {"hours": 100}, 6),  # +20
]
# Dave: -2500 in all, clamped at the lower bound 0.
SCENARIO += [
    ("courts", f"dave-{n}", "legal.judgment_defaulter", DAVE, PERSON, {"case_id": f"(2026)Min{n}"}, n)
    for n in range(25)
]

# subject → (score, tier, {category: points}, entries)
EXPECTED = {
    ALICE: (996, "A", {"civic": 11, "traffic": -5, "transport": -10}, 5),
    BOB: (820, "C", {"traffic": -50, "finance": -30, "legal": -100}, 3),
    ACME: (965, "A", {"commerce": -45, "finance": 10}, 3),
    CAROL: (1053, "AAA", {"finance": 10, "civic": 40, "transport": 3}, 7),
    DAVE: (0, "D", {"legal": -2500}, 25),
}
KINDS = {ALICE: PERSON, BOB: PERSON, CAROL: PERSON, DAVE: PERSON, ACME: ORGANIZATION}


def requests(prefix: str = "") -> dict[str, list[ingest_pb.Event]]:
    by_source: dict[str, list[ingest_pb.Event]] = {}
    for source, event_id, event_type, subject, kind, attributes, day in SCENARIO:
        by_source.setdefault(source, []).append(
            event(prefix + event_id, event_type, subject, attributes, occurred_at=at(day), kind=kind)
        )
    return by_source


def raw(subject: str) -> subject_pb2.SubjectRef:
    return subject_pb2.SubjectRef(
        subject=subject_pb2.Subject(
            kind=KINDS[subject],
            id_scheme="resident-id" if KINDS[subject] == PERSON else "uscc",
            id_value=subject,
        )
    )


async def submit_all(cluster: Cluster, prefix: str = "") -> list[ingest_pb.SubmitEventsResponse]:
    responses = []
    for source, events in requests(prefix).items():
        # Each department submits with its own token: it may submit only as itself.
        async with cluster.department_channel(source) as channel:
            stub = ingest_grpc.IngestServiceStub(channel)
            request = ingest_pb.SubmitEventsRequest(source=source, events=events)
            responses.append(await stub.SubmitEvents(request, timeout=10))
    return responses


async def assert_expected_scores(cluster: Cluster) -> None:
    async with cluster.channel("query", cluster.token("e2e-reviewer", Role.REVIEWER)) as channel:
        query = purposed(query_grpc.QueryServiceStub(channel), "subject-request")
        for subject, (score, tier, categories, entries) in EXPECTED.items():
            found = (await query.GetScore(query_pb.GetScoreRequest(subject=raw(subject)), timeout=5)).score
            assert (found.score, found.tier, found.entry_count) == (score, tier, entries), subject
            assert {c.category: c.points for c in found.categories} == categories, subject


async def assert_scores_equal_recompute(cluster: Cluster) -> int:
    async with cluster.channel("score", cluster.token("e2e-auditor", Role.AUDITOR)) as channel:
        verified = await score_grpc.ScoreServiceStub(channel).VerifyScores(
            score_pb.VerifyScoresRequest(max_mismatches=10, purpose="audit"), timeout=60
        )
    assert verified.mismatch_count == 0, list(verified.mismatches)
    return int(verified.subjects_checked)
