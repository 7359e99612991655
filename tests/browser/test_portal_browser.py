"""The portal in a real browser: Debian's Chromium driven by Playwright, against the four
services, the local OpenID provider and the portal as processes (devtools.portal_stack,
as `make run` starts them). A resident signs in on the provider's own form, reads, files
a dispute, sees a reviewer's decision and read; the language switch, the public pages,
bad input, the keyboard alone, a 360 px phone and sign-out. axe-core checks every page;
screenshots go to test-artefacts/browser/."""

from __future__ import annotations

import json
import re
import time

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from egret.common.v1 import due_process_pb2
from egret.query.v1 import query_service_pb2 as query_pb
from egret.query.v1 import query_service_pb2_grpc as query_grpc
from egret.score.v1 import score_service_pb2 as score_pb
from egret.score.v1 import score_service_pb2_grpc as score_grpc
from kit.principal import Role
from services.portal.sessions import COOKIE, SEEN, fernet
from services.portal.signin import ACCESS_TOKEN
from tests.support.browser import (
    PHONE,
    assert_accessible,
    assert_fits_width,
    check_page,
    focused,
    screenshot,
    tab_to,
)
from tests.support.browser_world import (
    World,
    entry_with,
    off_loop,
    open_page,
    shown_score,
    sign_in,
    switch_language,
)
from tests.support.privacy import scan_files
from tests.support.scenario import ALICE, BOB, raw

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PUBLIC_PAGES = ("/", "/rules", "/tiers", "/catalogue", "/how-it-works")
RESIDENT_PAGES = ("/credit", "/entries", "/history", "/benefits", "/contest", "/access", "/download")


def access_token(context: BrowserContext, world: World) -> str:
    """The token the portal holds for this browser, read out of its encrypted cookie."""
    cookie = next(c for c in context.cookies() if c["name"] == COOKIE)
    keys = [line.encode() for line in world.stack.session_secret_file.read_text().splitlines() if line]
    session = json.loads(fernet(keys).decrypt(cookie["value"].encode()))
    return str(session[ACCESS_TOKEN])


def query_score(world: World, token: str) -> int:
    async def read() -> int:
        async with world.cluster.channel("query", token) as channel:
            response = await query_grpc.QueryServiceStub(channel).GetScore(
                query_pb.GetScoreRequest(subject=raw(ALICE), purpose="own-record"), timeout=10
            )
        return int(response.score.score)

    return off_loop(read())


def review(world: World, entry_id: str) -> None:
    """A reviewer reads the entry for the dispute and overturns it, through the existing RPCs."""

    async def decide() -> None:
        reviewer = world.cluster.token("reviewer-wang", Role.REVIEWER)
        async with world.cluster.channel("query", reviewer) as channel:
            query = query_grpc.QueryServiceStub(channel)
            await query.GetEntry(
                query_pb.GetEntryRequest(entry_id=entry_id, purpose="dispute-review"), timeout=10
            )
            disputes = await query.ListDisputes(
                query_pb.ListDisputesRequest(subject=raw(ALICE), purpose="dispute-review"), timeout=10
            )
        open_dispute = next(d for d in disputes.disputes if d.entry_id == entry_id)
        async with world.cluster.channel("score", reviewer) as channel:
            await score_grpc.ScoreServiceStub(channel).ResolveDispute(
                score_pb.ResolveDisputeRequest(
                    dispute_id=open_dispute.dispute_id,
                    decision=due_process_pb2.DISPUTE_DECISION_OVERTURN,
                    reason="the gate log shows a valid ticket",
                ),
                timeout=10,
            )

    off_loop(decide())


# -- the tests, in the order a newcomer would meet the site ---------------------------------


