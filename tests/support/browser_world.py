"""The browser tests' world: the four services, the local OpenID provider and the portal as
processes (devtools.portal_stack) with Debian's Chromium, and the moves every browser test makes on
the portal's pages (the fixtures that build the world are in tests/browser/conftest.py)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from playwright.sync_api import Browser, Page, expect

from devtools.cluster import Cluster
from devtools.portal_stack import PortalStack
from tests.support.browser import check_page

T = TypeVar("T")
ENTRY_LINK = re.compile(r"^/entries/[0-9a-f]{32}$")


@dataclass
class World:
    cluster: Cluster
    stack: PortalStack
    browser: Browser


def off_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run gRPC calls on a thread of their own: Playwright's sync API owns this thread's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def open_page(page: Page, path: str, name: str, *, status: int = 200) -> None:
    response = page.goto(path)
    assert response is not None
    assert response.status == status, f"{path}: {response.status}"
    check_page(page, name)


def sign_in(page: Page, account: str = "resident", *, next_path: str = "/credit") -> None:
    """Through the provider's real sign-in form, as a person would, with the mouse."""
    page.goto(f"/signin?next={next_path}")
    expect(page.locator("h1")).to_contain_text("Sign in")
    page.locator(f"input[name=account][value={account}]").check()
    page.locator("#password").fill("egret")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(next_path) + "$"))


def switch_language(page: Page, to: str) -> None:
    name = {"en": "English", "zh_Hans": "中文"}[to]
    page.locator("nav.language").get_by_role("link", name=name).click()
    expect(page.locator("html")).to_have_attribute("lang", "en" if to == "en" else "zh-Hans")


def shown_score(page: Page) -> int:
    return int(page.locator("dd.score").inner_text().replace(",", ""))


def entry_with(page: Page, text: str) -> str:
    """The path of the resident's entry whose page mentions `text`."""
    page.goto("/entries")
    links = page.locator("main a[href^='/entries/']")
    paths = [
        h for h in links.evaluate_all("as => as.map(a => a.getAttribute('href'))") if ENTRY_LINK.match(h)
    ]
    for path in paths:
        page.goto(path)
        if text in page.locator("main").inner_text():
            return str(path)
    raise AssertionError(f"no entry mentions {text!r}")
