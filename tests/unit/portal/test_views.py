"""The view models say, in the reader's language, what the records mean."""

from __future__ import annotations

from datetime import timedelta

from kit import reasons
from services.portal import records as r
from services.portal.i18n import Localiser
from services.portal.views import access, benefits, credit, entries, errors, history, public, words
from tests.support.portal.samples import NOW, change, entry, explained, explanation


def test_my_credit_shows_the_tier_meaning_the_thresholds_and_the_path_to_the_next_tier(en: Localiser) -> None:
    view = credit.credit(en, explanation())
    assert (view.score, view.tier, view.policy_version) == ("1,000", "A", "2026.2")
    assert view.tier_meaning.startswith("Good")
    assert [(t.name, t.threshold, t.current) for t in view.tiers[:3]] == [
        ("AAA", "1,050 and above", False),
        ("AA", "1,030 to 1,049", False),
        ("A", "960 to 1,029", True),
    ]
    assert view.tiers[-1].threshold == "0 to 599"
    assert view.next_tier == "30 more points reach tier AA (1,030)."
    assert view.not_on_a_list
    civic = next(c for c in view.categories if c.name == "Civic life")
    assert (civic.points, civic.entries, civic.capped) == ("+10", "1 entry", "5 points withheld by the cap")
    room = {b.title: b.room for b in view.behaviours}
    assert room["Voluntary blood donation"].startswith("Can still add up to 40 points")
    assert room["Volunteer service"] == "No limit in this category"
    said = {b.title: b.description for b in view.behaviours}
    assert said["Voluntary blood donation"] == "Gave … ml."  # the template's {ml}: no event here
    assert view.projection[0].stops == "1 entry stops counting"


def test_my_credit_in_chinese_and_at_the_top_tier(zh: Localiser) -> None:
    view = credit.credit(zh, explanation(score=1060, tier="AAA", next_tier=None))
    assert view.next_tier == "您已处于最高等级。"
    assert "红名单" in view.tier_meaning
    assert view.tiers[0].threshold == "1,050 及以上"


def test_list_membership_keeps_the_services_reasons_and_entries(en: Localiser) -> None:
    view = credit.credit(en, explanation(lists=(r.ListMembership("black", ("tier D",), ("e9",)),)))
    assert not view.not_on_a_list
    assert [(m.name, m.reasons, m.entry_ids) for m in view.lists] == [("Black list", ("tier D",), ("e9",))]


def test_an_entry_row_says_when_it_stops_counting(en: Localiser) -> None:
    row = entries.row(en, entry(), NOW)
    assert (row.points, row.category, row.severity, row.status) == (
        "\u221210",
        "Transport",
        "General",
        "Counts",
    )
    assert row.until == "Counts until May 2, 2027"
    expired = entries.row(en, entry(visible_until=NOW - timedelta(days=1), status="expired"), NOW)
    assert expired.until == "Stopped counting on May 31, 2026"
    assert entries.row(en, entry(status="reversed"), NOW).until == "Reversed"


def test_an_entry_may_be_disputed_unless_it_ended_or_is_already_disputed(en: Localiser) -> None:
    assert entries.detail(en, entry(), None, NOW).can_dispute
    ended = entries.detail(en, entry(status="reversed"), None, NOW)
    assert not ended.can_dispute
    assert "no longer counts" in ended.cannot_dispute_why
    open_dispute = r.Dispute("7", "e1", "wrong", NOW, NOW + timedelta(days=20), "open")
    disputed = entries.detail(en, entry(status="disputed", dispute=open_dispute), None, NOW)
    assert not disputed.can_dispute
    assert "already disputed" in disputed.cannot_dispute_why
    assert disputed.dispute is not None
    assert disputed.dispute.deadline == "June 21, 2026"