def test_public_pages_in_chinese_by_default_and_in_english(page: Page) -> None:
    page.goto("/")
    expect(page.locator("html")).to_have_attribute("lang", "zh-Hans")
    expect(page.locator("a.site-name")).to_have_text("城市信用查询")
    for path in PUBLIC_PAGES:
        open_page(page, path, f"public{path.replace('/', '-') or '-home'}-zh")
    switch_language(page, "en")
    expect(page.locator("a.site-name")).to_have_text("City credit inquiry")
    # The choice stays for the next pages, and the switch came back to the same page.
    for path in PUBLIC_PAGES:
        open_page(page, path, f"public{path.replace('/', '-') or '-home'}-en")
    expect(page.locator("main")).to_contain_text("How disputes and credit repair work")
    page.goto("/rules")
    expect(page.locator("main")).to_contain_text("rule set egret-sample")
    expect(page.locator("main")).to_contain_text("Drunk driving")
    assert page.problems == []  # type: ignore[attr-defined]


def test_bad_input_is_explained_on_the_page(world: World, context: BrowserContext, page: Page) -> None:
    sign_in(page)
    switch_language(page, "en")
    main = page.locator("main")

    # Someone else's entry answers exactly as an entry that does not exist.
    async def bobs_entry() -> str:
        async with world.cluster.channel("query", world.cluster.token("reviewer-wang", Role.REVIEWER)) as ch:
            listed = await query_grpc.QueryServiceStub(ch).ListEntries(
                query_pb.ListEntriesRequest(subject=raw(BOB), purpose="subject-request"), timeout=10
            )
        return str(listed.entries[0].entry_id)

    open_page(page, f"/entries/{off_loop(bobs_entry())}", "not-found-en", status=404)
    expect(main).to_contain_text("We could not find this among your data")
    others = main.inner_text()
    open_page(page, f"/entries/{'0' * 32}", "not-found-unknown-en", status=404)
    assert re.sub(r"[0-9a-f]{32}", "", main.inner_text()) == re.sub(r"[0-9a-f]{32}", "", others)

    # Repair applied for too early (a general entry: 90 days): the earliest date, before
    # anything is typed.
    fare = entry_with(page, "transport.metro_fare_evasion")
    page.goto(f"{fare}/repair")
    expect(main).to_contain_text("Too early: you can apply for repair of this entry from")
    check_page(page, "repair-too-early-en")

    red_light = entry_with(page, "traffic.red_light")
    # An over-long reason: the browser stops typing at the limit; a form sent without that
    # limit (an old browser, a crafted post) is refused with the limit in words.
    page.goto(f"{red_light}/dispute")
    limit = int(page.locator("#statement").get_attribute("maxlength") or 0)
    page.locator("#statement").fill("x" * (limit + 50))
    assert len(page.locator("#statement").input_value()) == limit
    page.locator("#statement").evaluate(
        "e => { e.removeAttribute('maxlength'); e.value = 'x'.repeat(4050); }"
    )
    page.get_by_role("button", name="Continue").click()
    expect(page.locator(".error-summary")).to_contain_text("it can be at most 4,000")
    check_page(page, "dispute-too-long-en")

    # A forged CSRF token: refused, nothing filed.
    page.locator("#statement").fill("The camera was broken")
    page.locator("main input[name=csrf_token]").evaluate("e => e.value = 'forged'")
    response_status: list[int] = []
    page.on("response", lambda r: response_status.append(r.status) if r.request.method == "POST" else None)
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("h1")).to_have_text("This form has expired")
    assert response_status[-1] == 403
    check_page(page, "csrf-refused-en")
    page.goto("/contest")
    assert main.inner_text().count("Open: waiting for a decision") == 0

    # An expired session: a form shown before, sent after the cookie's last use was moved
    # back past the idle timeout (inside the encrypted cookie, as only the server can).
    page.goto(f"{red_light}/dispute")
    page.locator("#statement").fill("The camera was broken")
    cookie = next(c for c in context.cookies() if c["name"] == COOKIE)
    keys = [line.encode() for line in world.stack.session_secret_file.read_text().splitlines() if line]
    session = json.loads(fernet(keys).decrypt(cookie["value"].encode()))
    session[SEEN] = time.time() - 3600
    stale = fernet(keys).encrypt(json.dumps(session).encode()).decode()
    context.add_cookies([{**cookie, "value": stale}])  # type: ignore[typeddict-item]
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("h1")).to_have_text("Your session has ended")
    check_page(page, "session-ended-en")
    assert COOKIE not in {c["name"] for c in context.cookies()}  # cleared
    again = page.request.get("/credit", max_redirects=0)
    assert again.status == 303
    assert again.headers["location"].startswith("/signin")
    page.goto("/contest")
    assert "The camera was broken" not in page.content()


