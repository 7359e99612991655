"""What the browser tests do on every page: axe-core, screenshots, the phone width, keyboard
moves. Debian's Chromium and axe-core come from `make browser-tools`; nothing is downloaded
while the tests run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, ViewportSize

from devtools.cluster import REPO_ROOT
from tests.support.tools import tool_missing

CHROMIUM = Path("/usr/bin/chromium")
AXE = REPO_ROOT / ".tools" / "node_modules" / "axe-core" / "axe.min.js"
ARTEFACTS = REPO_ROOT / "test-artefacts" / "browser"
PHONE: ViewportSize = {"width": 360, "height": 740}
# WCAG 2.2 AA and the best practices axe reports; only these impacts fail a page.
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]
FAILING_IMPACTS = ("serious", "critical")


def require_browser_tools() -> None:
    """Skip (fail on CI, where make setup installs them) when Chromium or axe-core is missing."""
    missing = [str(p) for p in (CHROMIUM, AXE) if not p.exists()]
    if not missing:
        return
    tool_missing(
        f"browser tests need {' and '.join(missing)}: run `make browser-tools` (as root for apt-get)"
    )


def axe_violations(page: Page) -> list[dict[str, Any]]:
    """Run axe-core in the page. Evaluated over the DevTools protocol, so the portal's CSP (no
    script at all) stays on and is not loosened for the test."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(f"() => {{ {AXE.read_text()}\n}}")
        # axe.min.js assigns window.axe when run as a function body.
    found: list[dict[str, Any]] = page.evaluate(
        """async (tags) => {
            const result = await axe.run(document, {runOnly: {type: 'tag', values: tags},
                                                    resultTypes: ['violations']});
            return result.violations.map(v => ({
                id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.slice(0, 5).map(n => n.target.join(' ') + ': ' + n.failureSummary),
            }));
        }""",
        AXE_TAGS,
    )
    return found


def assert_accessible(page: Page, name: str) -> None:
    bad = [v for v in axe_violations(page) if v["impact"] in FAILING_IMPACTS]
    assert not bad, f"axe-core on {name} ({page.url}):\n" + "\n".join(
        f"  {v['impact']} {v['id']}: {v['help']}\n    " + "\n    ".join(v["nodes"]) for v in bad
    )


def screenshot(page: Page, name: str) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{re.sub(r'[^a-z0-9-]+', '-', name.lower())}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def check_page(page: Page, name: str) -> None:
    """Every page a test shows: axe-core, a screenshot, and no horizontal scrolling."""
    assert_accessible(page, name)
    assert_fits_width(page, name)
    screenshot(page, name)


def assert_fits_width(page: Page, name: str) -> None:
    """The page itself never scrolls sideways (wide tables may scroll inside their own box)."""
    overflow = page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at {page.viewport_size}"


def focused(page: Page) -> dict[str, str]:
    described: dict[str, str] = page.evaluate(
        """() => { const e = document.activeElement;
                   return {tag: e.tagName.toLowerCase(), text: (e.innerText || e.value || '').trim(),
                           href: e.getAttribute('href') || '', id: e.id || '',
                           outline: getComputedStyle(e).outlineStyle}; }"""
    )
    return described


def tab_to(
    page: Page,
    *,
    text: str | None = None,
    href: str | None = None,
    element_id: str | None = None,
    limit: int = 80,
) -> dict[str, str]:
    """Press Tab until the focused element matches; fail if it is never reached. Every stop on
    the way must show its focus (an outline)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        now = focused(page)
        if now["tag"] in ("a", "button", "input", "textarea", "select"):
            assert now["outline"] != "none", f"no visible focus on {now}"
        if (
            (text is None or now["text"] == text)
            and (href is None or now["href"] == href)
            and (element_id is None or now["id"] == element_id)
        ):
            return now
    raise AssertionError(f"Tab never reached text={text!r} href={href!r} id={element_id!r} on {page.url}")
