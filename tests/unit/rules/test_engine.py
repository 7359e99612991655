"""The durable-rules adapter: matching, firings, and the durable-rules quirks it must not leak."""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from domain.ruleset.model import (
    AllOf,
    AnyOf,
    AttributeScalar,
    Comparison,
    Condition,
    EngineEvent,
    Firing,
    Not,
    RuleSet,
    RuleSetError,
)
from domain.ruleset.parsing import load_rule_set, parse_rule_set
from services.rules.conditions import compile_condition
from services.rules.engine import RuleEngine, run_raw
from services.rules.evaluated import RuleEngineError, RuleEvaluationError
from tests.support.event_time import rule

SAMPLE = Path(__file__).resolve().parents[3] / "config" / "rulesets" / "sample.yaml"
AT = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
PERSON = "a1" * 32
COMPANY = "b2" * 32


def rule_set(*rules: dict[str, Any], name: str = "test", version: int = 1) -> RuleSet:
    return parse_rule_set({"name": name, "version": version, "rules": list(rules)})


def event(
    key: str,
    attributes: Mapping[str, AttributeScalar] | None = None,
    *,
    event_type: str = "test.happened",
    subject: str = PERSON,
    kind: str = "person",
    at: datetime = AT,
) -> EngineEvent:
    return EngineEvent(
        key=key,
        subject_key=subject,
        subject_kind=kind,
        event_type=event_type,
        occurred_at=at,
        attributes=attributes or {},
    )


def fired(firings: list[Firing]) -> list[tuple[str, str]]:
    return [(f.event_keys[0], f.rule_id) for f in firings]


def matching_keys(condition: dict[str, Any], cases: list[Mapping[str, AttributeScalar]]) -> list[int]:
    """Indexes of the attribute sets on which a rule with this condition fires."""
    with RuleEngine(rule_set(rule(when=condition))) as engine:
        firings = engine.evaluate(
            [event(f"src/{i}", attributes) for i, attributes in enumerate(cases)]
        ).firings
    return [int(f.event_keys[0].removeprefix("src/")) for f in firings]


UTC8 = timezone(timedelta(hours=8))


@pytest.mark.parametrize(
    ("condition", "cases", "expected"),
    [
        ({"attr": "x", "op": "eq", "value": 5}, [{"x": 5}, {"x": 5.0}, {"x": 6}, {}], [0, 1]),
        ({"attr": "level", "op": "eq", "value": "major"}, [{"level": "major"}, {"level": "minor"}], [0]),
        ({"attr": "on_time", "op": "eq", "value": True}, [{"on_time": True}, {"on_time": False}], [0]),
        (
            {"attr": "station", "op": "eq", "value": "厦门站"},
            [{"station": "厦门站"}, {"station": "厦门"}],
            [0],
        ),
        ({"attr": "s", "op": "eq", "value": 'a"b\\c'}, [{"s": 'a"b\\c'}, {"s": "ab"}], [0]),
        ({"attr": "x", "op": "ne", "value": 5}, [{"x": 6}, {"x": 5}, {}], [0]),
        ({"attr": "x", "op": "gt", "value": 30}, [{"x": 31}, {"x": 30}, {"x": 30.5}, {}], [0, 2]),
        ({"attr": "x", "op": "gte", "value": 30}, [{"x": 30}, {"x": 29}], [0]),
        ({"attr": "x", "op": "lt", "value": 3}, [{"x": 2}, {"x": 3}, {"x": -1}], [0, 2]),
        ({"attr": "x", "op": "lte", "value": 3}, [{"x": 3}, {"x": 4}], [0]),
        ({"attr": "x", "op": "in", "value": ["a", "b"]}, [{"x": "b"}, {"x": "c"}, {}], [0]),
        ({"attr": "x", "op": "between", "value": [3, 6]}, [{"x": 3}, {"x": 6}, {"x": 6.5}, {"x": 2}], [0, 1]),
        (
            {"attr": "x", "op": "matches", "value": "ST-[0-9]+"},
            [{"x": "ST-12"}, {"x": "XST-12"}, {"x": "ST-"}, {"x": "ST-12x"}],
            [0],
        ),
        (
            {"attr": "at", "op": "gte", "value": datetime(2024, 6, 1, tzinfo=UTC)},
            [{"at": datetime(2024, 6, 1, 8, tzinfo=UTC8)}, {"at": datetime(2024, 5, 31, 23, 59, tzinfo=UTC)}],
            [0],
        ),
    ],
)
def test_each_operator_matches_as_documented(
    condition: dict[str, Any], cases: list[Mapping[str, AttributeScalar]], expected: list[int]
) -> None:
    assert matching_keys(condition, cases) == expected