def test_a_repair_too_early_names_the_earliest_date(en: Localiser, zh: Localiser) -> None:
    e = entry()
    early = entries.detail(en, e, explained(e, possible=NOW + timedelta(days=60)), NOW)
    assert not early.can_repair
    assert early.cannot_repair_why == "Too early: you can apply for repair of this entry from July 31, 2026."
    assert (
        "2026年7月31日"
        in entries.detail(zh, e, explained(e, possible=NOW + timedelta(days=60)), NOW).cannot_repair_why
    )
    assert entries.detail(en, e, explained(e, possible=NOW - timedelta(days=1)), NOW).can_repair


def test_a_repair_is_refused_for_positive_or_not_counting_or_pending_entries(en: Localiser) -> None:
    positive = entry(points=10)
    assert "take points away" in entries.detail(en, positive, explained(positive), NOW).cannot_repair_why
    e = entry()
    assert "does not count" in entries.detail(en, e, explained(e, counting=False), NOW).cannot_repair_why
    pending = entry(repair=r.Repair("3", "e1", "paid", "", NOW, NOW + timedelta(days=3), "pending"))
    assert "already applied" in entries.detail(en, pending, explained(pending), NOW).cannot_repair_why


def test_a_dispute_statement_must_be_given_and_not_too_long(en: Localiser) -> None:
    assert [e.field for e in entries.check_statement(en, "   ")] == ["statement"]
    too_long = entries.check_statement(en, "x" * 4001)
    assert too_long[0].message == "Your statement is 4,001 characters long; it can be at most 4,000."
    assert entries.check_statement(en, "x" * 4000) == []


def test_a_repair_needs_evidence_and_a_web_link_if_any(en: Localiser) -> None:
    assert [e.field for e in entries.check_repair(en, "", "javascript:alert(1)")] == [
        "evidence",
        "evidence_uri",
    ]
    assert entries.check_repair(en, "Paid the fine", "https://example.org/receipt") == []


def test_the_history_chart_holds_both_timelines_until_now_and_the_tiers_around_them(en: Localiser) -> None:
    known = (change(1, 990, 1000, "correction"), change(10, 1000, None))
    corrected = (change(12, 1000, None),)
    view = history.history(en, known, corrected, NOW, explanation().tiers)
    chart = view.chart
    assert chart is not None
    # Oldest first, one point per change, the last score held to the end of this hour (so
    # the same history draws the same chart for an hour: drawn charts are cached).
    assert [score for _, score in chart.known.points] == [1000, 990, 990]
    end_of_hour = NOW.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    assert chart.known.points[-1][0] == end_of_hour == chart.end
    later = history.history(en, known, corrected, NOW + timedelta(minutes=59), explanation().tiers)
    assert later.chart == chart  # NOW is on the hour: 59 minutes later, the same chart
    assert chart.corrected is not None  # a different line: the correction never counted there
    assert [score for _, score in chart.corrected.points] == [1000, 1000]
    # The band the score is in (A from 960) and the tier above it (AA from 1,030).
    assert [(t.score, t.label) for t in chart.thresholds] == [(960, "A from 960"), (1030, "AA from 1,030")]
    assert chart.summary == (
        "Your score went down from 1,000 on May 22, 2026 to 990 on June 1, 2026 (lowest 990, highest 1,000)."
    )
    assert (chart.title, chart.score_label, chart.known.label) == (
        "Your score over time",
        "Score",
        "As known at the time",
    )
    assert view.known[0].cause == "Correction by the source"
    assert view.known[0].entry_links == (("stopped counting", "e1"),)
    assert view.differs


def test_the_history_chart_in_chinese_and_without_a_correction(zh: Localiser) -> None:
    known = (change(3, 1010, 1000), change(20, 1000, None))
    view = history.history(zh, known, known, NOW, explanation().tiers)
    assert view.chart is not None
    assert view.chart.corrected is None  # no correction changed a score: one line
    assert view.chart.summary.startswith("您的分数从 2026年5月12日 的 1,000 上升到 2026年6月1日 的 1,010")
    assert view.chart.thresholds[-1].label == "AA 级 1,030 分起"
    assert not view.differs


