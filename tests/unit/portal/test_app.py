"""The portal application end to end in process, with a fake backend: pages, sign-in
guard, CSRF, confirmation steps, refusals in words, security headers and privacy."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from services.portal import records as r
from services.portal.backend import ServiceError
from services.portal.sessions import COOKIE, EncryptedSessionMiddleware
from services.portal.settings import PortalSettings
from tests.support.portal.fakes import RAW_ID, SECRET, FakeBackend, csrf_of, session_cookie, signed_in
from tests.support.portal.samples import NOW, change

PERSONAL_PAGES = (
    "/credit",
    "/entries",
    "/entries/e1",
    "/history",
    "/history/chart.svg",
    "/benefits",
    "/contest",
    "/access",
    "/download",
)


def test_public_pages_work_without_sign_in_and_carry_a_strict_csp(client: TestClient) -> None:
    for path in ("/", "/rules", "/tiers", "/catalogue", "/how-it-works"):
        response = client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "unsafe-inline" not in csp
        assert "default-src 'none'" in csp
        assert response.headers["cache-control"] == "no-store"
        # No script and no inline style anywhere: the CSP would block them.
        assert not re.search(r"<script|<style|\sstyle=|\son\w+=", response.text), path
    assert 'lang="zh-Hans"' in client.get("/").text  # the city's default language
    assert "信用等级及分数线" in client.get("/tiers").text
    # A public read the services refuse becomes words, not an error page.
    assert "cannot be read from the credit services" in client.get("/language/en?next=/rules").text


def test_the_language_switch_is_remembered_and_stays_on_the_page(client: TestClient) -> None:
    response = client.get("/language/en?next=/tiers", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/tiers")
    assert "Tiers and their thresholds" in client.get("/tiers").text
    assert client.get("/language/en?next=//evil.example", follow_redirects=False).headers["location"] == "/"
    assert client.get("/language/fr").status_code == 404


def test_personal_pages_send_a_visitor_to_sign_in(client: TestClient, backend: FakeBackend) -> None:
    for path in PERSONAL_PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/signin?next="), path
    assert backend.calls == []


def test_signed_in_pages_render_the_persons_data(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    client.get("/language/en")
    credit = client.get("/credit")
    assert credit.status_code == 200
    assert "30 more points reach tier AA" in credit.text
    assert "Signed in as Alice" in credit.text
    entries = client.get("/entries")
    assert "/entries/e1" in entries.text
    assert "/entries?page=next-token" in entries.text
    detail = client.get("/entries/e1")
    assert "Dispute this entry" in detail.text
    assert "Too early" in detail.text
    assert client.get("/history").text.count("Your score has no history yet.") == 1
    assert "You can use this benefit" in client.get("/benefits").text
    assert "Reviewing a dispute you filed" in client.get("/access").text
    for path in ("/credit", "/entries", "/entries/e1", "/benefits", "/access", "/contest", "/download"):
        assert client.get(path).headers["cache-control"] == "no-store"


def test_the_history_page_embeds_its_chart_as_an_image_with_the_tables_as_its_text(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.changes = (change(2, 1010, 1000), change(30, 1000, None))
    signed_in(client)
    client.get("/language/en")
    page = client.get("/history")
    assert page.status_code == 200
    image = re.search(r'<img class="chart-image" src="([^"]+)"[^>]* alt="([^"]+)"', page.text)
    assert image is not None
    assert image.group(1) == "/history/chart.svg?lang=en"
    assert image.group(2).startswith("Your score went up from 1,000 on May 2, 2026 to 1,010 on June 1, 2026")
    assert "<svg" not in page.text  # drawn as its own resource, under the page's strict CSP
    assert "Every change, as known at the time" in page.text
    assert "unsafe-inline" not in page.headers["content-security-policy"]


def test_the_history_chart_is_an_svg_image_of_the_persons_own_history(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.changes = (change(2, 1010, 1000), change(30, 1000, None))
    signed_in(client)
    response = client.get("/history/chart.svg?lang=en")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    # Its own CSP: no script, nothing loaded, inline styles only; never cached.
    assert response.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
    )
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "As known at the time" in response.text
    assert RAW_ID not in response.text
    assert ("history", (False,)) in backend.calls
    assert ("history", (True,)) in backend.calls
    # The language the page asked for; the cookie's (the default, Chinese) without one.
    assert "您的分数变化" in client.get("/history/chart.svg").text
    assert "您的分数变化" in client.get("/history/chart.svg?lang=fr").text


def test_no_history_means_no_chart_to_fetch(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    assert client.get("/history/chart.svg?lang=en").status_code == 404
    assert "chart.svg" not in client.get("/history").text


def test_an_entry_that_is_not_the_persons_is_not_found_in_words(client: TestClient) -> None:
    signed_in(client)
    client.get("/language/en")
    response = client.get("/entries/" + "f" * 64)
    assert response.status_code == 404
    assert "We could not find this among your data" in response.text
    assert client.get("/entries/<script>").status_code == 404


def test_a_dispute_is_checked_confirmed_then_filed(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    client.get("/language/en")
    form = client.get("/entries/e1/dispute")
    assert "within 20 days" in form.text
    token = csrf_of(form.text)
    empty = client.post("/entries/e1/dispute", data={"csrf_token": token, "statement": "  "})
    assert empty.status_code == 400
    assert "There is a problem" in empty.text
    assert 'href="#statement"' in empty.text
    too_long = client.post("/entries/e1/dispute", data={"csrf_token": token, "statement": "x" * 4001})
    assert too_long.status_code == 400
    assert "4,001 characters" in too_long.text
    confirm = client.post("/entries/e1/dispute", data={"csrf_token": token, "statement": "I had a ticket"})
    assert "Check your dispute" in confirm.text
    assert "I had a ticket" in confirm.text
    assert not [c for c in backend.calls if c[0] == "file_dispute"]
    done = client.post(
        "/entries/e1/dispute",
        data={"csrf_token": token, "statement": "I had a ticket", "confirm": "yes"},
        follow_redirects=False,
    )
    assert (done.status_code, done.headers["location"]) == (303, "/contest")
    assert ("file_dispute", ("e1", "I had a ticket")) in backend.calls
    contest = client.get("/contest")
    assert "Your dispute has been filed" in contest.text
    assert "June 21, 2026" in contest.text
    assert "Your dispute has been filed" not in client.get("/contest").text  # shown once


def test_a_form_without_the_sessions_csrf_token_does_nothing(
    client: TestClient, backend: FakeBackend
) -> None:
    signed_in(client)
    for data in ({}, {"csrf_token": "forged"}):
        response = client.post("/entries/e1/dispute", data={**data, "statement": "x", "confirm": "yes"})
        assert response.status_code == 403
    assert client.post("/consent", data={"granted": "no", "confirm": "yes"}).status_code == 403
    assert client.post("/signout", data={}).status_code == 403
    assert not [c for c in backend.calls if c[0] in ("file_dispute", "set_consent", "entry")]


def test_the_services_refusal_is_shown_on_the_form(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    client.get("/language/en")
    token = csrf_of(client.get("/entries/e1/dispute").text)
    backend.fail["file_dispute"] = ServiceError(
        "FAILED_PRECONDITION", "entry 'e1' already has an open dispute"
    )
    refused = client.post(
        "/entries/e1/dispute", data={"csrf_token": token, "statement": "again", "confirm": "yes"}
    )
    assert refused.status_code == 409
    assert "The credit service refused it" in refused.text
    assert "already has an open dispute" in refused.text
    assert "Traceback" not in refused.text


def test_a_repair_applied_for_too_early_says_from_when(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    client.get("/language/en")
    form = client.get("/entries/e1/repair")
    assert "Too early: you can apply for repair of this entry from July 31, 2026." in form.text
    token = csrf_of(form.text)
    confirm = client.post(
        "/entries/e1/repair", data={"csrf_token": token, "evidence": "Paid", "evidence_uri": ""}
    )
    assert "Check your application" in confirm.text
    done = client.post(
        "/entries/e1/repair",
        data={"csrf_token": token, "evidence": "Paid", "evidence_uri": "", "confirm": "yes"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert "Your repair application has been sent" in client.get("/contest").text


def test_consent_has_a_confirmation_step(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    client.get("/language/en")
    token = csrf_of(client.get("/contest").text)
    ask = client.post("/consent", data={"csrf_token": token, "granted": "no"})
    assert "Withdraw your consent?" in ask.text
    assert not [c for c in backend.calls if c[0] == "set_consent"]
    client.post(
        "/consent", data={"csrf_token": token, "granted": "no", "confirm": "yes"}, follow_redirects=False
    )
    assert ("set_consent", (False,)) in backend.calls
    contest = client.get("/contest").text
    assert "Consent withdrawn" in contest
    assert "You have withdrawn consent." in contest
    assert "without it, no score is served about you" in contest


def test_the_contest_page_shows_the_consent_in_force(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client)
    client.get("/language/en")
    never = client.get("/contest").text
    assert "You have not given or withdrawn consent." in never
    backend.consent_state = r.ConsentState(r.Consent(True, NOW, NOW), True, True)
    given = client.get("/contest").text
    assert "You have given consent." in given
    assert "yours is in force: your score is served" in given
    client.get("/language/zh_Hans")
    assert "您已授权。" in client.get("/contest").text
    client.get("/language/en")
    backend.fail["consent"] = ServiceError("UNAVAILABLE", "connection refused")
    assert "The credit service cannot answer right now" in client.get("/contest").text


def test_a_refusal_with_a_known_reason_is_worded_by_the_portal_in_the_readers_language(
    client: TestClient, backend: FakeBackend
) -> None:
    signed_in(client)
    client.get("/language/en")
    token = csrf_of(client.get("/entries/e1/dispute").text)
    backend.fail["file_dispute"] = ServiceError(
        "FAILED_PRECONDITION", "entry 'e1' already has an open dispute", reason="DISPUTE_ALREADY_OPEN"
    )
    form = {"csrf_token": token, "statement": "again", "confirm": "yes"}
    refused = client.post("/entries/e1/dispute", data=form)
    assert refused.status_code == 409
    assert "This entry already has an open dispute. You can follow it on your contest page." in refused.text
    assert "entry &#39;e1&#39;" not in refused.text  # the service's English message is not needed
    client.get("/language/zh_Hans")
    assert "该记录已有一项未决异议" in client.post("/entries/e1/dispute", data=form).text


def test_unavailable_services_and_expired_sessions_get_friendly_pages(
    client: TestClient, backend: FakeBackend
) -> None:
    signed_in(client)
    client.get("/language/en")
    backend.fail["explain"] = ServiceError("UNAVAILABLE", "connection refused")
    down = client.get("/credit")
    assert down.status_code == 503
    assert "cannot answer right now" in down.text
    assert "connection refused" not in down.text
    backend.fail["explain"] = ServiceError("UNAUTHENTICATED", "token expired")
    ended = client.get("/credit")
    assert ended.status_code == 401
    assert "Your session has ended" in ended.text
    client.cookies.set(COOKIE, session_cookie(expires_in=-1))
    assert client.get("/credit", follow_redirects=False).status_code == 303  # token past its expiry


def test_an_idle_session_says_it_ended(client: TestClient, settings: PortalSettings) -> None:
    sessions = EncryptedSessionMiddleware(
        lambda *a: None,  # type: ignore[arg-type]
        secrets=(SECRET,),
        idle_s=settings.session_idle_s,
        absolute_s=settings.session_absolute_s,
        secure=False,
        clock=lambda: time.time() - settings.session_idle_s - 5,
    )
    client.cookies.set(COOKIE, sessions.dump({"access_token": "x", "role": "subject", "expires_at": 2e9}))
    response = client.get("/credit", follow_redirects=False)
    assert response.status_code == 401


def test_staff_accounts_are_sent_to_the_staff_console(client: TestClient, backend: FakeBackend) -> None:
    signed_in(client, role="reviewer")
    response = client.get("/credit")
    assert response.status_code == 403
    assert "工作人员" in response.text
    assert backend.calls == []


def test_downloads_hold_the_data_without_any_identifier(client: TestClient) -> None:
    signed_in(client)
    data = client.get("/download/my-credit-data.json")
    assert data.headers["content-disposition"] == 'attachment; filename="my-credit-data.json"'
    doc = json.loads(data.text)
    assert doc["score"]["score"] == 1000
    assert len(doc["entries"]) == 2
    assert RAW_ID not in data.text
    csv = client.get("/download/entries.csv")
    assert csv.text.startswith("\ufeffentry_id,")
    assert "e1" in csv.text
    assert client.get("/download/passwords.csv").status_code == 404


def test_no_raw_subject_id_in_any_log_line_or_url(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    signed_in(client)
    for path in (*PERSONAL_PAGES, "/download/my-credit-data.json"):
        response = client.get(path)
        assert RAW_ID not in str(response.url)
        assert RAW_ID not in response.text
    captured = capsys.readouterr()
    assert RAW_ID not in captured.out + captured.err


def test_the_history_chart_takes_its_tier_lines_from_the_published_policy_without_an_explain(
    client: TestClient, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def change(days: int, score: int) -> r.ScoreChange:
        return r.ScoreChange(
            NOW - timedelta(days=days), "entries", None, score, "", "A", (), (), (), (), (), (), "2026.2", ""
        )

    async def history(caller: Any, *, as_corrected: bool) -> tuple[r.ScoreChange, ...]:
        backend._record("history", as_corrected)
        return (change(10, 1040), change(40, 1000))

    tiers = (r.Tier("AA", 1030), r.Tier("A", 960))
    person = r.KindPolicy("person", 1000, 0, 1100, tiers, (), 365, 30, (), (), False, False)
    policy = r.PublishedPolicy("2026.2", NOW, 20, (("minor", 0),), 3, (person,))

    async def published() -> r.PublishedPolicy:
        backend._record("policy")
        return policy

    monkeypatch.setattr(backend, "history", history)
    monkeypatch.setattr(backend, "policy", published)
    signed_in(client)
    assert client.get("/history").status_code == 200
    assert "policy" not in [name for name, _ in backend.calls]  # the page draws no tier lines
    chart = client.get("/history/chart.svg?lang=en")
    assert chart.status_code == 200
    assert ">AA from 1,030<" in chart.text
    assert "explain" not in [name for name, _ in backend.calls]