@pytest.mark.parametrize(
    ("condition", "cases", "expected"),
    [
        (
            {"all": [{"attr": "x", "op": "gt", "value": 1}, {"attr": "y", "op": "lt", "value": 5}]},
            [{"x": 2, "y": 4}, {"x": 2, "y": 5}, {"x": 2}],
            [0],
        ),
        (
            {"any": [{"attr": "x", "op": "gt", "value": 10}, {"attr": "y", "op": "eq", "value": 1}]},
            [{"x": 11}, {"y": 1}, {"x": 1, "y": 2}, {}],
            [0, 1],
        ),
        ({"not": {"attr": "x", "op": "gt", "value": 5}}, [{"x": 5}, {"x": 6}, {}], [0, 2]),
        ({"not": {"attr": "x", "op": "eq", "value": 1}}, [{"x": 2}, {"x": 1}, {}], [0, 2]),
        ({"not": {"attr": "x", "op": "in", "value": [1, 2]}}, [{"x": 3}, {"x": 1}, {}], [0, 2]),
        (
            {"not": {"attr": "x", "op": "between", "value": [1, 3]}},
            [{"x": 0}, {"x": 2}, {"x": 4}, {}],
            [0, 2, 3],
        ),
        (
            {"not": {"all": [{"attr": "x", "op": "gt", "value": 1}, {"attr": "y", "op": "gt", "value": 1}]}},
            [{"x": 2, "y": 0}, {"x": 2, "y": 2}, {}],
            [0, 2],
        ),
        (
            {"not": {"any": [{"attr": "x", "op": "eq", "value": 1}, {"attr": "y", "op": "eq", "value": 1}]}},
            [{"x": 2, "y": 2}, {"x": 1, "y": 2}, {"y": 1}, {}],
            [0, 3],
        ),
        ({"not": {"not": {"attr": "x", "op": "eq", "value": 1}}}, [{"x": 1}, {"x": 2}, {}], [0]),
    ],
)
def test_all_any_and_not_combine_conditions_as_boolean_logic(
    condition: dict[str, Any], cases: list[Mapping[str, AttributeScalar]], expected: list[int]
) -> None:
    assert matching_keys(condition, cases) == expected


def test_not_of_a_comparison_compiles_to_the_flipped_comparison_or_absent() -> None:
    assert compile_condition(Not(Comparison("days_late", "gt", 30))) == {
        "$or": [{"$lte": {"attrs.days_late": 30}}, {"$nex": {"attrs.days_late": 1}}]
    }


def test_an_event_matching_two_rules_fires_both() -> None:
    # durable-rules would consume a posted event with the first rule only.
    engine = RuleEngine(rule_set(rule("first"), rule("second", points=-2)))

    assert fired(engine.evaluate([event("src/1")]).firings) == [("src/1", "first"), ("src/1", "second")]


def test_a_rule_fires_once_per_event_however_many_branches_of_an_any_hold() -> None:
    # durable-rules splits "or" into one rule per branch and fires each that holds.
    condition = {"any": [{"attr": "x", "op": "gt", "value": 1}, {"attr": "x", "op": "gt", "value": 2}]}
    engine = RuleEngine(rule_set(rule(when=condition, event_types=["test.happened", "test.other"])))

    assert fired(engine.evaluate([event("src/1", {"x": 3})]).firings) == [("src/1", "r")]