def test_a_short_history_is_drawn_over_a_week(en: Localiser) -> None:
    view = history.history(en, (change(1, 1000, None),), (), NOW)
    assert view.chart is not None
    assert view.chart.end - view.chart.start == history.SHORTEST_SPAN
    assert view.chart.summary.startswith("Your score is 1,000 on June 1, 2026, as it was on May 31, 2026")
    assert view.chart.thresholds == ()  # no tiers known (Explain refused): no lines


def test_the_thresholds_shown_are_the_band_of_the_scores_and_the_next_tier_up() -> None:
    tiers = explanation().tiers  # 0, 600, 850, 960, 1030, 1050
    assert history.thresholds(tiers, 990, 1000) == (960, 1030)
    assert history.thresholds(tiers, 300, 640) == (600, 850)  # the lowest tier's 0 is no threshold
    assert history.thresholds(tiers, 1060, 1200) == (1050,)
    assert history.thresholds((), 990, 1000) == ()


def test_no_history_means_no_chart(en: Localiser) -> None:
    view = history.history(en, (), (), NOW)
    assert view.chart is None
    assert view.known == ()


def test_benefit_rows_say_yes_or_no_with_the_deciding_entries(en: Localiser) -> None:
    bike = r.Benefit(
        "bike.deposit_free", "Rent a bike", "Bike share", ("transport",), False, ("person",), "tier A"
    )
    result = r.Eligibility(
        "bike.deposit_free",
        False,
        (r.EligibilityReason("no active negative transport entry", False, "e1 counts", ("e1",), ("e1",)),),
        ("transport",),
        990,
        "A",
        (),
        NOW,
        "2026.2",
    )
    row = benefits.benefit_row(en, bike, result)
    assert (row.eligible, row.verdict, row.considers) == (False, "Not available to you now", "Transport")
    assert row.reasons[0].disputed_entry_ids == ("e1",)
    org_only = r.Benefit("procurement", "Bid", "Office", (), True, ("organization",), "not black")
    assert benefits.for_kind((bike, org_only), "person") == (bike,)


def test_the_access_log_names_purposes_and_reads_in_words(en: Localiser, zh: Localiser) -> None:
    record = r.AccessRecord(NOW, "rev-1", "reviewer", "dispute-review", "read:GetEntry", "case 7")
    row = access.access_row(en, record)
    assert (row.who, row.role, row.purpose, row.what, row.note) == (
        "rev-1",
        "Credit office reviewer",
        "Reviewing a dispute you filed",
        "One of your entries",
        "case 7",
    )
    own = access.access_row(zh, r.AccessRecord(NOW, "k", "subject", "own-record", "GetScore", ""))
    assert (own.who, own.purpose) == ("您本人", "您本人查询自己的数据")
    assert words.purpose(en, "something-new") == "something-new"


def test_service_refusals_become_words(en: Localiser) -> None:
    assert errors.error_view(en, "NOT_FOUND", "no ledger entry 'x'").status == 404
    assert errors.error_view(en, "PERMISSION_DENIED", "").title == "Not allowed"
    assert errors.error_view(en, "UNAVAILABLE", "").status == 503
    refused = errors.error_view(en, "FAILED_PRECONDITION", "entry 'e1' already has an open dispute")
    assert (refused.status, refused.service_says) == (409, "entry 'e1' already has an open dispute")
    invalid = errors.error_view(
        en, "INVALID_ARGUMENT", "bad", (("statement", "TOO_LONG", "must be at most 4,000"),)
    )
    assert [(v.field, v.message) for v in invalid.violations] == [
        ("statement", "Your statement is too long.")
    ]
    unknown = errors.error_view(en, "INVALID_ARGUMENT", "bad", (("colour", "ODD", "is odd"),))
    assert unknown.violations[0].message == "colour: is odd"
    internal = errors.error_view(en, "INTERNAL", "Traceback (most recent call last)")
    assert internal.status == 500
    assert "Traceback" not in internal.message + internal.service_says


