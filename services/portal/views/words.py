"""The words for the services' codes: statuses, severities, causes, roles, categories,
purposes and tiers, in the reader's language."""

from __future__ import annotations

import re

from services.portal.i18n import Localiser

# A quoted event attribute in a rule's template: {station}, {amount:.2f}, {count}.
_QUOTED = re.compile(r"\{\w+(?:![rsa])?(?::[^{}]*)?\}")


def general(template: str) -> str:
    """A rule's description as a statement about any such event: the attributes its
    template quotes ("... at {station} ... {amount:.2f} yuan") become "…", where an
    entry's explanation shows the event's own values."""
    return _QUOTED.sub("…", template)


def status(t: Localiser, code: str) -> str:
    return {
        "active": t.gettext("Counts"),
        "disputed": t.gettext("Disputed"),
        "reversed": t.gettext("Reversed"),
        "repaired": t.gettext("Repaired"),
        "expired": t.gettext("Expired"),
    }.get(code, code)


def severity(t: Localiser, code: str) -> str:
    return {
        "positive": t.gettext("Positive"),
        "minor": t.gettext("Minor"),
        "general": t.gettext("General"),
        "serious": t.gettext("Serious"),
    }.get(code, code)


# The categories the city's rules score in (config/rulesets), as category() words them.
CATEGORIES = ("transport", "traffic", "civic", "finance", "legal", "commerce", "public_order")


def category(t: Localiser, code: str) -> str:
    return {
        "transport": t.gettext("Transport"),
        "traffic": t.gettext("Traffic"),
        "civic": t.gettext("Civic life"),
        "finance": t.gettext("Finance"),
        "legal": t.gettext("Legal"),
        "commerce": t.gettext("Commerce"),
        "public_order": t.gettext("Public order"),
    }.get(code, code)


def cause(t: Localiser, code: str) -> str:
    return {
        "entries": t.gettext("New entries"),
        "expiry": t.gettext("Entries stopped counting"),
        "policy": t.gettext("New score policy"),
        "correction": t.gettext("Correction by the source"),
        "dispute": t.gettext("Dispute"),
        "repair": t.gettext("Credit repair"),
    }.get(code, code)


def role(t: Localiser, code: str) -> str:
    return {
        "subject": t.gettext("You"),
        "reviewer": t.gettext("Credit office reviewer"),
        "auditor": t.gettext("Auditor"),
        "admin": t.gettext("Administrator"),
        "benefit_provider": t.gettext("Benefit provider"),
        "department": t.gettext("Government department"),
        "service": t.gettext("Egret service"),
    }.get(code, code)


def purpose(t: Localiser, code: str) -> str:
    """A purpose code of config/purposes.yaml, in words."""
    if not code:
        return t.gettext("None stated")
    return {
        "eligibility-check": t.gettext("Checking eligibility for a benefit or service you applied for"),
        "dispute-review": t.gettext("Reviewing a dispute you filed"),
        "repair-review": t.gettext("Reviewing a credit repair application"),
        "subject-request": t.gettext("Answering your own request (at a counter, by letter or by phone)"),
        "audit": t.gettext("Auditing scores, decisions or the access log"),
        "operations": t.gettext("Operating the system: investigating an incident"),
        "rule-backtest": t.gettext("Testing a candidate rule set on past data"),
        "own-record": t.gettext("You reading your own data"),
    }.get(code, code)


def read_method(t: Localiser, method: str) -> str:
    return {
        "GetScore": t.gettext("Your score"),
        "BatchGetScores": t.gettext("Your score, in a batch"),
        "ListScoreHistory": t.gettext("Your score history"),
        "CheckEligibility": t.gettext("Your eligibility for a benefit"),
        "ListEntries": t.gettext("Your entries"),
        "GetEntry": t.gettext("One of your entries"),
        "Explain": t.gettext("The explanation of your score"),
        "ListDisputes": t.gettext("Your disputes"),
        "ListRepairApplications": t.gettext("Your repair applications"),
        "ListAccessLog": t.gettext("This list of who looked"),
    }.get(method.removeprefix("read:"), method)


def tier_meaning(t: Localiser, tier: str) -> str:
    return {
        "AAA": t.gettext("Excellent: the highest tier; you are on the red list if no negative entry counts"),
        "AA": t.gettext("Very good: unlocks discounts and priority services"),
        "A": t.gettext("Good: unlocks deposit-free services"),
        "B": t.gettext("Fair: the usual services, without extra benefits"),
        "C": t.gettext("Poor: some benefits are not available"),
        "D": t.gettext("Very poor: you are on the black list"),
    }.get(tier, t.gettext("A tier of the city's score policy"))


def list_name(t: Localiser, name: str) -> str:
    return {"red": t.gettext("Red list"), "black": t.gettext("Black list")}.get(name, name)


def kind(t: Localiser, code: str) -> str:
    return {"person": t.gettext("Residents"), "organization": t.gettext("Organisations")}.get(code, code)


def dispute_status(t: Localiser, code: str) -> str:
    return {
        "open": t.gettext("Open: waiting for a decision"),
        "upheld": t.gettext("Decided: the entry stands"),
        "overturned": t.gettext("Decided: the entry was withdrawn"),
    }.get(code, code)


def repair_status(t: Localiser, code: str) -> str:
    return {
        "pending": t.gettext("Pending: waiting for a decision"),
        "approved": t.gettext("Approved: the entry no longer counts"),
        "rejected": t.gettext("Rejected"),
    }.get(code, code)