def test_subject_kinds_restrict_which_subjects_a_rule_applies_to() -> None:
    engine = RuleEngine(rule_set(rule(subject_kinds=["organization"])))

    firings = engine.evaluate([event("src/1"), event("src/2", subject=COMPANY, kind="organization")]).firings

    assert fired(firings) == [("src/2", "r")]


def test_unmatched_and_unlistened_events_are_normal_and_do_not_hold_back_matched_ones() -> None:
    # durable-rules raises MessageNotHandledException for a batch with any unmatched
    # message, leaving the matched ones' actions pending.
    engine = RuleEngine(rule_set(rule(when={"attr": "x", "op": "gt", "value": 1})))
    events = [
        event("src/1", {"x": 0}),
        event("src/2", {"x": 5}),
        event("src/3", event_type="nobody.listens"),
        event("src/4", {"x": 1}),
    ]

    assert engine.evaluate([events[0], events[3]]).firings == []
    assert fired(engine.evaluate(events).firings) == [("src/2", "r")]
    assert engine.evaluate([]).firings == []


def test_firings_follow_input_order_then_rule_order() -> None:
    engine = RuleEngine(
        rule_set(
            rule("a", when={"attr": "x", "op": "gte", "value": 1}),
            rule("b", when={"attr": "x", "op": "gte", "value": 2}),
        )
    )
    other = "c3" * 32
    events = [
        event("src/1", {"x": 2}),
        event("src/2", {"x": 1}, subject=other),
        event("src/3", {"x": 2}),
        event("src/4", {"x": 0}),
        event("src/5", {"x": 1}),
    ]

    assert fired(engine.evaluate(events).firings) == [
        ("src/1", "a"),
        ("src/1", "b"),
        ("src/2", "a"),
        ("src/3", "a"),
        ("src/3", "b"),
        ("src/5", "a"),
    ]


def test_points_expressions_give_points_and_zero_point_firings_are_not_emitted() -> None:
    engine = RuleEngine(
        rule_set(
            rule(
                "volunteer",
                points="2 * (hours // 10)",
                severity="positive",
                event_types=["civic.volunteer_hours"],
            ),
            rule("arrears", points="-10 * months", event_types=["finance.tax_arrears"]),
        )
    )
    firings = engine.evaluate(
        [
            event("src/1", {"hours": 25}, event_type="civic.volunteer_hours"),
            event("src/2", {"hours": 9}, event_type="civic.volunteer_hours"),
            event("src/3", {"months": 3}, event_type="finance.tax_arrears"),
        ]
    ).firings

    assert [(f.event_keys, f.points) for f in firings] == [(("src/1",), 4), (("src/3",), -30)]


def test_a_firing_carries_the_rule_the_event_and_the_rendered_reason() -> None:
    engine = RuleEngine(
        rule_set(
            rule(
                "finance.tax_arrears",
                title="Tax arrears",
                description="Taxes of {amount:.2f} yuan overdue for {months} months.",
                reason="Owed {amount:.2f} yuan for {months} months",
                points="-10 * months",
                category="finance",
                severity="general",
                legal_basis="Tax law (illustrative)",
                black_list=True,
            ),
            name="egret-sample",
            version=3,
        )
    )

    (firing,) = engine.evaluate(
        [event("tax/7", {"months": 2, "amount": 1200.5}, subject=COMPANY, kind="organization")]
    ).firings

    assert firing == Firing(
        rule_id="finance.tax_arrears",
        rule_set="egret-sample",
        rule_set_version=3,
        title="Tax arrears",
        description="Taxes of 1200.50 yuan overdue for 2 months.",
        legal_basis="Tax law (illustrative)",
        event_keys=("tax/7",),
        subject_key=COMPANY,
        subject_kind="organization",
        points=-20,
        category="finance",
        severity="general",
        reason="Owed 1200.50 yuan for 2 months",
        black_list=True,
        occurred_at=AT,
        outcome_id=hashlib.sha256(b"egret-sample|3|finance.tax_arrears|tax/7").hexdigest()[:32],
        first_at=AT,
    )


