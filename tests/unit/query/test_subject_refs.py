"""A raw subject id named in a read never shows in a log line or a traceback."""

from __future__ import annotations

from kit.pseudonym import check_subject
from services.query.subjects import RawSubject

RESIDENT_ID = "11010519491231002X"


def test_a_raw_subject_and_its_canonical_form_print_without_the_id() -> None:
    raw = RawSubject("person", "resident-id", RESIDENT_ID)
    problems, canonical = check_subject(raw.kind, raw.id_scheme, raw.id_value)

    assert not problems
    assert canonical is not None
    for shown in (repr(raw), str(raw), repr(canonical), repr([raw, canonical])):
        assert RESIDENT_ID not in shown
        assert RESIDENT_ID[:17] not in shown
