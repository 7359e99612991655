"""Fixtures of the browser tests: one world per module (tests.support.browser_world), a fresh
browser context and page per test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from devtools.cluster import Cluster
from devtools.portal_stack import PortalStack
from tests.support.browser import CHROMIUM, require_browser_tools
from tests.support.browser_world import World
from tests.support.scenario import ALICE, submit_all


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_browser_tools()
    cluster = Cluster(
        tmp_path_factory.mktemp("browser") / "cluster",
        env={"EGRET_RELAY_POLL_SECONDS": "0.05", "EGRET_RELAY_BACKOFF_MAX_SECONDS": "1"},
    )
    stack = PortalStack(cluster, resident_id=ALICE)
    with cluster, stack:
        asyncio.run(submit_all(cluster))
        cluster.wait_drained(timeout_s=60)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
            try:
                yield World(cluster, stack, browser)
            finally:
                browser.close()


@pytest.fixture
def context(world: World) -> Iterator[BrowserContext]:
    # No bypass_csp: the portal's Content-Security-Policy is in force (axe runs over DevTools).
    ctx = world.browser.new_context(base_url=world.stack.url, locale="zh-Hans")
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    page = context.new_page()
    problems: list[str] = []
    # A CSP violation, a script error or a missing asset would show here (pages that are
    # themselves refusals, 4xx documents, are expected by the tests that open them).
    page.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response",
        lambda r: (
            problems.append(f"{r.status} {r.url}")
            if r.status >= 400 and r.request.resource_type != "document"
            else None
        ),
    )
    page.problems = problems  # type: ignore[attr-defined]
    return page