def test_outcome_ids_are_the_same_whatever_the_engine_or_batch() -> None:
    definition = rule_set(rule("a"), rule("b"))
    events = [event(f"src/{i}", subject=f"{i % 3:064x}") for i in range(6)]

    with RuleEngine(definition) as first, RuleEngine(definition) as second:
        whole = [f.outcome_id for f in first.evaluate(events).firings]
        split = [f.outcome_id for f in second.evaluate(events[:2]).firings] + [
            f.outcome_id for f in second.evaluate(events[2:]).firings
        ]

    assert whole == split
    assert len(set(whole)) == 12


def test_two_engines_coexist_in_one_process() -> None:
    old = RuleEngine(rule_set(rule("late", points=-3), name="egret", version=1))
    new = RuleEngine(rule_set(rule("late", points=-5), name="egret", version=2))

    for batch in range(3):
        key = f"src/{batch}"
        (from_old,) = old.evaluate([event(key)]).firings
        (from_new,) = new.evaluate([event(key)]).firings
        assert (from_old.points, from_old.rule_set_version) == (-3, 1)
        assert (from_new.points, from_new.rule_set_version) == (-5, 2)
        assert from_old.outcome_id != from_new.outcome_id

    old.close()
    assert [f.points for f in new.evaluate([event("src/9")]).firings] == [-5]


def test_an_engine_starts_no_background_threads() -> None:
    # durable.engine.Host would start timers that run actions on other threads.
    before = threading.active_count()
    engine = RuleEngine(rule_set(rule()))
    engine.evaluate([event("src/1")])

    assert threading.active_count() == before


def test_a_subject_is_not_blocked_after_many_batches_including_failed_ones() -> None:
    engine = RuleEngine(rule_set(rule(points="-1 * n", when={"attr": "n", "op": "gte", "value": 0})))

    for batch in range(300):
        if batch % 50 == 49:
            with pytest.raises(RuleEvaluationError):
                engine.evaluate([event(f"src/{batch}", {"n": "not a number"})])
            continue
        assert [f.points for f in engine.evaluate([event(f"src/{batch}", {"n": 1 + batch % 3})]).firings] == [
            -(1 + batch % 3)
        ]

    assert not engine.holds_session(PERSON)


def test_subjects_on_which_nothing_fires_are_evaluated_and_forgotten() -> None:
    """durable-rules crashes the process when deleting a session in which no action ever
    started; the engine must get through thousands of such subjects."""
    engine = RuleEngine(
        rule_set(rule(subject_kinds=["organization"], when={"attr": "x", "op": "gt", "value": 1}))
    )
    subjects = [f"{i:064x}" for i in range(3000)]
    events = [event(f"src/{i}", {"x": i % 2}, subject=subject) for i, subject in enumerate(subjects)]

    assert engine.evaluate(events).firings == []
    assert engine.evaluate(events[:10]).firings == []
    assert not any(engine.holds_session(subject) for subject in subjects)


def test_attribute_values_the_engine_cannot_take_fail_the_batch_naming_the_events() -> None:
    engine = RuleEngine(rule_set(rule(when={"attr": "x", "op": "gt", "value": 1})))
    naive = datetime(2025, 1, 1)  # naive on purpose

    with pytest.raises(RuleEvaluationError) as caught:
        engine.evaluate(
            [
                event("src/ok", {"x": 2}),
                event("src/nan", {"x": float("nan")}),
                event("src/naive", {"x": naive}),
                event("src/huge", {"x": 2**64}),
            ]
        )

    assert caught.value.event_keys == ("src/nan", "src/naive", "src/huge")
    assert [f.message for f in caught.value.failures] == [
        "attribute 'x' is not a finite number",
        "attribute 'x' is a timestamp without a timezone",
        "attribute 'x' does not fit in 64 bits",
    ]
    assert fired(engine.evaluate([event("src/ok", {"x": 2})]).firings) == [("src/ok", "r")]