def test_public_rules_are_grouped_by_category_with_how_long_they_count(en: Localiser) -> None:
    rule_set = r.PublishedRuleSet(
        "egret-sample",
        2,
        NOW,
        (
            r.PublishedRule(
                "a",
                "Fare evasion",
                "Passed the gate at {station} without paying {amount:.2f} yuan ({count!s} times).",
                ("x",),
                ("person",),
                "-10",
                "transport",
                "general",
                "law",
            ),
            r.PublishedRule(
                "b", "Volunteering", "d", ("y",), ("person",), "2 * (hours // 10)", "civic", "positive", "l"
            ),
        ),
    )
    policy = r.PublishedPolicy(
        "2026.2",
        NOW,
        20,
        (("minor", 0), ("general", 90)),
        3,
        (
            r.KindPolicy(
                "person",
                1000,
                0,
                2000,
                explanation().tiers,
                (("general", 365), ("positive", 730)),
                365,
                50,
                ("AAA",),
                ("D",),
                True,
                False,
            ),
        ),
    )
    groups = public.rule_groups(en, rule_set, policy)
    assert [g.category for g in groups] == ["Civic life", "Transport"]
    fare = groups[1].rules[0]
    assert (fare.points, fare.positive, fare.counts_for) == ("\u221210", False, "365 days")
    # A rule's template said of any such event: its quoted attributes are not shown raw.
    assert fare.description == "Passed the gate at … without paying … yuan (… times)."
    assert groups[0].rules[0].points == "computed: 2 * (hours // 10)"
    kinds = public.kind_tiers(en, policy)
    assert kinds[0].black == "Tier D; or any counting entry of a black-list rule"
    due = public.due_process(en, policy)
    assert (due.dispute_days, due.repair_periods[0], due.decision_days) == ("20", ("Minor", "at once"), "3")


def test_every_refusal_reason_a_service_gives_is_worded_in_both_languages(
    en: Localiser, zh: Localiser
) -> None:
    for language in (en, zh):
        for reason in reasons.ALL:
            view = errors.error_view(language, "FAILED_PRECONDITION", "the service's English", reason=reason)
            assert view.status == 409
            assert view.service_says == "", reason
            assert view.message not in ("", "the service's English"), reason
    early = errors.error_view(
        en,
        "FAILED_PRECONDITION",
        "a repair of this general entry may be applied for from 2026-07-31",
        reason="REPAIR_TOO_EARLY",
        metadata={"earliest_date": "2026-07-31", "earliest_at": "2026-07-31T08:00:00+00:00"},
    )
    assert early.message == "Too early: you can apply for repair of this entry from July 31, 2026."
    zh_early = errors.error_view(
        zh, "FAILED_PRECONDITION", "", reason="REPAIR_TOO_EARLY", metadata={"earliest_date": "2026-07-31"}
    )
    assert "2026年7月31日" in zh_early.message
    repaired = errors.error_view(
        en, "FAILED_PRECONDITION", "", reason="ENTRY_NOT_DISPUTABLE", metadata={"status": "repaired"}
    )
    assert repaired.message.startswith("This entry has been repaired")
    # A reason this portal does not know yet: the service's own words, under the lead.
    newer = errors.error_view(en, "FAILED_PRECONDITION", "something new", reason="A_NEWER_REASON")
    assert (newer.message, newer.service_says) == (
        "The credit service refused it, and gave this reason:",
        "something new",
    )


def test_the_consent_in_force_in_words(en: Localiser, zh: Localiser) -> None:
    never = entries.consent_view(en, r.ConsentState(None, False, True))
    assert (never.state, never.since) == ("You have not given or withdrawn consent.", "")
    assert not never.granted
    assert never.meaning.startswith("The city's policy requires consent: without it")
    given = entries.consent_view(en, r.ConsentState(r.Consent(True, NOW, NOW), True, True))
    assert given.state == "You have given consent."
    assert given.since.startswith("In force since ")
    assert "yours is in force" in given.meaning
    optional = entries.consent_view(zh, r.ConsentState(r.Consent(False, NOW, NOW), False, False))
    assert optional.state == "您已撤回授权。"
    assert optional.meaning.startswith("本市政策目前不要求授权")
