"""The staff console's frame: who sees which area, and refusals by role (the pages of each
area are tested in their own modules)."""

from __future__ import annotations

from starlette.testclient import TestClient

from kit.principal import Role
from services.portal.i18n import Localiser
from services.portal.staff import AREAS, STAFF_ROLES, areas_for, navigation
from tests.support.portal.fakes import signed_in


def test_each_staff_role_sees_its_own_areas_and_a_resident_none(en: Localiser) -> None:
    assert [a.path for a in areas_for(Role.REVIEWER)] == [
        "/staff/disputes",
        "/staff/repairs",
        "/staff/rule-sets",
        "/staff/policy",
    ]
    assert [a.path for a in areas_for(Role.AUDITOR)] == ["/staff/audit", "/staff/rule-sets", "/staff/policy"]
    assert [a.path for a in areas_for(Role.BENEFIT_PROVIDER)] == ["/staff/eligibility"]
    assert areas_for(Role.SUBJECT) == ()
    # Every area is open to some staff role, and only to staff roles.
    assert all(a.roles and a.roles <= STAFF_ROLES for a in AREAS)
    assert navigation(en, Role.AUDITOR)[0] == ("/staff/audit", "Audit")


def test_the_console_shows_a_staff_member_the_areas_of_their_role(client: TestClient) -> None:
    page = signed_in(client, "auditor").get("/language/en?next=/staff")
    assert page.status_code == 200
    assert "Staff console" in page.text
    for path in ("/staff/audit", "/staff/rule-sets"):
        assert f'href="{path}"' in page.text
    assert 'href="/staff/disputes"' not in page.text
    # The resident's pages are not in a staff member's navigation.
    assert 'href="/credit"' not in page.text


def test_a_resident_or_another_role_is_told_the_page_is_not_theirs(client: TestClient) -> None:
    resident = signed_in(client, "subject").get("/language/en?next=/staff")
    assert resident.status_code == 403
    assert "This page is not part of your work" in resident.text
    assert 'href="/credit"' in resident.text  # a resident keeps the resident's navigation


def test_a_visitor_is_sent_to_sign_in(client: TestClient) -> None:
    response = client.get("/staff", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/signin?next=%2Fstaff")