def test_a_rule_that_cannot_be_applied_fails_the_batch_naming_the_event_and_rule() -> None:
    engine = RuleEngine(
        rule_set(rule("per_month", points="-10 // months"), rule("reasoned", reason="{missing}"))
    )

    with pytest.raises(RuleEvaluationError) as caught:
        engine.evaluate([event("src/1", {"months": 0})])

    assert [(f.event_key, f.rule_id, f.message) for f in caught.value.failures] == [
        ("src/1", "per_month", "points '-10 // months': division by zero"),
        ("src/1", "reasoned", "attribute 'missing' is missing"),
    ]
    assert not engine.holds_session(PERSON)


def test_an_action_that_fails_surfaces_from_evaluate_and_leaves_the_subject_usable() -> None:
    class FailingOnce(RuleEngine):
        failed = False

        def _recorder(self, rule_index: int) -> Callable[[Any], None]:
            record = super()._recorder(rule_index)

            def fail_once(c: Any) -> None:
                if not FailingOnce.failed:
                    FailingOnce.failed = True
                    # Stands in for any fault inside an action.
                    self._action_errors.append(RuntimeError("boom"))
                    return
                record(c)

            return fail_once

    engine = FailingOnce(rule_set(rule()))

    with pytest.raises(RuleEngineError, match="a rule action failed: RuntimeError"):
        engine.evaluate([event("src/1")])
    assert fired(engine.evaluate([event("src/1")]).firings) == [("src/1", "r")]


def test_duplicate_event_keys_in_a_batch_are_refused() -> None:
    engine = RuleEngine(rule_set(rule()))

    with pytest.raises(ValueError, match="appears twice"):
        engine.evaluate([event("src/1"), event("src/1")])


def test_a_closed_engine_refuses_to_evaluate() -> None:
    engine = RuleEngine(rule_set(rule()))
    engine.close()
    engine.close()

    with pytest.raises(RuleEngineError, match="closed"):
        engine.evaluate([event("src/1")])


def test_a_rule_set_durable_rules_would_hang_on_is_refused() -> None:
    # An "in" of 513 values gives a node 513 children, on which durable-rules loops forever.
    huge = rule_set(rule(when={"attr": "x", "op": "in", "value": list(range(513))}))

    with pytest.raises(RuleSetError, match=r"make 514 branches .* durable-rules hangs beyond 512"):
        RuleEngine(huge)


def test_a_rule_set_durable_rules_refuses_is_a_rule_set_error() -> None:
    crowded = rule_set(*(rule(f"r{i}") for i in range(300)))

    with pytest.raises(RuleSetError) as caught:
        RuleEngine(crowded)

    assert caught.value.errors == [
        "durable-rules refused the rule set: too many rules share one condition path "
        "(Could not create ruleset, error code: 108)"
    ]


def test_too_many_attributes_read_for_one_event_type_are_refused() -> None:
    many = rule_set(rule(when={"all": [{"attr": f"a{i}", "op": "eq", "value": 1} for i in range(65)]}))

    with pytest.raises(RuleSetError, match=r"'test\.happened': conditions read 65 attributes"):
        RuleEngine(many)


def test_run_raw_counts_every_match_including_zero_point_ones() -> None:
    definition = rule_set(
        rule("late", when={"attr": "days", "op": "gt", "value": 30}),
        rule(
            "volunteer",
            points="2 * (hours // 10)",
            severity="positive",
            event_types=["civic.volunteer_hours"],
        ),
    )
    events = [
        event("src/1", {"days": 45}),
        event("src/2", {"days": 10}),
        event("src/3", {"hours": 9}, event_type="civic.volunteer_hours"),
    ]

    assert run_raw(definition, events) == 2
    assert fired(RuleEngine(definition).evaluate(events).firings) == [("src/1", "late")]


