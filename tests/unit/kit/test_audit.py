"""The hash-chained audit log detects every altered, inserted or deleted record."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Session

from kit.audit import (
    GENESIS,
    AuditHeadMixin,
    AuditMixin,
    AuditRecord,
    append,
    hash_of,
    parse_anchor,
    verify,
)
from kit.db import make_metadata


class Base(DeclarativeBase):
    metadata = make_metadata()


class Log(Base, AuditMixin):
    __tablename__ = "t_audit_log"


class Head(Base, AuditHeadMixin):
    __tablename__ = "t_audit_head"


T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        action="read:GetScore",
        actor=f"metro-{i % 3}",
        role="benefit_provider",
        at=T0 + timedelta(seconds=i),
        subject_key=f"{i:064x}",
        purpose="fare discount check",
        target="",
        detail={"i": i, "note": "ünïcode ok"},
    )


@pytest.fixture
def session(tmp_path: object) -> Iterator[Session]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/audit.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        with s.begin():
            append(s, Log, Head, [_record(i) for i in range(3)])
        with s.begin():
            append(s, Log, Head, [_record(3)])
        with s.begin():
            append(s, Log, Head, [_record(i) for i in range(4, 10)])
        yield s
    engine.dispose()


def test_appends_form_one_contiguous_chain_across_transactions(session: Session) -> None:
    report = verify(session, Log, Head)
    assert report.intact, report.problems
    assert report.records == 10
    seqs = session.scalars(sa.select(Log.seq).order_by(Log.seq)).all()
    assert seqs == list(range(1, 11))
    first = session.get(Log, 1)
    assert first is not None
    assert first.prev_hash == GENESIS


def test_an_empty_log_is_intact() -> None:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        report = verify(s, Log, Head)
    assert report.intact
    assert report.records == 0


def test_an_altered_record_is_detected(session: Session) -> None:
    with session.begin():
        session.execute(sa.update(Log).where(Log.seq == 4).values(purpose="something else"))
    report = verify(session, Log, Head)
    assert not report.intact
    assert any("seq 4" in p and "altered" in p for p in report.problems)


def test_an_altered_timestamp_is_detected(session: Session) -> None:
    with session.begin():
        session.execute(sa.update(Log).where(Log.seq == 2).values(at=T0 + timedelta(days=1)))
    assert any("seq 2" in p for p in verify(session, Log, Head).problems)


def test_a_deleted_record_in_the_middle_is_detected(session: Session) -> None:
    with session.begin():
        session.execute(sa.delete(Log).where(Log.seq == 5))
    problems = verify(session, Log, Head).problems
    assert any("seq 6" in p and "deleted or inserted" in p for p in problems)


def test_a_deleted_tail_is_detected_by_the_head(session: Session) -> None:
    with session.begin():
        session.execute(sa.delete(Log).where(Log.seq >= 9))
    problems = verify(session, Log, Head).problems
    assert problems
    assert "head says seq 10" in problems[-1]


def test_an_inserted_record_is_detected(session: Session) -> None:
    # A forged record squeezed in by renumbering everything after it: the chain breaks at
    # the forged record however the attacker computes its own hash.
    with session.begin():
        rows = session.scalars(sa.select(Log).where(Log.seq >= 5).order_by(Log.seq.desc())).all()
        for row in rows:
            row.seq += 1
            session.flush()
        forged = session.get(Log, 4)
        assert forged is not None
        session.add(
            Log(
                seq=5,
                at=T0,
                actor="intruder",
                role="admin",
                action="read:GetScore",
                subject_key=None,
                purpose="",
                target="",
                detail="{}",
                prev_hash=forged.hash,
                hash="f" * 64,
            )
        )
    problems = verify(session, Log, Head).problems
    assert any(p.startswith("seq 5") for p in problems)


def test_an_appended_record_without_the_head_is_detected(session: Session) -> None:
    with session.begin():
        last = session.get(Log, 10)
        assert last is not None
        session.add(
            Log(
                seq=11,
                at=T0,
                actor="x",
                role="admin",
                action="a",
                subject_key=None,
                purpose="",
                target="",
                detail="{}",
                prev_hash=last.hash,
                hash="0" * 64,
            )
        )
    assert not verify(session, Log, Head).intact


def _rewrite_consistently(session: Session, seq: int, purpose: str) -> None:
    """What an attacker with write access to the table and the head can do: change one
    record and recompute every hash after it, and the head."""
    session.rollback()  # end the read transaction verify() began
    with session.begin():
        prev = GENESIS
        for row in session.scalars(sa.select(Log).order_by(Log.seq)).all():
            if row.seq == seq:
                row.purpose = purpose
            row.prev_hash = prev
            row.hash = hash_of(row)
            prev = row.hash
        session.execute(sa.update(Head).values(hash=prev))


def test_a_consistent_rewrite_passes_the_walk_but_not_an_anchor_taken_before(session: Session) -> None:
    before = verify(session, Log, Head)
    assert before.intact
    assert (before.last_seq, before.last_hash) == (10, session.get(Head, 1).hash)  # type: ignore[union-attr]
    early = (3, session.get(Log, 3).hash)  # type: ignore[union-attr]
    anchors = dict([early, (before.last_seq, before.last_hash)])

    _rewrite_consistently(session, 2, "nothing to see")

    assert verify(session, Log, Head).intact  # the walk alone cannot tell
    problems = verify(session, Log, Head, anchors=anchors).problems
    assert problems == (
        "seq 3: hash differs from its anchor (the log was rewritten up to here)",
        "seq 10: hash differs from its anchor (the log was rewritten up to here)",
    )


def test_an_anchor_beyond_the_log_is_reported_missing(session: Session) -> None:
    report = verify(session, Log, Head)
    assert verify(session, Log, Head, anchors={report.last_seq: report.last_hash}).intact
    session.rollback()
    with session.begin():
        session.execute(sa.delete(Log).where(Log.seq >= 9))
        session.execute(sa.update(Head).values(seq=8, hash=session.get(Log, 8).hash))  # type: ignore[union-attr]
    assert verify(session, Log, Head).intact  # truncated together with the head
    assert verify(session, Log, Head, anchors={10: report.last_hash}).problems == (
        "anchored seq 10 is missing (the log was truncated or rewritten)",
    )


@pytest.mark.parametrize(
    "text", ["", "3", "0:" + "a" * 64, "x:" + "a" * 64, "3:" + "a" * 63, "3:" + "g" * 64]
)
def test_a_malformed_anchor_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="SEQ:HASH"):
        parse_anchor(text)


def test_an_anchor_is_read_as_printed() -> None:
    assert parse_anchor(f" 12:{'AB' * 32} ") == (12, "ab" * 32)
