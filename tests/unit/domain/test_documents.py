"""The document checks every loader shares: each problem once, with its field path, in the order found."""

from __future__ import annotations

from datetime import timedelta

import pytest

from domain.documents import Problems, child, item, read_strict
from kit.safeyaml import YamlError


def test_paths_join_keys_and_positions() -> None:
    assert child("", "name") == "name"
    assert item(child("rules[0] (r1)", "steps"), 1) == "rules[0] (r1).steps[1]"


def test_a_mapping_reports_its_unknown_and_missing_fields_one_by_one() -> None:
    problems = Problems(["line 3: duplicate key 'a'"])
    node = problems.mapping({"a": 1, "b": 2, "c": 3}, "cap", {"a", "per"}, ("a", "per"))

    assert node == {"a": 1, "b": 2, "c": 3}
    assert list(problems) == [
        "line 3: duplicate key 'a'",
        "cap.b: unknown field",
        "cap.c: unknown field",
        "cap.per: is required",
    ]


def test_no_mapping_is_one_problem() -> None:
    problems = Problems()

    assert problems.mapping([1], "cap", {"per"}, ("per",), message="must be a mapping {per}") is None
    assert problems.messages == ["cap: must be a mapping {per}"]


def test_a_mapping_can_name_its_unknown_keys_together() -> None:
    problems = Problems()
    node = problems.mapping({"min": 1, "zeta": 2, "alpha": 3}, "bounds", {"min", "max"}, unknown="together")

    assert node == {"min": 1, "zeta": 2, "alpha": 3}
    assert problems.messages == ["bounds: unknown keys alpha, zeta"]


def test_unknown_keys_are_named_together_sorted() -> None:
    problems = Problems()
    problems.unknown_keys({"type": "int", "zeta": 1, "alpha": 2}, {"type"}, "attributes.n")

    assert problems.messages == ["attributes.n: unknown keys alpha, zeta"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5), (1, 1), (0, None), (11, None), (True, None), (2.0, None), ("5", None)],
)
def test_a_whole_number_in_range_is_no_boolean_or_float(value: object, expected: int | None) -> None:
    problems = Problems()

    assert problems.whole(value, "version", 1, 10) == expected
    assert problems.messages == ([] if expected is not None else ["version: must be an integer from 1 to 10"])


@pytest.mark.parametrize(
    ("value", "expected", "problem"),
    [
        (-3, -3, None),
        (10, 10, None),
        (11, None, "must lie between -5 and 10"),
        (True, None, "must be a whole number"),
        (2.0, None, "must be a whole number"),
        (None, None, "must be a whole number"),
    ],
)
def test_an_integer_is_first_whole_then_within_bounds(
    value: object, expected: int | None, problem: str | None
) -> None:
    problems = Problems()

    assert problems.integer(value, "base", (-5, 10)) == expected
    assert problems.messages == ([] if problem is None else [f"base: {problem}"])


def test_an_integer_without_bounds_is_any_whole_number() -> None:
    problems = Problems()

    assert problems.integer(-(2**70), "points") == -(2**70)
    assert problems.integer("1", "points") is None
    assert problems.messages == ["points: must be a whole number"]


def test_text_flag_and_duration() -> None:
    problems = Problems()

    assert problems.text("x" * 5, "name", max_length=4) is None
    assert problems.text(" ", "title") is None
    assert problems.flag("yes", "black_list") is None
    assert problems.duration(" 2w ", "within", most=timedelta(days=30)) == timedelta(weeks=2)
    assert problems.duration("0d", "per", most=timedelta(days=30)) is None
    assert problems.duration("90 days", "per", most=timedelta(days=30)) is None
    assert problems.messages == [
        "name: must be a non-empty string of at most 4 characters",
        "title: must be a non-empty string",
        "black_list: must be true or false",
        "per: must be more than 0 and at most 30d",
        "per: must be a duration such as 90d, 12h, 30m, 45s or 2w (a whole number and a unit), got '90 days'",
    ]


def test_a_distinct_list_names_each_bad_or_repeated_item() -> None:
    problems = Problems()

    def wrong(value: object) -> str | None:
        return None if value in ("person", "organization") else f"unknown subject kind {value!r}"

    assert problems.distinct(
        ["person", "alien", "person"], "kinds", empty="must not be empty", wrong=wrong
    ) == (
        "person",
        "alien",
        "person",
    )
    assert problems.distinct([], "other", empty="must not be empty", wrong=wrong) == ()
    assert problems.messages == [
        "kinds[1]: unknown subject kind 'alien'",
        "kinds[2]: 'person' is listed twice",
        "other: must not be empty",
    ]


def test_the_strict_reader_notes_duplicate_keys_and_keeps_merges() -> None:
    document, duplicates = read_strict("base: &b {x: 1}\nnode:\n  <<: *b\n  x: 2\nnode: 3\n")

    assert document == {"base": {"x": 1}, "node": 3}
    assert duplicates == ["line 5: duplicate key 'node'"]


def test_the_strict_reader_refuses_what_safeyaml_refuses() -> None:
    with pytest.raises(YamlError):
        read_strict("a: [1\n")
