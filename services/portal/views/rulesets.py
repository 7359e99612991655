"""The console's rule-set pages as view models: the list with states, one version (its
rules in plain language as the public rules page shows them, its YAML, its changes), the
difference between two versions rule by rule, and a draft's problems at their place in the
YAML. A backtest's report and its jobs are in services.portal.views.backtests.

The difference compares the two YAML documents generically, by rule id and field, so it
needs no model of a rule set beyond "a mapping with a list of rules that have ids": the
rules service owns the format (docs/rules.md), the portal only reads it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kit.safeyaml import YamlError, load_yaml
from services.portal import authoring_records as a
from services.portal import convert
from services.portal import records as r
from services.portal.backend import Violation
from services.portal.i18n import Localiser
from services.portal.views.public import RuleGroup, rule_groups

# -- the list ----------------------------------------------------------------------------------


def state(t: Localiser, code: str) -> str:
    return {
        "draft": t.gettext("Draft"),
        "published": t.gettext("Published"),
        "active": t.gettext("Active"),
        "retired": t.gettext("Retired"),
    }.get(code, code)


def action(t: Localiser, code: str) -> str:
    return {
        "create_draft": t.gettext("Draft created"),
        "publish": t.gettext("Published"),
        "activate": t.gettext("Activated"),
        "retire": t.gettext("Retired"),
        "import": t.gettext("Imported at start-up"),
        "redrive": t.gettext("Dead letters evaluated again"),
    }.get(code, code)


@dataclass(frozen=True)
class RuleSetRow:
    rule_set_id: int
    name: str
    version: str
    state: str
    state_code: str
    created: str
    created_by: str


def rows(t: Localiser, rule_sets: tuple[a.RuleSetInfo, ...]) -> tuple[RuleSetRow, ...]:
    """Newest first: the versions an author works on lead the list."""
    return tuple(
        RuleSetRow(
            s.rule_set_id,
            s.name,
            t.number(s.version),
            state(t, s.state),
            s.state,
            t.datetime(s.created_at) if s.created_at else "",
            s.created_by,
        )
        for s in sorted(rule_sets, key=lambda s: s.rule_set_id, reverse=True)
    )


# -- one version -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeRow:
    when: str
    action: str
    actor: str
    detail: str


@dataclass(frozen=True)
class RuleSetView:
    rule_set_id: int
    title: str
    state: str
    state_code: str
    facts: tuple[tuple[str, str], ...]
    groups: tuple[RuleGroup, ...]
    source: str
    changes: tuple[ChangeRow, ...]
    can_publish: bool
    can_activate: bool
    can_retire: bool
    can_backtest: bool


def _detail(detail_json: str) -> str:
    try:
        detail = json.loads(detail_json) if detail_json else {}
    except ValueError:
        return detail_json
    if not isinstance(detail, Mapping):
        return detail_json
    return ", ".join(f"{key}: {value}" for key, value in sorted(detail.items()))


def rule_set_view(
    t: Localiser,
    s: a.RuleSetInfo,
    changes: tuple[a.RuleSetChange, ...],
    policy: r.PublishedPolicy | None,
    *,
    author: bool,
    backtester: bool,
) -> RuleSetView:
    """`author`: the reader may change rule sets; `backtester`: it may backtest them (the
    rules service decides all the same)."""
    facts = [(t.gettext("State"), state(t, s.state)), (t.gettext("Source SHA-256"), s.source_sha256)]
    for label, at, who in (
        (t.gettext("Created"), s.created_at, s.created_by),
        (t.gettext("Published"), s.published_at, s.published_by),
        (t.gettext("Last activated"), s.activated_at, s.activated_by),
        (t.gettext("Retired"), s.retired_at, s.retired_by),
    ):
        if at is not None:
            facts.append((label, t.gettext("%(when)s by %(who)s", when=t.datetime(at), who=who or "—")))
    published = convert.published_rule_set(s.name, s.version, s.activated_at, s.source)
    return RuleSetView(
        rule_set_id=s.rule_set_id,
        title=t.gettext("%(name)s, version %(version)s", name=s.name, version=t.number(s.version)),
        state=state(t, s.state),
        state_code=s.state,
        facts=tuple(facts),
        groups=rule_groups(t, published, policy),
        source=s.source,
        changes=tuple(
            ChangeRow(
                t.datetime(c.changed_at) if c.changed_at else "",
                action(t, c.action),
                c.actor,
                _detail(c.detail_json),
            )
            for c in changes
        ),
        can_publish=author and s.state == "draft",
        can_activate=author and s.state == "published",
        can_retire=author and s.state in ("draft", "published"),
        can_backtest=backtester and s.state != "retired",
    )


# -- the difference between two versions -------------------------------------------------------


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: str  # empty when the field was added
    after: str  # empty when the field was removed


@dataclass(frozen=True)
class RuleDiff:
    rule_id: str
    kind: str  # "added", "removed", "changed"
    label: str  # the kind in the reader's language
    title: str
    fields: tuple[FieldChange, ...]


@dataclass(frozen=True)
class Diff:
    rules: tuple[RuleDiff, ...]
    document: tuple[FieldChange, ...]  # fields outside `rules` (name, version, ...)
    unchanged: int


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _fields(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    keys = list(before) + [k for k in after if k not in before]
    return tuple(
        FieldChange(str(k), _show(before.get(k)), _show(after.get(k)))
        for k in keys
        if before.get(k) != after.get(k)
    )


def _document(source: str) -> Mapping[str, Any]:
    try:
        document, _ = load_yaml(source)
    except YamlError:
        return {}
    return document if isinstance(document, Mapping) else {}


def _rules(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for rule in document.get("rules") or ():
        if isinstance(rule, Mapping) and rule.get("id") is not None:
            found[str(rule["id"])] = rule
    return found


def diff(t: Localiser, before_source: str, after_source: str) -> Diff:
    """Rule by rule, by id: added, removed, and changed with each changed field's values on
    both sides; rules in the order of the newer source, the removed ones after them."""
    before_doc, after_doc = _document(before_source), _document(after_source)
    before, after = _rules(before_doc), _rules(after_doc)
    labels = {"added": t.gettext("Added"), "removed": t.gettext("Removed"), "changed": t.gettext("Changed")}
    found: list[RuleDiff] = []
    unchanged = 0
    for rule_id, rule in after.items():
        old = before.get(rule_id)
        if old is None:
            found.append(
                RuleDiff(rule_id, "added", labels["added"], _show(rule.get("title")), _fields({}, rule))
            )
        elif old != rule:
            found.append(
                RuleDiff(rule_id, "changed", labels["changed"], _show(rule.get("title")), _fields(old, rule))
            )
        else:
            unchanged += 1
    for rule_id, rule in before.items():
        if rule_id not in after:
            found.append(
                RuleDiff(rule_id, "removed", labels["removed"], _show(rule.get("title")), _fields(rule, {}))
            )
    outside = _fields(
        {k: v for k, v in before_doc.items() if k != "rules"},
        {k: v for k, v in after_doc.items() if k != "rules"},
    )
    return Diff(tuple(found), outside, unchanged)


# -- a draft's problems ------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    anchor: str  # the element id the error summary links to
    path: str  # where in the document, as the rules service names it
    line: int  # 1-based line of the source it points at; 0 if not found
    where: str  # "line 14" in the reader's language, or ""
    message: str


_SEGMENT = re.compile(r"\.?([A-Za-z_][\w-]*)|\[(\d+)\]|\s*\([^)]*\)")


def _line(source: str, path: str) -> int:
    """The line the service's field path ("source.rules[2] (traffic.red_light).points")
    points at: the deepest node of the path found in the document, 0 if none."""
    try:
        load_yaml(source)  # bounds checked first: composing below is then safe
        node: yaml.Node | None = yaml.compose(source, Loader=yaml.SafeLoader)
    except (YamlError, yaml.YAMLError):
        return 0
    rest = path.removeprefix("source")
    line = 0
    for match in _SEGMENT.finditer(rest):
        key, index = match.group(1), match.group(2)
        if node is None or (key is None and index is None):
            continue
        found: yaml.Node | None = None
        if key is not None and isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    found, line = v, k.start_mark.line + 1
                    break
        elif index is not None and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            found = node.value[int(index)]
            line = found.start_mark.line + 1
        node = found
    return line


def problems(t: Localiser, source: str, violations: tuple[Violation, ...]) -> tuple[Problem, ...]:
    found = []
    for i, v in enumerate(violations, start=1):
        line = _line(source, v.field)
        found.append(
            Problem(
                anchor=f"problem-{i}",
                path=v.field.removeprefix("source").lstrip(".") or v.field,
                line=line,
                where=t.gettext("line %(line)s", line=t.number(line)) if line else "",
                message=v.description or v.reason,
            )
        )
    return tuple(found)
