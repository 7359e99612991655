"""The staff console's casework in a real browser (the world of tests/browser/conftest.py: the four
services, the local OpenID provider and the portal as processes): a resident disputes an
entry and applies for repair of a minor one on the website; a reviewer signs in through the
provider's form, finds the dispute in the queue, takes it, finds it again under "assigned to
me", overturns it with a reason and the confirmation, and sees the decision and the new
score; the resident sees both; the repair waits in its queue; an auditor reads the
resident's access log (the reviewer's reads are in it) and the audit chains; the metro
company checks the resident's eligibility for its discount. Role navigation and refusals.
axe-core on every page, 360 px without sideways scrolling; screenshots in
test-artefacts/browser/."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.support.browser import PHONE, assert_fits_width, check_page
from tests.support.browser_world import World, entry_with, open_page, shown_score, sign_in, switch_language
from tests.support.events import resident_id
from tests.support.scenario import ALICE

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

AREAS = {
    "/staff/disputes",
    "/staff/repairs",
    "/staff/audit",
    "/staff/rule-sets",
    "/staff/policy",
    "/staff/eligibility",
}


def areas_shown(page: Page) -> set[str]:
    """The console areas the navigation offers the signed-in person."""
    hrefs = page.locator("nav.main-nav a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    return {h for h in hrefs if h in AREAS}


def new_page(world: World) -> Page:
    """A second person at another browser (a context of their own: their own session)."""
    other = world.browser.new_context(base_url=world.stack.url, locale="zh-Hans")
    other.set_default_timeout(15_000)
    return other.new_page()


def test_a_reviewer_decides_a_dispute_filed_on_the_website_and_an_auditor_sees_the_reads(
    world: World, context: BrowserContext, page: Page
) -> None:
    # The resident disputes the fare evasion and applies for repair of the red light (minor:
    # the policy lets it be repaired at once).
    sign_in(page)
    switch_language(page, "en")
    main = page.locator("main")
    page.goto("/credit")
    before = shown_score(page)
    fare = entry_with(page, "transport.metro_fare_evasion")
    fare_id = fare.rsplit("/", 1)[1]
    page.goto(f"{fare}/dispute")
    page.locator("#statement").fill("I had a valid ticket; the gate was broken.")
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name=re.compile("^File")).click()
    page.wait_for_url(re.compile(r"/contest$"))
    red = entry_with(page, "traffic.red_light")
    red_id = red.rsplit("/", 1)[1]
    page.goto(f"{red}/repair")
    page.locator("#evidence").fill("I took the road safety course on 2 May.")
    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Send the application").click()
    page.wait_for_url(re.compile(r"/contest$"))
    expect(main).to_contain_text("Pending: waiting for a decision")

    # The reviewer: the disputes queue, the dispute, a decision with its confirmation.
    reviewer = new_page(world)
    try:
        sign_in(reviewer, "reviewer", next_path="/staff")
        assert areas_shown(reviewer) == {
            "/staff/disputes",
            "/staff/repairs",
            "/staff/rule-sets",
            "/staff/policy",
        }
        check_page(reviewer, "console-home-reviewer-zh")
        open_page(reviewer, "/staff/disputes", "console-disputes-zh")
        switch_language(reviewer, "en")
        check_page(reviewer, "console-disputes-en")
        reviewer.locator(f"main a[href='/staff/disputes/{fare_id}']").click()
        rmain = reviewer.locator("main")
        expect(rmain).to_contain_text("I had a valid ticket; the gate was broken.")
        expect(rmain).to_contain_text("Urban Rail Transit Operation Management Provisions")
        check_page(reviewer, "console-dispute-en")
        # The reviewer takes it, then finds it in the queue under "Assigned to me".
        reviewer.get_by_role("button", name="Take this dispute").click()
        reviewer.wait_for_url(re.compile(rf"/staff/disputes/{fare_id}$"))
        expect(rmain).to_contain_text("You have taken this dispute.")
        expect(reviewer.get_by_role("button", name="Release")).to_be_visible()
        reviewer.goto("/staff/disputes")
        reviewer.locator("#held").select_option("me")
        reviewer.get_by_role("button", name="Show").click()
        reviewer.wait_for_url(re.compile(r"/staff/disputes\?.*held=me"))
        mine = reviewer.locator("table.queue tbody tr")
        expect(mine).to_have_count(1)
        expect(mine).to_contain_text("You")
        check_page(reviewer, "console-disputes-mine-en")
        mine.locator(f"a[href='/staff/disputes/{fare_id}']").click()
        reviewer.locator("#decision-overturn").check()
        reviewer.locator("#reason").fill("The gate log shows a valid ticket at Lianban.")
        reviewer.get_by_role("button", name="Continue").click()
        expect(reviewer.locator("h1")).to_have_text("Check your decision")
        check_page(reviewer, "console-decision-confirm-en")
        reviewer.get_by_role("button", name="Record the decision").click()
        reviewer.wait_for_url(re.compile(rf"/staff/disputes/{fare_id}$"))
        expect(rmain).to_contain_text("Your decision has been recorded.")
        expect(rmain).to_contain_text("reviewer-wang")
        expect(rmain).to_contain_text(f"{before + 10:,}, tier")  # the fare evasion's -10 withdrawn
        check_page(reviewer, "console-dispute-decided-en")
        switch_language(reviewer, "zh_Hans")
        check_page(reviewer, "console-dispute-decided-zh")

        # The repair application waits in its queue with its decision date.
        open_page(reviewer, "/staff/repairs", "console-repairs-zh")
        switch_language(reviewer, "en")
        reviewer.locator(f"main a[href='/staff/repairs/{red_id}']").click()
        expect(rmain).to_contain_text("I took the road safety course on 2 May.")
        check_page(reviewer, "console-repair-en")

        # Not a reviewer's area: the audit, even by its URL.
        open_page(reviewer, "/staff/audit", "console-not-allowed-reviewer-en", status=403)
        expect(rmain).to_contain_text("not part of your work")
    finally:
        reviewer.context.close()

    # The resident sees the decision and the new score.
    page.goto("/contest")
    expect(main).to_contain_text("Decided: the entry was withdrawn")
    page.goto("/credit")
    assert shown_score(page) == before + 10

    # An auditor: the resident's access log by the identifier typed in (never in the URL),
    # with the reviewer's reads; the audit chains intact.
    auditor = new_page(world)
    try:
        sign_in(auditor, "auditor", next_path="/staff")
        assert areas_shown(auditor) == {"/staff/audit", "/staff/rule-sets", "/staff/policy"}
        open_page(auditor, "/staff/audit", "console-audit-zh")
        switch_language(auditor, "en")
        auditor.locator("#scheme").select_option("resident-id")
        auditor.locator("#identifier").fill(ALICE)
        auditor.locator("#note").fill("case 2026-118")
        auditor.get_by_role("button", name="Show the access log").click()
        reads = auditor.locator("main table tr", has_text="reviewer-wang")
        expect(reads.filter(has_text="(dispute-review)").first).to_be_visible()
        expect(reads.filter(has_text="(repair-review)").first).to_be_visible()
        assert ALICE not in auditor.url
        check_page(auditor, "console-audit-log-en")
        open_page(auditor, "/staff/audit/chains", "console-audit-chains-en")
        amain = auditor.locator("main")
        expect(amain).not_to_contain_text("DOES NOT VERIFY")
        assert amain.inner_text().count("Intact:") == 4  # ingest, rules, score and query
        switch_language(auditor, "zh_Hans")
        check_page(auditor, "console-audit-chains-zh")
    finally:
        auditor.context.close()


def test_the_metro_company_checks_eligibility_and_roles_are_refused(page: Page) -> None:
    sign_in(page, "metro", next_path="/staff")
    assert areas_shown(page) == {"/staff/eligibility"}
    open_page(page, "/staff/eligibility", "console-eligibility-form-zh")
    switch_language(page, "en")
    main = page.locator("main")
    # Only its own benefit is offered.
    options = page.locator("#benefit option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["metro.discount"]
    page.locator("#identifier").fill(ALICE)
    page.locator("#note").fill("application 2026-41")
    page.get_by_role("button", name="Check eligibility").click()
    expect(main.locator(".verdict")).to_contain_text(re.compile("^(Eligible|Not eligible):"))
    expect(main).to_contain_text("Score this benefit sees")
    expect(main).to_contain_text("Transport")
    assert ALICE not in page.url
    check_page(page, "console-eligibility-en")
    switch_language(page, "zh_Hans")  # a GET: the form again, in Chinese
    page.locator("#identifier").fill(ALICE)
    page.get_by_role("button", name="核验资格").click()
    expect(main.locator(".verdict")).to_contain_text("符合条件")
    check_page(page, "console-eligibility-zh")

    # A subject the credit service holds no score for: said in words.
    switch_language(page, "en")
    page.locator("#identifier").fill(resident_id(9999))
    page.get_by_role("button", name="Check eligibility").click()
    expect(page.locator(".error-summary")).to_contain_text("No credit record for this subject")
    check_page(page, "console-eligibility-unknown-en")

    # On a phone: the form and the answer fit 360 px.
    page.set_viewport_size(PHONE)
    page.locator("#identifier").fill(ALICE)
    page.get_by_role("button", name="Check eligibility").click()
    expect(main.locator(".verdict")).to_be_visible()
    assert_fits_width(page, "eligibility at 360 px")
    check_page(page, "console-phone-eligibility-en")
    for path in ("/staff", "/staff/disputes"):
        response = page.goto(path)
        assert response is not None
        assert_fits_width(page, f"{path} at 360 px")

    # A resident who opens a staff area gets the "not part of your work" page.
    page.context.clear_cookies()
    sign_in(page, "resident", next_path="/credit")
    assert areas_shown(page) == set()
    open_page(page, "/staff/disputes", "console-not-allowed-resident-zh", status=403)
    assert page.problems == []  # type: ignore[attr-defined]
