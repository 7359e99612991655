"""Every YAML document Egret is given goes through one loader with limits, and every
refusal is a YamlError naming the line and column."""

from __future__ import annotations

import pytest

from domain.policy import PolicyError, policy_from_text
from domain.ruleset.model import RuleSetError
from domain.ruleset.parsing import rule_set_from_yaml
from kit.safeyaml import YamlError, load_yaml


def _refusal(source: str | bytes, **limits: int) -> YamlError:
    with pytest.raises(YamlError) as raised:
        load_yaml(source, **limits)  # type: ignore[arg-type]
    return raised.value


def test_a_plain_document_loads() -> None:
    data, _ = load_yaml("name: a\nrules: [1, 2]\n")
    assert data == {"name": "a", "rules": [1, 2]}


def test_control_characters_are_refused_with_their_position() -> None:
    error = _refusal("name: a\nrules: b\x00c\n")
    assert (error.line, error.column) == (2, 9)
    assert "U+0000" in str(error)


def test_deep_nesting_is_refused_before_anything_recursive_runs() -> None:
    error = _refusal("a: " + "[" * 100_000)
    # The mapping is level 1, so the 64th bracket (column 4 + 63) is level 65.
    assert (error.line, error.column) == (1, 4 + 63)
    assert "nested deeper than 64" in error.problem


def test_a_billion_laughs_is_refused_by_its_expanded_size() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    error = _refusal("\n".join(lines))
    assert "once aliases are expanded" in error.problem
    assert error.line > 1


def test_a_self_referring_alias_is_refused() -> None:
    assert "refers to itself" in _refusal("&a [*a]").problem


def test_size_and_encoding_limits() -> None:
    assert "more than the 100 allowed" in _refusal("a: " + "b" * 200, max_bytes=100).problem
    error = _refusal(b"a: 1\nb: \xff\n")
    assert (error.line, error.column) == (2, 4)


def test_syntax_errors_carry_their_position() -> None:
    error = _refusal("a: [1, 2\nb: 3\n")
    assert error.line == 2


def test_rule_sets_and_policies_report_the_refusal_as_their_own_error() -> None:
    with pytest.raises(RuleSetError) as rules:
        rule_set_from_yaml("name: x\x07\n")
    assert "line 1, column 8" in rules.value.errors[0]
    with pytest.raises(PolicyError) as policy:
        policy_from_text("version: " + "[" * 5000)
    assert "nested deeper" in policy.value.problems[0]
