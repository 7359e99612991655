"""The console's rule-set and policy pages with a fake rules and score service
(authoring_fakes): role refusals, CSRF, a draft's problems at their field paths and lines,
saving, the difference between versions, a backtest's report and its charts, confirmation
steps that restate the backtest, and the policy preview and activation."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from services.portal import authoring_records as a
from services.portal import charts
from services.portal.backend import ServiceError, Violation
from services.portal.i18n import Localiser
from services.portal.views import figures
from services.portal.views import policy as policy_views
from services.portal.views import rulesets as views
from tests.support.portal.authoring_fakes import V1, V2, AuthoringBackend
from tests.support.portal.fakes import csrf_of, signed_in

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def backend() -> AuthoringBackend:
    return AuthoringBackend()


def as_staff(client: TestClient, role: str) -> TestClient:
    client.cookies.clear()
    signed_in(client, role).get("/language/en?next=/staff")
    return client


def methods(backend: AuthoringBackend) -> list[str]:
    return [name for name, _ in backend.calls]


# -- reading -----------------------------------------------------------------------------------


def test_the_list_shows_every_version_with_its_state_newest_first(
    client: TestClient, backend: AuthoringBackend
) -> None:
    page = as_staff(client, "auditor").get("/staff/rule-sets")
    assert page.status_code == 200
    states = re.findall(r'class="state state-(\w+)"', page.text)
    assert states == ["draft", "active"]
    # An auditor reads but does not author.
    assert "/staff/rule-sets/new" not in page.text
    assert 'action="/staff/rule-sets/compare"' in page.text


def test_a_version_shows_its_rules_in_plain_language_its_yaml_and_its_changes(
    client: TestClient, backend: AuthoringBackend
) -> None:
    page = as_staff(client, "reviewer").get("/staff/rule-sets/2")
    assert page.status_code == 200
    assert "Red light run" in page.text
    assert "Volunteering" in page.text
    assert "\u22128" in page.text  # points as the public rules page writes them
    assert "civic.volunteer" in page.text
    assert "legal_basis: Volunteer regulation" in page.text
    # A reviewer may backtest, publish and retire a draft; activating waits for publishing.
    for act in ("backtest", "publish", "retire"):
        assert f'action="/staff/rule-sets/2/{act}"' in page.text
    assert 'action="/staff/rule-sets/2/activate"' not in page.text


def test_an_auditor_sees_no_actions_and_a_benefit_provider_or_resident_no_rule_sets(
    client: TestClient, backend: AuthoringBackend
) -> None:
    page = as_staff(client, "auditor").get("/staff/rule-sets/2")
    assert page.status_code == 200
    assert "/staff/rule-sets/2/publish" not in page.text
    for role in ("benefit_provider", "subject"):
        refused = as_staff(client, role).get("/staff/rule-sets")
        assert refused.status_code == 403
        assert "This page is not part of your work" in refused.text
    assert as_staff(client, "auditor").get("/staff/rule-sets/new").status_code == 403


def test_the_portal_and_the_service_each_refuse_an_act_out_of_role(
    client: TestClient, backend: AuthoringBackend
) -> None:
    # An admin reads rule sets but may not publish: posting around the page is refused by
    # the portal before any call.
    as_staff(client, "admin")
    token = csrf_of(client.get("/staff/rule-sets").text)
    refused = client.post("/staff/rule-sets/2/publish", data={"csrf_token": token, "confirm": "yes"})
    assert refused.status_code == 403
    assert "PublishRuleSet" not in methods(backend)
    # It may backtest a stored rule set (an operator's check; it changes nothing live), and
    # the page offers only that.
    page = client.get("/staff/rule-sets/2")
    assert 'action="/staff/rule-sets/2/backtest"' in page.text
    assert 'action="/staff/rule-sets/2/publish"' not in page.text
    started = client.post(
        "/staff/rule-sets/2/backtest", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False
    )
    assert started.status_code == 303
    assert "StartBacktest" in methods(backend)
    # A reviewer the rules service refuses all the same (its own role check decides): the
    # refusal is shown and nothing changed.
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    backend.fail["PublishRuleSet"] = ServiceError("PERMISSION_DENIED", "role may not call PublishRuleSet")
    response = client.post("/staff/rule-sets/2/publish", data={"csrf_token": token, "confirm": "yes"})
    assert response.status_code == 403
    assert backend.rule_sets[2]["state"] == "draft"


def test_an_unknown_or_malformed_rule_set_id_is_not_found(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    assert client.get("/staff/rule-sets/99").status_code == 404
    assert client.get("/staff/rule-sets/x1").status_code == 404
    # A malformed id is not sent on.
    assert [args[0].rule_set_id for name, args in backend.calls if name == "GetRuleSet"] == [99]


# -- the difference between versions -----------------------------------------------------------


def test_the_diff_names_added_removed_and_changed_rules_with_their_fields(en: Localiser) -> None:
    older = V1 + (
        "  - id: old.rule\n    title: Old\n    description: d\n    event_types: [x]\n    points: 1\n"
        "    category: civic\n    severity: positive\n    legal_basis: L\n"
    )
    d = views.diff(en, older, V2)
    kinds = {rule.rule_id: rule.kind for rule in d.rules}
    assert kinds == {"traffic.red_light": "changed", "civic.volunteer": "added", "old.rule": "removed"}
    changed = next(rule for rule in d.rules if rule.kind == "changed")
    assert [(f.field, f.before, f.after) for f in changed.fields] == [("points", "-5", "-8")]
    assert d.unchanged == 1  # the fare evasion rule
    assert [(f.field, f.before, f.after) for f in d.document] == [("version", "1", "2")]
    added = next(rule for rule in d.rules if rule.kind == "added")
    assert ("points", "", "3") in [(f.field, f.before, f.after) for f in added.fields]


def test_the_diff_page_compares_two_stored_versions(client: TestClient, backend: AuthoringBackend) -> None:
    page = as_staff(client, "auditor").get("/staff/rule-sets/compare?from=1&to=2")
    assert page.status_code == 200
    assert "<del>-5</del>" in page.text
    assert "<ins>-8</ins>" in page.text
    assert "civic.volunteer" in page.text
    assert "From egret-sample 1 to egret-sample 2: 2 rules differ; 1 unchanged." in page.text
    same = client.get("/staff/rule-sets/compare?from=2&to=2")
    assert "0 rules differ" in same.text
    assert "The two versions have the same rules." in same.text
    assert as_staff(client, "auditor").get("/staff/rule-sets/compare?from=1&to=x").status_code == 404


# -- drafts ------------------------------------------------------------------------------------

BROKEN = V2.replace("points: 3", "points: three").replace("legal_basis: Metro provisions", "legal_basis: ''")


def test_each_problem_is_placed_at_its_field_path_and_line(en: Localiser) -> None:
    problems = views.problems(
        en,
        BROKEN,
        (
            Violation("source.rules[2] (civic.volunteer).points", "INVALID", "points must be an integer"),
            Violation("source.rules[1] (transport.metro_fare_evasion).legal_basis", "REQUIRED", "required"),
            Violation("source", "INVALID_YAML", "no rules"),
        ),
    )
    lines = BROKEN.splitlines()
    assert lines[problems[0].line - 1].strip() == "points: three"
    assert lines[problems[1].line - 1].strip() == "legal_basis: ''"
    assert problems[0].path == "rules[2] (civic.volunteer).points"
    assert problems[0].where == f"line {problems[0].line}"
    assert (problems[2].line, problems[2].where) == (0, "")


def test_a_draft_with_errors_shows_each_at_its_path_then_saves_once_fixed(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/new").text)
    page = client.post("/staff/rule-sets/new", data={"csrf_token": token, "action": "save", "source": BROKEN})
    assert page.status_code == 400
    assert "There is a problem" in page.text
    assert re.search(
        r'<a href="#problem-1">rules\[1\] \(transport.metro_fare_evasion\).legal_basis', page.text
    )
    assert re.search(
        r'<li id="problem-2" tabindex="-1"><code>rules\[2\] \(civic.volunteer\).points</code> \(line \d+\)',
        page.text,
    )
    assert "points: three" in page.text  # the source is kept in the text area
    assert "CreateDraft" not in methods(backend)  # not saved while invalid

    fixed = BROKEN.replace("points: three", "points: 3").replace("legal_basis: ''", "legal_basis: Metro")
    checked = client.post(
        "/staff/rule-sets/new", data={"csrf_token": token, "action": "validate", "source": fixed}
    )
    assert checked.status_code == 200
    assert "No problem found" in checked.text
    saved = client.post(
        "/staff/rule-sets/new",
        data={"csrf_token": token, "action": "save", "source": fixed},
        follow_redirects=False,
    )
    assert (saved.status_code, saved.headers["location"]) == (303, "/staff/rule-sets/3")
    page = client.get("/staff/rule-sets/3")
    assert "Draft saved" in page.text
    assert "Draft created" in page.text
    assert "reviewer-1" in page.text


def test_a_draft_can_be_uploaded_and_an_oversized_or_binary_file_is_refused(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/new").text)
    files = {"upload": ("v2.yaml", V2.encode(), "text/yaml")}
    page = client.post("/staff/rule-sets/new", data={"csrf_token": token, "action": "validate"}, files=files)
    assert page.status_code == 200
    assert "No problem found" in page.text
    big = {"upload": ("big.yaml", b"#" * (48 * 1024 + 1), "text/yaml")}
    refused = client.post("/staff/rule-sets/new", data={"csrf_token": token}, files=big)
    assert refused.status_code == 400, refused.text[-3000:]
    assert "larger than 48 KiB" in refused.text
    pasted = client.post("/staff/rule-sets/new", data={"csrf_token": token, "source": "a" * (48 * 1024 + 1)})
    assert pasted.status_code == 400
    assert "larger than 48 KiB" in pasted.text
    binary = {"upload": ("x.yaml", b"\xff\xfe\x00", "text/yaml")}
    assert "not UTF-8" in client.post("/staff/rule-sets/new", data={"csrf_token": token}, files=binary).text
    empty = client.post("/staff/rule-sets/new", data={"csrf_token": token, "source": "  "})
    assert empty.status_code == 400
    assert 'href="#source"' in empty.text
    assert methods(backend).count("ValidateRuleSet") == 1


def test_every_form_needs_the_csrf_token(client: TestClient, backend: AuthoringBackend) -> None:
    as_staff(client, "reviewer")
    for path in (
        "/staff/rule-sets/new",
        "/staff/rule-sets/2/backtest",
        "/staff/rule-sets/2/publish",
        "/staff/backtests/bt-1/cancel",
    ):
        response = client.post(path, data={"csrf_token": "forged", "source": V2, "confirm": "yes"})
        assert response.status_code == 403, path
        assert "This form has expired" in response.text
    as_staff(client, "admin")
    for path in ("/staff/policy/preview", "/staff/policy/activate"):
        assert (
            client.post(path, data={"csrf_token": "forged", "policy_yaml": "version: x"}).status_code == 403
        )
    assert not {
        "ValidateRuleSet",
        "StartBacktest",
        "CancelBacktest",
        "PublishRuleSet",
        "PreviewPolicy",
        "ActivatePolicy",
    } & set(methods(backend))


# -- backtest, publish, activate, retire -------------------------------------------------------


def test_a_backtest_report_shows_its_headline_charts_and_tables(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    started = client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token}, follow_redirects=False)
    assert (started.status_code, started.headers["location"]) == (303, "/staff/backtests/bt-1")
    assert backend.jobs["bt-1"]["request"].purpose == ""  # no subjects asked for, none listed
    running = client.get("/staff/backtests/bt-1")
    assert running.status_code == 200
    assert "Backtest: Running" in running.text
    assert '<progress id="progress" max="100" value="25">' in running.text
    assert "300 of 1,200 stored events replayed (25 %)." in running.text
    assert 'href="/staff/backtests/bt-1">Check progress' in running.text
    assert "http-equiv" not in running.text  # nothing refreshes by itself (WCAG 2.2.1)
    page = client.get("/staff/backtests/bt-1")
    assert page.status_code == 200
    assert "12 of 100 subjects would change score or tier; 10 would change tier." in page.text
    images = [src.replace("&amp;", "&") for src in re.findall(r'src="(/staff/charts/[^"]+)"', page.text)]
    assert [src.split("?")[0] for src in images] == [
        "/staff/charts/migration.svg",
        "/staff/charts/changes.svg",
        "/staff/charts/rules.svg",
    ]
    for src in images:
        image = client.get(src)
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/svg+xml"
        assert "script-src" not in image.headers["content-security-policy"]
        assert ET.fromstring(image.content).get("role") == "img"
    # The cohort table: each cohort's moves (7 down from A to B, 3 up from B to A).
    assert re.search(r"<td>District</td>|<td>district</td>", page.text)
    assert re.search(
        r"<td>Siming</td><td class=\"num\">100</td><td class=\"num\">12</td>"
        r"<td class=\"num\">12 %</td><td class=\"num\">3</td><td class=\"num\">7</td>",
        page.text,
    )
    # Every chart has its table; no subjects without a purpose.
    assert page.text.count("<table") == 4
    assert "The subjects it affects most" not in page.text


def test_a_backtest_with_a_purpose_lists_the_subjects_it_affects_by_shortened_key(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token, "subjects": "yes"})
    assert backend.jobs["bt-1"]["request"].purpose == "rule-backtest"
    assert backend.jobs["bt-1"]["request"].subject_limit == 50
    page = client.get("/staff/backtests/bt-1")
    assert re.search(r"<title>Backtest of egret-sample v2 \u2013 ", page.text)
    assert "The subjects it affects most" in page.text
    assert "<code>kkkkkkkkkkkk…</code>" in page.text
    assert "k" * 13 not in page.text
    assert "A → B" in page.text
    reads = [args[0].purpose for name, args in backend.calls if name == "GetBacktest"]
    assert reads[-2:] == ["", "rule-backtest"]  # the subjects read with the start's purpose


def test_a_failed_backtest_says_why_and_an_auditor_may_read_but_not_start_one(
    client: TestClient, backend: AuthoringBackend
) -> None:
    backend.fail_next_backtest = True
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token})
    page = client.get("/staff/backtests/bt-1")
    assert "The backtest failed" in page.text
    assert "division by zero" in page.text
    as_staff(client, "auditor")
    assert client.get("/staff/backtests/bt-1").status_code == 200
    assert client.get("/staff/backtests/bt-9").status_code == 404
    assert client.get("/staff/backtests/bt%2F..").status_code == 404
    token = csrf_of(client.get("/staff/rule-sets").text)
    assert client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token}).status_code == 403


def test_a_running_backtest_is_cancelled_from_its_page_and_then_says_so(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    running = client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token})  # its page
    assert "Backtest: Running" in running.text
    assert 'action="/staff/backtests/bt-1/cancel"' in running.text
    done = client.post(
        "/staff/backtests/bt-1/cancel", data={"csrf_token": csrf_of(running.text)}, follow_redirects=False
    )
    assert (done.status_code, done.headers["location"]) == (303, "/staff/backtests/bt-1")
    page = client.get("/staff/backtests/bt-1")
    assert "Backtest: Cancelled" in page.text
    assert "by reviewer-1" in page.text
    # Its progress as it was when it stopped; nothing more to cancel or to wait for.
    assert "300 of 1,200 stored events replayed (25 %)." in page.text
    assert "/cancel" not in page.text
    assert "Check progress" not in page.text
    assert "<td>Cancelled</td>" in client.get("/staff/rule-sets/2").text
    # A finished backtest: the service's refusal, in words.
    client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token})
    client.get("/staff/backtests/bt-2")
    assert client.post("/staff/backtests/bt-2/cancel", data={"csrf_token": token}).status_code == 409
    # An auditor reads a running backtest but is offered no cancel, and may not post one.
    client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token})
    backend.jobs["bt-3"]["reads"] = 0  # the fake's next read shows it running
    as_staff(client, "auditor")
    page = client.get("/staff/backtests/bt-3")
    assert "Backtest: Running" in page.text
    assert "/cancel" not in page.text
    token = csrf_of(client.get("/staff/rule-sets").text)
    assert client.post("/staff/backtests/bt-3/cancel", data={"csrf_token": token}).status_code == 403
    # An admin may cancel anyone's.
    as_staff(client, "admin")
    backend.jobs["bt-3"]["reads"] = 0
    page = client.get("/staff/backtests/bt-3")
    assert 'action="/staff/backtests/bt-3/cancel"' in page.text
    client.post("/staff/backtests/bt-3/cancel", data={"csrf_token": csrf_of(page.text)})
    assert "by admin-1" in client.get("/staff/backtests/bt-3").text
    assert methods(backend).count("CancelBacktest") == 3


def test_publishing_restates_the_backtest_and_lands_under_the_staff_members_name(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    confirm = client.post("/staff/rule-sets/2/publish", data={"csrf_token": token})
    assert confirm.status_code == 200
    assert "This version has no finished backtest" in confirm.text
    assert backend.rule_sets[2]["state"] == "draft"  # nothing done before the confirmation

    started = client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token})
    assert "Backtest: Running" in started.text  # the start leads to the job's page
    assert (
        "no finished backtest" in client.post("/staff/rule-sets/2/publish", data={"csrf_token": token}).text
    )
    client.get("/staff/backtests/bt-1")  # done
    assert "Its latest backtest: 12 of 100 subjects" in client.get("/staff/rule-sets/2").text
    confirm = client.post("/staff/rule-sets/2/publish", data={"csrf_token": token})
    assert "12 of 100 subjects would change score or tier; 10 would change tier." in confirm.text
    done = client.post("/staff/rule-sets/2/publish", data={"csrf_token": token, "confirm": "yes"})
    assert done.status_code == 200
    assert "Published: egret-sample, version 2." in done.text
    activated = client.post("/staff/rule-sets/2/activate", data={"csrf_token": token, "confirm": "yes"})
    assert "Activated: egret-sample, version 2." in activated.text
    assert [backend.rule_sets[i]["state"] for i in (1, 2)] == ["published", "active"]
    assert re.findall(r"<td>(Published|Activated)</td><td>(reviewer-1)</td>", activated.text) == [
        ("Published", "reviewer-1"),
        ("Activated", "reviewer-1"),
    ]
    retired = client.post("/staff/rule-sets/1/retire", data={"csrf_token": token, "confirm": "yes"})
    assert "Retired: egret-sample, version 1." in retired.text


def test_a_refused_act_is_shown_in_words(client: TestClient, backend: AuthoringBackend) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/1").text)
    # The active rule set cannot be activated again from "published": the service says no.
    refused = client.post("/staff/rule-sets/2/activate", data={"csrf_token": token, "confirm": "yes"})
    assert refused.status_code == 409
    assert backend.rule_sets[2]["state"] == "draft"


# -- charts ------------------------------------------------------------------------------------


def test_the_heat_map_writes_every_count_in_its_cell_and_outlines_the_diagonal(en: Localiser) -> None:
    chart = figures.migration_map(en, ("A", "B"), ("A", "B"), ((1500, 7), (3, 40)))
    root = ET.fromstring(charts.heat_map(chart))
    assert root.get("role") == "img"
    assert root.find(f"{SVG}title").text == "Tier migration"  # type: ignore[union-attr]
    assert "10 of 1,550 change tier" in root.find(f"{SVG}desc").text  # type: ignore[union-attr,operator]
    said = [t.text for t in root.iter(f"{SVG}text")]
    assert {"1,500", "7", "3", "40", "Tier now", "Tier under the candidate"} <= set(said)


def test_the_bar_charts_write_each_value_and_tell_losses_by_hatching(en: Localiser) -> None:
    rules = charts.bars(figures.rules_bars(en, ("traffic.red_light", "civic.volunteer"), (-60, 15)))
    said = [t.text for t in ET.fromstring(rules).iter(f"{SVG}text")]
    assert {"\u221260", "+15", "traffic.red_light", "civic.volunteer"} <= set(said)
    assert b"hatch" in rules or b"pattern" in rules  # the loss is hatched, not only coloured
    histogram = charts.bars(figures.change_histogram(en, ("<= -10", "0"), (7, 88)))
    assert {"7", "88", "<= -10"} <= {t.text for t in ET.fromstring(histogram).iter(f"{SVG}text")}


def test_chart_data_in_a_url_round_trips_and_anything_else_is_refused(client: TestClient) -> None:
    data = figures.matrix_data(("A", "B"), ("A", "B"), ((1, 2), (3, 4)))
    assert figures.decode_matrix(data) == (("A", "B"), ("A", "B"), ((1, 2), (3, 4)))
    for bad in ("", "!!", figures.encode({"r": ["A"], "c": ["A"], "n": [[True]]}), "A" * 7000):
        with pytest.raises(figures.BadChartData):
            figures.decode_matrix(bad)
    as_staff(client, "auditor")
    assert client.get(f"/staff/charts/migration.svg?d={data}").status_code == 200
    assert client.get("/staff/charts/migration.svg?d=broken").status_code == 404
    assert client.get(f"/staff/charts/other.svg?d={data}").status_code == 404
    as_staff(client, "subject")
    assert client.get(f"/staff/charts/migration.svg?d={data}").status_code == 403


# -- the policy --------------------------------------------------------------------------------


def test_the_policy_page_shows_the_active_policy_and_a_reviewer_may_preview_not_activate(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    page = client.get("/staff/policy")
    assert page.status_code == 200
    assert "Policy 2026.1" in page.text
    token = csrf_of(page.text)
    preview = client.post(
        "/staff/policy/preview", data={"csrf_token": token, "policy_yaml": "version: '2026.9'\n"}
    )
    assert preview.status_code == 200
    assert "Of 100 subjects, 30 would change score and 9 would change tier." in preview.text
    assert "/staff/charts/migration.svg" in preview.text
    assert 'action="/staff/policy/activate"' not in preview.text
    refused = client.post("/staff/policy/activate", data={"csrf_token": token, "policy_yaml": "version: x"})
    assert refused.status_code == 403
    empty = client.post("/staff/policy/preview", data={"csrf_token": token, "policy_yaml": " "})
    assert empty.status_code == 400
    assert 'href="#policy_yaml"' in empty.text


def test_an_admin_activates_a_policy_after_a_confirmation_restating_its_preview(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "admin")
    token = csrf_of(client.get("/staff/policy").text)
    confirm = client.post(
        "/staff/policy/activate", data={"csrf_token": token, "policy_yaml": "version: '2026.9'\n"}
    )
    assert confirm.status_code == 200
    assert "Activate policy 2026.9?" in confirm.text
    assert "9 would change tier" in confirm.text
    assert backend.policy_versions == ["2026.1"]
    assert 'name="expected_current" value="2026.1"' in confirm.text
    done = client.post(
        "/staff/policy/activate",
        data={
            "csrf_token": token,
            "policy_yaml": "version: '2026.9'\n",
            "expected_current": "2026.1",
            "confirm": "yes",
        },
    )
    assert done.status_code == 200
    assert "Policy 2026.9 is active." in done.text
    assert backend.policy_versions == ["2026.1", "2026.9"]
    # Someone activated another in between: score refuses, the page says so.
    stale = client.post(
        "/staff/policy/activate",
        data={
            "csrf_token": token,
            "policy_yaml": "version: '2027.1'\n",
            "expected_current": "2026.1",
            "confirm": "yes",
        },
    )
    assert stale.status_code == 409
    assert backend.policy_versions == ["2026.1", "2026.9"]


def test_a_policy_previews_matrix_follows_the_active_policys_tier_order(en: Localiser) -> None:
    active = (Path(__file__).resolve().parents[3] / "config" / "policy.yaml").read_text()
    report = a.PolicyReport(
        "2026.2",
        "2026.3",
        None,
        4,
        2,
        2,
        tuple(
            a.Migration(before, after, 1, "person")
            for before, after in (("C", "C"), ("A", "AAA"), ("AAA", "A"), ("D", "C"))
        ),
        (),
    )
    view = policy_views.preview(en, report, active)
    assert [k.kind for k in view.kinds] == ["Residents"]
    assert view.kinds[0].matrix.tiers == ("AAA", "A", "C", "D")
    # Without the active policy, the report's own order.
    assert policy_views.preview(en, report).kinds[0].matrix.tiers == ("C", "A", "AAA", "D")


def test_an_auditor_reads_a_backtest_with_subjects_without_stating_a_purpose_they_may_not(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/rule-sets/2").text)
    client.post("/staff/rule-sets/2/backtest", data={"csrf_token": token, "subjects": "yes"})
    as_staff(client, "auditor")
    backend.calls.clear()
    page = client.get("/staff/backtests/bt-1")
    assert "12 of 100 subjects" in page.text
    assert "The subjects it affects most" not in page.text
    assert "Its latest backtest: 12 of 100" in client.get("/staff/rule-sets/2").text
    assert {args[0].purpose for name, args in backend.calls if name == "GetBacktest"} == {""}


def test_a_candidate_policy_score_refuses_is_shown_again_with_the_refusal(
    client: TestClient, backend: AuthoringBackend
) -> None:
    as_staff(client, "reviewer")
    token = csrf_of(client.get("/staff/policy").text)
    backend.fail["PreviewPolicy"] = ServiceError(
        "INVALID_ARGUMENT",
        "invalid policy",
        (Violation("policy_yaml.kinds.person.tiers[0].min", "OUT_OF_RANGE", "must be at most max"),),
    )
    page = client.post("/staff/policy/preview", data={"csrf_token": token, "policy_yaml": "version: '9'\n"})
    assert page.status_code == 400
    assert 'href="#policy_yaml"' in page.text
    assert "policy_yaml.kinds.person.tiers[0].min" in page.text
    assert "version: &#39;9&#39;" in page.text  # the candidate is kept in the text area