def test_a_resident_signs_in_reads_disputes_and_sees_the_decision_and_who_looked(
    world: World, context: BrowserContext, page: Page
) -> None:
    page.goto("/signin?next=/credit")
    check_page(page, "provider-sign-in")
    page.locator("input[name=account][value=resident]").check()
    page.locator("#password").fill("egret")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/credit$"))
    check_page(page, "credit-zh")
    expect(page.locator("h1")).to_have_text("我的信用")
    before = query_score(world, access_token(context, world))
    assert shown_score(page) == before
    expect(page.locator("header")).to_contain_text("Chen Jing")

    switch_language(page, "en")
    page.wait_for_url(re.compile(r"/credit$"))
    check_page(page, "credit-en")
    assert shown_score(page) == before
    for path in RESIDENT_PAGES[1:]:
        open_page(page, path, f"{path.strip('/')}-en")

    # An entry's full explanation: rule, legal basis, evidence, when it stops counting.
    fare = entry_with(page, "transport.metro_fare_evasion")
    entry_id = fare.rsplit("/", 1)[1]
    main = page.locator("main")
    expect(main).to_contain_text("Urban Rail Transit Operation Management Provisions")
    expect(main).to_contain_text("Lianban")
    check_page(page, "entry-en")

    # Dispute: the form, the error summary for an empty reason, the check step, confirm.
    page.get_by_role("link", name="Dispute this entry").click()
    check_page(page, "dispute-form-en")
    page.get_by_role("button", name="Continue").click()
    expect(page.locator(".error-summary")).to_contain_text("There is a problem")
    expect(page).to_have_title(re.compile("^Error: "))
    check_page(page, "dispute-empty-reason-en")
    page.locator(".error-summary a").first.click()  # the summary's link goes to the field
    assert focused(page)["id"] == "statement"
    page.locator("#statement").fill("I had a ticket")
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("h1")).to_have_text("Check your dispute")
    check_page(page, "dispute-check-en")
    page.get_by_role("button", name=re.compile("^File")).click()
    page.wait_for_url(re.compile(r"/contest$"))
    expect(main).to_contain_text("Your dispute has been filed")
    expect(main).to_contain_text("Open: waiting for a decision")
    check_page(page, "contest-pending-en")
    page.goto(fare)
    expect(main).to_contain_text("Disputed")

    review(world, entry_id)
    page.goto("/credit")
    after = query_score(world, access_token(context, world))
    assert after == before + 10  # the fare evasion's -10 withdrawn
    assert shown_score(page) == after
    page.goto("/contest")
    expect(main).to_contain_text("Decided: the entry was withdrawn")
    page.goto("/access")
    expect(main).to_contain_text("Credit office reviewer")
    expect(main).to_contain_text("Reviewing a dispute you filed")
    expect(main).to_contain_text("You reading your own data")
    check_page(page, "access-en")

    # The same pages in Chinese.
    switch_language(page, "zh_Hans")
    for path in RESIDENT_PAGES:
        open_page(page, path, f"{path.strip('/')}-zh")
    page.goto(fare)
    check_page(page, "entry-zh")
    assert page.problems == []  # type: ignore[attr-defined]