SAMPLE_EVENTS: list[tuple[str, dict[str, AttributeScalar], str]] = [
    ("transport.bike.parked_in_fence", {"fence_id": "F-12"}, "person"),
    ("transport.bike.parked_outside_fence", {"fence_id": "F-12", "minutes": 40}, "person"),
    ("transport.metro.fare_evasion", {"station": "Lucuo", "amount": 4.0}, "person"),
    ("traffic.red_light", {"camera_id": "C-7"}, "person"),
    ("traffic.drunk_driving", {"bac": 85.0}, "person"),
    ("library.book_returned_late", {"days_late": 45}, "person"),
    ("library.book_returned", {"on_time": True}, "person"),
    ("civic.volunteer_hours", {"hours": 25}, "person"),
    ("civic.blood_donation", {"ml": 400}, "person"),
    ("finance.tax_paid_on_time", {"amount": 12000.0}, "person"),
    ("finance.tax_arrears", {"months": 4, "amount": 3000.0}, "organization"),
    ("finance.loan_default", {"amount": 50000.0, "days_overdue": 120}, "person"),
    ("legal.judgment_defaulter", {"case_id": "(2024)Min0203Zhi1234"}, "person"),
    ("utility.bill_arrears", {"months": 3}, "person"),
    ("utility.theft", {"amount": 500.0}, "organization"),
    ("commerce.food_safety_violation", {"level": "major"}, "organization"),
    ("commerce.inspection_passed", {"score": 95}, "organization"),
    ("civic.public_property_damage", {"amount": 2000.0}, "person"),
]


def test_the_sample_rule_set_fires_once_for_one_event_of_each_type() -> None:
    engine = RuleEngine(load_rule_set(SAMPLE))
    events = [
        event(
            f"demo/{i}",
            attributes,
            event_type=event_type,
            kind=kind,
            subject=COMPANY if kind == "organization" else PERSON,
        )
        for i, (event_type, attributes, kind) in enumerate(SAMPLE_EVENTS)
    ]

    firings = engine.evaluate(events).firings

    # One bike parking outside a fence or one book returned completes no window.
    assert [
        (f.event_keys[0], f.rule_id, f.points, f.category, f.severity, f.black_list) for f in firings
    ] == [
        ("demo/0", "transport.bike_parked_in_fence", 1, "transport", "positive", False),
        ("demo/2", "transport.metro_fare_evasion", -10, "transport", "general", False),
        ("demo/3", "traffic.red_light", -5, "traffic", "minor", False),
        ("demo/4", "traffic.drunk_driving", -50, "traffic", "serious", False),
        ("demo/5", "library.late_return", -3, "civic", "minor", False),
        ("demo/7", "civic.volunteer_hours", 4, "civic", "positive", False),
        ("demo/8", "civic.blood_donation", 10, "civic", "positive", False),
        ("demo/9", "finance.tax_paid_on_time", 10, "finance", "positive", False),
        ("demo/10", "finance.tax_arrears", -40, "finance", "general", False),
        ("demo/11", "finance.loan_default", -30, "finance", "general", False),
        ("demo/12", "legal.judgment_defaulter", -100, "legal", "serious", True),
        ("demo/13", "utility.bill_arrears", -10, "finance", "minor", False),
        ("demo/14", "utility.theft", -60, "legal", "serious", False),
        ("demo/15", "commerce.major_food_safety_violation", -50, "commerce", "serious", False),
        ("demo/16", "commerce.inspection_passed", 5, "commerce", "positive", False),
        ("demo/17", "civic.public_property_damage", -100, "public_order", "serious", False),
    ]
    reasons = {f.rule_id: f.reason for f in firings}
    assert (
        reasons["transport.metro_fare_evasion"] == "Passed the gate at Lucuo without paying a 4.00 yuan fare"
    )
    assert reasons["finance.tax_arrears"] == "Owed 3000.00 yuan of taxes for 4 months"
    assert (
        reasons["legal.judgment_defaulter"] == "Did not comply with the judgment in case (2024)Min0203Zhi1234"
    )


def test_the_sample_rule_set_thresholds_hold_at_their_boundaries() -> None:
    engine = RuleEngine(load_rule_set(SAMPLE))
    below = [
        event("b/1", {"days_late": 30}, event_type="library.book_returned_late"),
        event("b/2", {"amount": 1.0, "days_overdue": 90}, event_type="finance.loan_default"),
        event("b/3", {"months": 2}, event_type="utility.bill_arrears"),
        event(
            "b/4",
            {"level": "minor"},
            event_type="commerce.food_safety_violation",
            subject=COMPANY,
            kind="organization",
        ),
        event(
            "b/5",
            {"score": 89},
            event_type="commerce.inspection_passed",
            subject=COMPANY,
            kind="organization",
        ),
        event("b/6", {"hours": 9}, event_type="civic.volunteer_hours"),
        event(
            "b/7", {"level": "major"}, event_type="commerce.food_safety_violation"
        ),  # a person, not a business
    ]

    assert engine.evaluate(below).firings == []


