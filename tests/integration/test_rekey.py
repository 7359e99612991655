"""The re-keying job and the generation guard (kit.rekey) on SQLite and PostgreSQL (issue 12, point 7).

The services' own tests cover their tables; these pin the job's guarantees on a table of
each shape: a surrogate primary key, and the subject key as (part of) the primary key.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from egret.common.v1 import event_pb2
from kit import audit
from kit.db import create_engine, make_session_factory
from kit.pseudonym import KeyLink, Pseudonymiser, resident_id_check_character
from kit.rekey import (
    GenerationGuard,
    GenerationMixin,
    KeyedColumn,
    KeyedStore,
    StaleKeyGeneration,
    read_marker,
    rekey,
    rewrite_recorded_event,
)

ROOT = b"root-subject-key-0123456789abcdef"
K2 = KeyLink("k2", b"second-generation-secret-0123456789")
K3 = KeyLink("k3", b"third-generation-secret-01234567890")
V1 = Pseudonymiser(ROOT, "k1")
V2 = Pseudonymiser(ROOT, "k1", (K2,))
V3 = Pseudonymiser(ROOT, "k1", (K2, K3))
AUDIT_KEYS = audit.AuditKeys("a1", {"a1": b"audit-key-0123456789abcdef0123456"})
IDS = [f"11010519491231{n:03d}" for n in range(100, 130)]


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "toy_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    subject_key: Mapped[str] = mapped_column(sa.String(64))
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))
    # A stored copy of the event that embeds the same key.
    record: Mapped[bytes] = mapped_column(sa.LargeBinary)


class Subject(Base):
    __tablename__ = "toy_subjects"
    subject_key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    category: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    points: Mapped[int]
    subject_key_id: Mapped[str | None] = mapped_column(sa.String(32))


class Generation(Base, GenerationMixin):
    __tablename__ = "toy_subject_key_generation"


class Log(Base, audit.AuditMixin):
    __tablename__ = "toy_audit_log"


class Head(Base, audit.AuditHeadMixin):
    __tablename__ = "toy_audit_head"


STORE = KeyedStore(
    Generation,
    [
        KeyedColumn(Event.__table__, payload="record", rewrite=rewrite_recorded_event),  # type: ignore[arg-type]
        KeyedColumn(Subject.__table__),  # type: ignore[arg-type]
    ],
    Log,
    Head,
)


def keys(chain: Pseudonymiser) -> list[str]:
    return [
        chain.subject_key("person", "resident-id", body + resident_id_check_character(body)) for body in IDS
    ]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def store_under(engine: Engine, chain: Pseudonymiser, key_id: str | None) -> None:
    with engine.begin() as connection:
        for key in keys(chain):
            record = event_pb2.RecordedEvent(subject_key=key, subject_key_id=key_id or "").SerializeToString()
            for _ in range(2):
                connection.execute(
                    sa.insert(Event).values(subject_key=key, subject_key_id=key_id, record=record)
                )
            for category in ("transport", "library"):
                connection.execute(
                    sa.insert(Subject).values(
                        subject_key=key, category=category, points=3, subject_key_id=key_id
                    )
                )


Pairs = set[tuple[str, str | None]]


def stored(engine: Engine) -> tuple[Pairs, Pairs]:
    """The distinct (subject key, generation) pairs of each table."""
    with engine.connect() as connection:
        events = connection.execute(sa.select(Event.subject_key, Event.subject_key_id)).all()
        subjects = connection.execute(sa.select(Subject.subject_key, Subject.subject_key_id)).all()
    return {(r[0], r[1]) for r in events}, {(r[0], r[1]) for r in subjects}


def embedded(engine: Engine) -> set[tuple[str, str]]:
    """The (key, generation) pairs the stored copies carry."""
    with engine.connect() as connection:
        records = connection.scalars(sa.select(Event.record)).all()
    return {(e.subject_key, e.subject_key_id) for e in map(event_pb2.RecordedEvent.FromString, records)}


def moved_events(engine: Engine, key_id: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).where(Event.subject_key_id == key_id)) or 0)


def test_rows_of_every_older_generation_move_to_the_current_one_and_the_chain_records_it(
    engine: Engine,
) -> None:
    # Rows from before generations were recorded (NULL) are of the root generation.
    store_under(engine, V1, None)
    first = rekey(engine, STORE, Pseudonymiser(b"", "k1", (K2,)), AUDIT_KEYS, batch_size=7, settle_s=0)
    assert first.moved == 30 * 2 + 30 * 2
    expected = {(key, "k2") for key in keys(V2)}
    assert stored(engine) == (expected, expected)
    # A second rotation, and a run with nothing to move.
    assert rekey(engine, STORE, Pseudonymiser(b"", "k1", (K2, K3)), AUDIT_KEYS, settle_s=0).moved == 120
    assert rekey(engine, STORE, Pseudonymiser(b"", "k1", (K2, K3)), AUDIT_KEYS, settle_s=0).moved == 0
    assert stored(engine) == ({(k, "k3") for k in keys(V3)}, {(k, "k3") for k in keys(V3)})
    assert embedded(engine) == {(k, "k3") for k in keys(V3)}
    with make_session_factory(engine)() as session:
        report = audit.verify(session, Log, Head, keys=AUDIT_KEYS)
        actions = [row[0] for row in session.execute(sa.select(Log.action).order_by(Log.seq))]
    assert report.intact
    # One record per batch (18 batches of 7 over 60 + 60 rows, then one per table at
    # batch size 1000) and one per completed rotation.
    assert actions.count("subject-keys-rotated") == 2
    assert actions.count("subject-keys-rekeyed") == 18 + 2


def test_a_killed_job_resumes_where_it_stopped(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    store_under(engine, V1, "k1")
    chain = Pseudonymiser(b"", "k1", (K2,))
    batches = 0
    original = audit.append

    def killed_in_third_batch(*args: object, **kwargs: object) -> None:
        # The kill: the third batch's transaction fails, so its rows stay as they were.
        nonlocal batches
        batches += 1
        if batches == 3:
            raise KeyboardInterrupt
        original(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(audit, "append", killed_in_third_batch)
        with pytest.raises(KeyboardInterrupt):
            rekey(engine, STORE, chain, AUDIT_KEYS, batch_size=10, settle_s=0)
    assert moved_events(engine, "k2") == 20
    # Instances of both generations are refused while the move is incomplete.
    for generation in ("k1", "k2"):
        guard_sessions = make_session_factory(engine)
        GenerationGuard(Generation, generation).install(guard_sessions)
        with pytest.raises(StaleKeyGeneration), guard_sessions() as session:
            session.execute(sa.select(Event.id)).all()
    assert rekey(engine, STORE, chain, AUDIT_KEYS, settle_s=0).moved == 100
    expected = {(key, "k2") for key in keys(V2)}
    assert stored(engine) == (expected, expected)
    assert embedded(engine) == expected


def test_an_instance_of_another_generation_is_refused_once_the_marker_moved(engine: Engine) -> None:
    store_under(engine, V1, "k1")
    old_sessions, new_sessions = make_session_factory(engine), make_session_factory(engine)
    old_guard = GenerationGuard(Generation, "k1", interval_s=0)
    old_guard.install(old_sessions)
    GenerationGuard(Generation, "k2", interval_s=0).install(new_sessions)
    # No marker yet: the database is of the root generation, and the old instance works.
    with old_sessions() as session, session.begin():
        session.add(Event(subject_key=keys(V1)[0], subject_key_id="k1", record=b""))
    rekey(engine, STORE, Pseudonymiser(b"", "k1", (K2,)), AUDIT_KEYS, settle_s=0)
    with pytest.raises(StaleKeyGeneration, match="generation 'k2'"), old_sessions() as session:
        session.execute(sa.select(Event.id)).all()
    with new_sessions() as session, session.begin():
        session.add(Event(subject_key=keys(V2)[0], subject_key_id="k2", record=b""))
    events, _ = stored(engine)
    assert {key_id for _, key_id in events} == {"k2"}


def test_two_jobs_at_once_move_each_row_once(engine: Engine) -> None:
    store_under(engine, V1, "k1")
    chain = Pseudonymiser(b"", "k1", (K2,))
    other = create_engine(str(engine.url.render_as_string(hide_password=False)))
    try:
        # The second job starts between the first's batches (its sleep is the settle wait).
        moved_by_second = []

        def start_second(seconds: float) -> None:
            del seconds
            moved_by_second.append(rekey(other, STORE, chain, AUDIT_KEYS, batch_size=13, settle_s=0).moved)

        first = rekey(engine, STORE, chain, AUDIT_KEYS, batch_size=13, sleep=start_second)
    finally:
        other.dispose()
    assert first.moved + moved_by_second[0] == 120
    expected = {(key, "k2") for key in keys(V2)}
    assert stored(engine) == (expected, expected)


def test_an_unknown_generation_in_the_database_stops_the_job(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(sa.insert(Event).values(subject_key="a" * 64, subject_key_id="k9", record=b""))
        connection.execute(
            sa.insert(Generation).values(id=1, key_id="k1", complete=True, changed_at=datetime.now(UTC))
        )
    with pytest.raises(KeyError, match="k9"):
        rekey(engine, STORE, Pseudonymiser(b"", "k1", (K2,)), AUDIT_KEYS, settle_s=0)


def test_an_instance_of_older_settings_neither_moves_keys_back_nor_marks_the_database(engine: Engine) -> None:
    """A pod restarted mid-rollout with the settings before the rotation (migrating on start):
    it is refused with the reason, and the marker stays as the current instances need it."""
    store_under(engine, V1, "k1")
    rekey(engine, STORE, V2, AUDIT_KEYS, settle_s=0)
    before = stored(engine)
    with pytest.raises(StaleKeyGeneration, match=r"generation 'k2', which this instance's key chain \(k1\)"):
        rekey(engine, STORE, V1, AUDIT_KEYS, settle_s=0)
    with engine.connect() as connection:
        assert read_marker(connection, Generation) == ("k2", True)
    assert stored(engine) == before
