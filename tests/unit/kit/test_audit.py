"""The hash-chained audit log detects every altered, inserted or deleted record; keyed, it
also detects a log re-chained without the key, and its automatic anchors (appended to a file
outside the database) a log re-chained with it."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Session

from kit.app import verify_audit
from kit.audit import (
    GENESIS,
    UNKEYED,
    AuditHeadMixin,
    AuditKeys,
    AuditMixin,
    AuditRecord,
    append,
    chain_hash,
    hash_of,
    parse_anchor,
    verify,
)
from kit.audit_anchors import anchor_line, anchor_loop, append_anchor, read_anchors
from kit.db import make_metadata
from kit.env import Env
from kit.settings import AuditSettings
from tests.support.servers import common_settings
from tests.support.waiting import until


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
            append(s, Log, Head, [_record(i) for i in range(3)], keys=UNKEYED)
        with s.begin():
            append(s, Log, Head, [_record(3)], keys=UNKEYED)
        with s.begin():
            append(s, Log, Head, [_record(i) for i in range(4, 10)], keys=UNKEYED)
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
            row.hash = hash_of(row) or ""
            prev = row.hash
        session.execute(sa.update(Head).values(hash=prev))


def test_a_consistent_rewrite_passes_the_walk_but_not_an_anchor_taken_before(session: Session) -> None:
    before = verify(session, Log, Head)
    assert before.intact
    assert (before.last_seq, before.last_hash) == (10, session.get(Head, 1).hash)  # type: ignore[union-attr]
    early = (3, session.get(Log, 3).hash)  # type: ignore[union-attr]
    anchors = [early, (before.last_seq, before.last_hash)]

    _rewrite_consistently(session, 2, "nothing to see")

    assert verify(session, Log, Head).intact  # the walk alone cannot tell
    problems = verify(session, Log, Head, anchors=anchors).problems
    assert problems == (
        "seq 3: hash differs from its anchor (the log was rewritten up to here)",
        "seq 10: hash differs from its anchor (the log was rewritten up to here)",
    )


def test_an_anchor_beyond_the_log_is_reported_missing(session: Session) -> None:
    report = verify(session, Log, Head)
    assert verify(session, Log, Head, anchors=[(report.last_seq, report.last_hash)]).intact
    session.rollback()
    with session.begin():
        session.execute(sa.delete(Log).where(Log.seq >= 9))
        session.execute(sa.update(Head).values(seq=8, hash=session.get(Log, 8).hash))  # type: ignore[union-attr]
    assert verify(session, Log, Head).intact  # truncated together with the head
    assert verify(session, Log, Head, anchors=[(10, report.last_hash)]).problems == (
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


# -- keys and automatic anchors ----------------------------------------------------------

K1 = AuditKeys("k1", {"k1": b"1" * 32})
K2 = AuditKeys("k2", {"k1": b"1" * 32, "k2": b"2" * 32})


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/keyed.db"


@pytest.fixture
def empty(url: str) -> Iterator[Session]:
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def _append(session: Session, keys: AuditKeys, indexes: range) -> None:
    session.rollback()  # end any read transaction
    with session.begin():
        append(session, Log, Head, [_record(i) for i in indexes], keys=keys)


def _head(session: Session) -> tuple[int, str]:
    session.rollback()
    head = session.get(Head, 1)
    assert head is not None
    return head.seq, head.hash


def _delete_and_rechain(session: Session, seq: int, keys: AuditKeys, *, everything: bool = False) -> None:
    """Delete record `seq`, renumber and re-chain the records after it (or `everything`) and
    the head: with plain SHA-256 (keys=UNKEYED, an attacker without the key) or with the key
    (an insider who has it)."""
    session.rollback()
    with session.begin():
        session.execute(sa.delete(Log).where(Log.seq == seq))
        prev = GENESIS
        rows = session.scalars(sa.select(Log).order_by(Log.seq)).all()
        for number, row in enumerate(rows, start=1):
            if row.seq != number:
                row.seq = number
                session.flush()
            if number < seq and not everything:
                prev = row.hash
                continue
            row.prev_hash = prev
            row.key_id = keys.current
            row.hash = hash_of(row, keys) or ""
            prev = row.hash
        session.execute(sa.update(Head).values(seq=len(rows), hash=prev))


def test_records_carry_a_keyed_mac_and_their_key_id(empty: Session) -> None:
    _append(empty, K1, range(5))
    rows = empty.scalars(sa.select(Log).order_by(Log.seq)).all()
    assert {row.key_id for row in rows} == {"k1"}
    assert all(row.hash == hash_of(row, K1) for row in rows)
    assert verify(empty, Log, Head, keys=K1).intact
    # Without the key nothing can be checked, and a wrong key matches nothing.
    assert verify(empty, Log, Head).problems[0] == (
        "seq 1: audit key id 'k1' is not configured, its MAC cannot be checked"
    )
    wrong = AuditKeys("k1", {"k1": b"x" * 32})
    assert len(verify(empty, Log, Head, keys=wrong).problems) == 5


def test_a_deletion_rechained_with_plain_sha256_is_detected_without_any_anchor(empty: Session) -> None:
    _append(empty, K1, range(10))
    _delete_and_rechain(empty, 4, UNKEYED)
    problems = verify(empty, Log, Head, keys=K1).problems
    assert problems
    assert all("unkeyed record after keyed ones" in p or "altered" in p for p in problems)
    # Before keys, the same attack on a plain chain passed the walk.
    empty.rollback()
    with empty.begin():
        empty.execute(sa.delete(Log))
        empty.execute(sa.delete(Head))
    _append(empty, UNKEYED, range(10))
    _delete_and_rechain(empty, 4, UNKEYED)
    assert verify(empty, Log, Head).intact


def test_even_a_full_rewrite_without_the_key_fails_the_automatic_anchors(
    empty: Session, url: str, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors" / "audit.anchors"
    _append(empty, K1, range(10))
    append_anchor(anchors, anchor_line(T0, "score", *_head(empty)))
    # Every record re-chained from the start as if no key had ever been used.
    _delete_and_rechain(empty, 4, UNKEYED, everything=True)
    assert verify(empty, Log, Head, keys=K1).intact  # the walk alone cannot tell
    problems = _verify_cli(url, anchors, K1)
    assert "anchored seq 10 is missing (the log was truncated or rewritten)" in problems


def test_a_deletion_rechained_with_the_key_fails_an_earlier_automatic_anchor(
    empty: Session, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors = tmp_path / "anchors" / "audit.anchors"
    _append(empty, K1, range(6))
    append_anchor(anchors, anchor_line(T0, "score", *_head(empty)))
    append_anchor(anchors, anchor_line(T0, "ingest", 3, "e" * 64))  # another service's line
    _append(empty, K1, range(6, 10))
    assert _verify_cli(url, anchors, K1) == []
    assert "1 automatic anchor(s)" in capsys.readouterr().out

    _delete_and_rechain(empty, 2, K1)
    assert verify(empty, Log, Head, keys=K1).intact  # the walk alone cannot tell
    assert _verify_cli(url, anchors, K1) == [
        "seq 6: hash differs from its anchor (the log was rewritten up to here)"
    ]


def test_rotation_new_records_use_the_current_key_old_ones_verify_by_id(empty: Session) -> None:
    _append(empty, UNKEYED, range(3))  # from before keys: plain SHA-256
    _append(empty, K1, range(3, 6))
    _append(empty, K2, range(6, 9))
    key_ids = empty.scalars(sa.select(Log.key_id).order_by(Log.seq)).all()
    assert key_ids == ["", "", "", "k1", "k1", "k1", "k2", "k2", "k2"]
    assert verify(empty, Log, Head, keys=K2).intact
    retired = AuditKeys("k2", {"k2": b"2" * 32})
    assert [p.split(":")[0] for p in verify(empty, Log, Head, keys=retired).problems] == [
        "seq 4",
        "seq 5",
        "seq 6",
    ]


def test_the_key_id_is_covered_by_the_mac() -> None:
    same = AuditKeys("k1", {"k1": b"1" * 32, "k9": b"1" * 32})

    def mac(key_id: str) -> str | None:
        return chain_hash(
            seq=1,
            at=T0,
            actor="a",
            role="admin",
            action="x",
            subject_key=None,
            purpose="",
            target="",
            detail="{}",
            prev_hash=GENESIS,
            key_id=key_id,
            keys=same,
        )

    assert mac("k1") != mac("k9")


def test_anchor_loop_appends_the_head_when_it_moves_and_on_the_way_out(
    empty: Session, url: str, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors.log"
    anchors.write_text(anchor_line(T0, "score", 1, "a" * 64))  # kept, never truncated
    with empty.begin():
        empty.add(Head(id=1, seq=0, hash=GENESIS))  # as a migration creates it: nothing to anchor
    engine = sa.create_engine(url)
    looks: list[object] = []
    sa.event.listen(engine, "engine_connect", lambda *_: looks.append(None))

    def anchored(seq: int) -> bool:
        return any(line.split()[1:3] == ["score", str(seq)] for line in anchors.read_text().splitlines())

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.create_task(
            anchor_loop(
                stopping,
                engine=engine,
                head=Head,
                service="score",
                path=anchors,
                interval_s=0.05,
                clock=lambda: T0,
            )
        )
        # An empty head, then an unchanged one: nothing written.
        await until(lambda: len(looks) >= 2, what="two looks at the empty head")
        await asyncio.to_thread(_append, empty, K1, range(3))
        await until(lambda: anchored(3), what="the moved head anchored")
        await asyncio.to_thread(_append, empty, K1, range(3, 5))
        stopping.set()
        await loop

    try:
        asyncio.run(run())
    finally:
        engine.dispose()
    lines = anchors.read_text().splitlines()
    assert lines[0] == anchor_line(T0, "score", 1, "a" * 64).strip()
    assert [line.split()[1:3] for line in lines[1:]] == [["score", "3"], ["score", "5"]]
    assert lines[-1] == anchor_line(T0, "score", *_head(empty)).strip()
    assert read_anchors(anchors, "score").anchors[-1] == _head(empty)


def test_a_line_that_is_not_an_anchor_is_a_problem(tmp_path: Path) -> None:
    anchors = tmp_path / "anchors.log"
    anchors.write_text(anchor_line(T0, "query", 7, "a" * 64) + "garbage\n")
    found = read_anchors(anchors, "query")
    assert found.anchors == ((7, "a" * 64),)
    assert found.problems == (f"{anchors}:2: not an anchor line ('garbage')",)
    assert read_anchors(tmp_path / "absent", "query").anchors == ()


def test_settings_read_the_current_and_older_keys_by_id(tmp_path: Path) -> None:
    (tmp_path / "new").write_text("n" * 40 + "\n")
    (tmp_path / "old").write_text("o" * 32)
    env = Env(
        {
            "EGRET_AUDIT_KEY_FILE": str(tmp_path / "new"),
            "EGRET_AUDIT_KEY_ID": "2027",
            "EGRET_AUDIT_OLD_KEY_FILES": f"2026={tmp_path / 'old'}",
            "EGRET_AUDIT_ANCHOR_FILE": str(tmp_path / "anchors.log"),
            "EGRET_AUDIT_ANCHOR_SECONDS": "60",
        }
    )
    settings = AuditSettings.read(env)
    env.check()
    assert settings == AuditSettings(
        "2027", {"2027": b"n" * 40, "2026": b"o" * 32}, tmp_path / "anchors.log", 60.0
    )
    assert settings.missing() == []
    assert AuditSettings.read(Env({})).missing() == [
        "EGRET_AUDIT_KEY_FILE is required unless EGRET_INSECURE=true (never in production)",
        "EGRET_AUDIT_ANCHOR_FILE is required unless EGRET_INSECURE=true (never in production)",
    ]


def test_settings_refuse_short_missing_or_doubled_keys(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("s" * 31)
    env = Env(
        {
            "EGRET_AUDIT_KEY_FILE": str(tmp_path / "short"),
            "EGRET_AUDIT_OLD_KEY_FILES": ",".join(
                [f"a1={tmp_path / 'short'}", "bad", f"b 2={tmp_path / 'short'}", f"b3={tmp_path / 'nope'}"]
            ),
        }
    )
    AuditSettings.read(env)
    assert len(env.problems) == 5, env.problems
    assert any("at least 32 bytes" in p for p in env.problems)
    assert any("given twice" in p for p in env.problems)
    assert any("'bad' is not ID=PATH" in p for p in env.problems)
    assert any("'b 2' is not 1-32 of" in p for p in env.problems)
    assert any("No such file" in p for p in env.problems)


def _verify_cli(url: str, anchors: Path, keys: AuditKeys) -> list[str]:
    """What `verify-audit` reports (stderr lines after the heading), with the keys and the
    anchor file from settings."""
    common = replace(
        common_settings("score", url, anchors.parent),
        audit=AuditSettings(keys.current, dict(keys.keys), anchors),
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = verify_audit(common, Log, Head)
    problems = [line.strip() for line in err.getvalue().splitlines()[1:]]
    assert (code == 0) == (not problems)
    return problems