def _reference(condition: Condition | None, attributes: Mapping[str, Any]) -> bool:
    if condition is None:
        return True
    if isinstance(condition, Not):
        return not _reference(condition.condition, attributes)
    if isinstance(condition, AllOf):
        return all(_reference(c, attributes) for c in condition.conditions)
    if isinstance(condition, AnyOf):
        return any(_reference(c, attributes) for c in condition.conditions)
    if condition.attr not in attributes:
        return False
    value, operand = attributes[condition.attr], condition.value
    checks: dict[str, Callable[[], bool]] = {
        "eq": lambda: value == operand,
        "ne": lambda: value != operand,
        "gt": lambda: value > operand,
        "gte": lambda: value >= operand,
        "lt": lambda: value < operand,
        "lte": lambda: value <= operand,
        "in": lambda: value in operand,  # type: ignore[operator]
        "between": lambda: operand[0] <= value <= operand[1],  # type: ignore[index]
        "matches": lambda: re.fullmatch(str(operand), value) is not None,
    }
    return checks[condition.op]()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_conditions_agree_with_the_documented_semantics_on_random_rules(seed: int) -> None:
    generator = random.Random(seed)

    def leaf(negated: bool) -> dict[str, Any]:
        if generator.random() < 0.6:
            op = generator.choice(["eq", "ne", "gt", "gte", "lt", "lte", "in", "between"])
            values: Any = {
                "in": generator.sample(range(6), generator.randint(1, 3)),
                "between": [low := generator.randint(0, 5), low + generator.randint(0, 3)],
            }.get(op, generator.choice([generator.randint(0, 5), generator.randint(0, 5) + 0.5]))
            return {"attr": generator.choice(["x", "y"]), "op": op, "value": values}
        op = generator.choice(["eq", "ne", "in"] + ([] if negated else ["matches"]))
        value: Any = {
            "in": generator.sample(["ab", "cd", "abc", "x"], 2),
            "matches": generator.choice(["ab+c?", "[a-c]+", "(ab|cd)", ".*d", "x*"]),
        }.get(op, generator.choice(["ab", "cd", "abc", "x"]))
        return {"attr": "s", "op": op, "value": value}

    def tree(depth: int, negated: bool) -> dict[str, Any]:
        draw = generator.random()
        if depth == 0 or draw < 0.35:
            return leaf(negated)
        if draw < 0.55:
            return {"not": tree(depth - 1, not negated)}
        return {
            generator.choice(["all", "any"]): [
                tree(depth - 1, negated) for _ in range(generator.randint(1, 3))
            ]
        }

    types = ["t.a", "t.b", "t.c"]
    definition = rule_set(
        *(
            rule(f"r{i}", event_types=generator.sample(types, generator.randint(1, 2)), when=tree(3, False))
            for i in range(8)
        )
    )
    events = []
    for i in range(300):
        attributes: dict[str, AttributeScalar] = {
            a: generator.choice([generator.randint(0, 6), generator.randint(0, 6) + 0.5])
            for a in ("x", "y")
            if generator.random() < 0.8
        }
        if generator.random() < 0.8:
            attributes["s"] = generator.choice(["ab", "cd", "abc", "x", "abbc", "", "xd", "q"])
        events.append(
            event(
                f"src/{i}", attributes, event_type=generator.choice([*types, "t.z"]), subject=f"{i % 17:064x}"
            )
        )

    expected = [
        (e.key, r.id)
        for e in events
        for r in definition.rules
        if e.event_type in r.event_types and _reference(r.when, e.attributes)
    ]
    assert fired(RuleEngine(definition).evaluate(events).firings) == expected