def test_every_main_flow_with_the_keyboard_alone(world: World, page: Page) -> None:
    page.goto("/")
    # Skip link first, then sign in with keys on the provider's form.
    assert tab_to(page, text="跳到主要内容", limit=1)
    tab_to(page, href="/language/en?next=/")
    page.keyboard.press("Enter")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    tab_to(page, text="Sign in")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_contain_text("Sign in")
    tab_to(page, element_id="account")  # the first account, the resident; Space chooses it
    page.keyboard.press("Space")
    assert page.locator("input[name=account][value=resident]").is_checked()
    tab_to(page, element_id="password")
    page.keyboard.type("egret")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/$|/credit$"))

    tab_to(page, text="My credit")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/credit$"))
    tab_to(page, text="My entries")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/entries$"))
    # The red light entry: Tab through the entry links to the one whose page is about it.
    red_light = entry_with(page, "traffic.red_light")
    page.goto("/entries")
    tab_to(page, href=red_light, limit=200)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(re.escape(red_light) + "$"))
    tab_to(page, text="Dispute this entry")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(re.escape(red_light) + "/dispute$"))
    tab_to(page, element_id="statement")
    page.keyboard.type("The camera was broken that day")
    tab_to(page, text="Continue")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Check your dispute")
    tab_to(page, text=re.sub(r"\s+", " ", page.get_by_role("button", name=re.compile("^File")).inner_text()))
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/contest$"))
    expect(page.locator("main")).to_contain_text("Your dispute has been filed")
    expect(page.locator("main")).to_contain_text("Open: waiting for a decision")

    # Back to Chinese, then sign out, all by keys.
    tab_to(page, text="中文")
    page.keyboard.press("Enter")
    expect(page.locator("html")).to_have_attribute("lang", "zh-Hans")
    tab_to(page, text="退出登录")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/signed-out(\?state=[^&]+)?$"))
    assert_accessible(page, "signed-out (keyboard)")


def test_every_page_is_usable_at_360_px(world: World) -> None:
    ctx = world.browser.new_context(base_url=world.stack.url, viewport=PHONE, locale="zh-Hans")
    try:
        page = ctx.new_page()
        for path in PUBLIC_PAGES:
            page.goto(path)
            assert_fits_width(page, f"{path} at 360 px")
        sign_in(page)
        for path in RESIDENT_PAGES:
            page.goto(path)
            assert_fits_width(page, f"{path} at 360 px")
            if path in ("/credit", "/entries", "/history"):
                assert_accessible(page, f"{path} at 360 px")
                screenshot(page, f"phone{path.replace('/', '-')}-zh")
        page.goto(entry_with(page, "transport.metro_fare_evasion"))
        assert_fits_width(page, "an entry at 360 px")
    finally:
        ctx.close()


def test_sign_out_ends_the_session_here_and_at_the_provider(world: World, page: Page) -> None:
    sign_in(page)
    switch_language(page, "en")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/signed-out(\?state=[^&]+)?$"))
    check_page(page, "signed-out-en")
    # Both sessions are over: the portal asks to sign in, and the provider asks for a password.
    page.goto("/credit")
    page.wait_for_url(re.compile(r"/authorize\?"))
    expect(page.locator("#password")).to_be_visible()


def test_the_accessibility_check_finds_what_it_must(page: Page) -> None:
    """axe-core really runs in these pages: an image without text and an unlabelled field
    in a page without a language fail it."""
    page.set_content("<html><head><title>t</title></head><body><img src='/x.png'><input></body></html>")
    with pytest.raises(AssertionError) as failed:
        assert_accessible(page, "a page made to fail")
    for rule in ("critical image-alt:", "critical label:", "serious html-has-lang:"):
        assert rule in str(failed.value)


def test_no_raw_subject_id_in_a_url_or_a_log_line(world: World, page: Page) -> None:
    """Last, so that it also covers every flow above: the portal's pages, links and
    downloads never put the resident's raw id in a URL, and neither the portal's log nor
    any service's does (the provider's is left out: an identity provider knows who
    signs in). The services' own privacy proof is tests/e2e/test_privacy.py."""
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    sign_in(page)
    for path in ("/credit", "/entries", "/history", "/benefits", "/contest", "/access", "/download"):
        page.goto(path)
        for href in page.locator("main a[href^='/']").evaluate_all(
            "as => as.map(a => a.getAttribute('href'))"
        ):
            urls.append(str(href))
    page.goto(entry_with(page, "transport.metro_fare_evasion"))
    assert len(urls) > 20
    needles = {ALICE.encode(), BOB.encode()}
    assert [u for u in urls if any(n.decode() in u for n in needles)] == []
    time.sleep(0.5)  # the processes write unbuffered; let the last lines land
    logs = [world.stack.log_path("portal"), *(world.cluster.log_path(s) for s in world.cluster.services)]
    assert world.stack.log_path("portal").stat().st_size > 0
    # scan_files finds a planted id (tests/e2e/test_privacy.py proves it).
    assert scan_files(logs, needles) == []
