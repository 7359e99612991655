"""The charts are valid standalone SVG images with their text as text, in the reader's
language, named and described for assistive technology, and drawn the same every time."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from services.portal import charts
from services.portal.i18n import Localiser
from services.portal.views import history
from tests.support.portal.samples import NOW, change, explanation

SVG = "{http://www.w3.org/2000/svg}"


def history_svg(t: Localiser, corrected: bool = True) -> tuple[ET.Element, history.Chart]:
    known = (change(1, 990, 1000, "correction"), change(40, 1000, None))
    view = history.history(
        t, known, (change(42, 1000, None),) if corrected else known, NOW, explanation().tiers
    )
    assert view.chart is not None
    return ET.fromstring(charts.history(t, view.chart)), view.chart


def texts(root: ET.Element) -> list[str]:
    return [text.text or "" for text in root.iter(f"{SVG}text")]


def by_id(root: ET.Element, gid: str) -> list[ET.Element]:
    return [element for element in root.iter() if element.get("id") == gid]


def test_the_history_chart_is_an_svg_image_named_and_described(en: Localiser) -> None:
    root, chart = history_svg(en)
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    assert root.get("aria-labelledby") == "chart-title chart-desc"
    # The accessible name and description come first, as the root's own children.
    assert [child.tag for child in root][:2] == [f"{SVG}title", f"{SVG}desc"]
    assert root.find(f"{SVG}title").text == "Your score over time"  # type: ignore[union-attr]
    assert root.find(f"{SVG}desc").text == chart.summary  # type: ignore[union-attr]
    assert root.find(f"{SVG}script") is None


def test_the_history_chart_draws_both_series_the_thresholds_and_english_labels(en: Localiser) -> None:
    root, _ = history_svg(en)
    assert len(by_id(root, "series-known")) == 1
    assert len(by_id(root, "series-corrected")) == 1
    said = texts(root)
    assert {"As known at the time", "As corrected since", "Score"} <= set(said)
    assert {"A from 960", "AA from 1,030"} <= set(said)
    assert any(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, 2026", s) for s in said), said  # dates as en writes them
    assert "1,000" in said  # numbers as en writes them


def test_the_history_chart_in_chinese_keeps_its_text_as_text(zh: Localiser) -> None:
    root, chart = history_svg(zh)
    said = texts(root)
    assert {"当时所知", "更正后", "分数", "A 级 960 分起", "AA 级 1,030 分起"} <= set(said)
    assert any(re.fullmatch(r"2026年\d{1,2}月\d{1,2}日", s) for s in said), said
    assert root.find(f"{SVG}title").text == "您的分数变化"  # type: ignore[union-attr]
    assert root.find(f"{SVG}desc").text == chart.summary  # type: ignore[union-attr]
    # Drawn by the reader's browser in its own fonts: a sans-serif list ending in the generic one.
    family = re.search(r"font-family: ([^;\"]+)", ET.tostring(root, encoding="unicode"))
    assert family is not None
    assert family.group(1).endswith("sans-serif")
    assert "Noto Sans CJK SC" in family.group(1)


def test_one_line_when_no_correction_changed_a_score(en: Localiser) -> None:
    root, _ = history_svg(en, corrected=False)
    assert len(by_id(root, "series-known")) == 1
    assert by_id(root, "series-corrected") == []
    assert "As corrected since" not in texts(root)


def test_the_same_history_gives_the_same_bytes(en: Localiser) -> None:
    view = history.history(en, (change(3, 1010, 1000), change(9, 1000, None)), (), NOW, explanation().tiers)
    assert view.chart is not None
    first = charts.history(en, view.chart)
    assert first == charts.history(en, view.chart)
    assert b"<dc:date>" not in first  # no creation date in the metadata


def test_a_long_history_draws_without_markers(en: Localiser) -> None:
    """(Its drawing time is measured by bench.portal's `chart` page, not asserted here.)"""
    known = tuple(change(200 - i, 1000 + (i % 7) * 5, 1000) for i in range(200))
    view = history.history(en, known, known[::2], NOW, explanation().tiers)
    assert view.chart is not None
    svg = charts.history(en, view.chart)
    root = ET.fromstring(svg)
    for series in ("series-known", "series-corrected"):  # 200 markers would merge into a smear
        assert list(by_id(root, series)[0].iter(f"{SVG}use")) == []


def test_the_charts_colours_are_the_portals() -> None:
    css = (Path(charts.__file__).parent / "static" / "portal.css").read_text()
    variables = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-f]{6})", css))
    assert {
        "text": charts.TEXT,
        "muted": charts.MUTED,
        "brand": charts.BRAND,
        "warn": charts.CORRECTED,
        "border": charts.GRID,
    }.items() <= variables.items()
