"""kit.page_tokens: signed page tokens bound to the request they came from."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from kit.errors import InvalidArgument
from kit.page_tokens import PageTokens
from kit.settings import AuditSettings

BINDING = {"method": "ListEntries", "subject": "s-1"}


def refused(tokens: PageTokens, token: str, binding: Mapping[str, object] = BINDING) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        tokens.decode(token, bound_to=binding)
    (violation,) = caught.value.violations
    assert (violation.field, violation.reason) == ("page_token", "INVALID_PAGE_TOKEN")
    return caught.value


def test_a_token_gives_back_its_cursor() -> None:
    tokens = PageTokens(b"k" * 32)
    cursor = ["2026-01-02T03:04:05+00:00", "entry-7"]
    token = tokens.encode(cursor, bound_to=BINDING)
    assert tokens.decode(token, bound_to=dict(BINDING)) == cursor
    assert token.replace("-", "").replace("_", "").replace(".", "").isalnum()


def test_an_empty_token_is_the_first_page() -> None:
    assert PageTokens(b"k" * 32).decode("", bound_to=BINDING) is None


def test_a_token_of_another_query_is_refused() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode(5, bound_to=BINDING)
    refused(tokens, token, {"method": "ListEntries", "subject": "s-2"})
    refused(tokens, token, {"method": "ListScoreHistory", "subject": "s-1"})


def test_a_tampered_token_is_refused() -> None:
    tokens = PageTokens(b"k" * 32)
    version, body, mac = tokens.encode(5, bound_to=BINDING).split(".")
    forged = tokens.encode(6, bound_to=BINDING).split(".")[1]
    refused(tokens, f"{version}.{forged}.{mac}")
    refused(tokens, f"2.{body}.{mac}")


def test_a_token_under_another_key_is_refused() -> None:
    token = PageTokens(b"a" * 32).encode(5, bound_to=BINDING)
    refused(PageTokens(b"b" * 32), token)


@pytest.mark.parametrize("garbage", ["x", "1..", "1.!!!.***", "WzFd", "1.WzFd", "1.WzFd.AAAA"])
def test_garbage_is_refused(garbage: str) -> None:
    refused(PageTokens(b"k" * 32), garbage)


def test_replicas_with_the_same_audit_key_share_tokens() -> None:
    audit = AuditSettings(key_id="a2", keys={"a1": b"o" * 32, "a2": b"n" * 32})
    token = PageTokens.from_audit(audit).encode(5, bound_to=BINDING)
    assert PageTokens.from_audit(audit).decode(token, bound_to=BINDING) == 5
    refused(PageTokens(b"o" * 32), token)
    unkeyed = PageTokens.from_audit(AuditSettings()).encode(5, bound_to=BINDING)
    assert PageTokens.development().decode(unkeyed, bound_to=BINDING) == 5
