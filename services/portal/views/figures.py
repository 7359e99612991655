"""The console's charts as data: a heat map (a tier migration matrix) and bars (a histogram
of score changes, the rules moving most points), every word already in the reader's
language, for services.portal.charts to draw.

A chart is an image of its own (its own request, its own CSP), and a backtest's or a
policy preview's report is not stored where that request could read it again, so the page
puts the chart's few numbers in the image's URL (`encode`), and the image's route reads
them back (`decode`), refusing anything larger or of another shape. They are tallies over
many subjects (tier names, bucket labels, rule ids and counts): nothing personal."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from services.portal.i18n import Localiser

MAX_ENCODED = 6000  # characters of a chart's data in its URL
MAX_ITEMS = 60  # tiers per side, bars per chart
MAX_LABEL = 80


@dataclass(frozen=True)
class HeatMap:
    title: str
    summary: str
    row_label: str  # the side the rows are (before)
    column_label: str  # the side the columns are (after)
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]  # counts[row][column]
    cell_text: tuple[tuple[str, ...], ...]  # each count in the reader's locale


@dataclass(frozen=True)
class Bars:
    title: str
    summary: str
    axis_label: str  # what the values are
    labels: tuple[str, ...]
    values: tuple[int, ...]
    value_text: tuple[str, ...]
    horizontal: bool  # rules, long labels: one a row; a histogram: buckets along the axis
    signed: bool = False  # values above and below zero drawn differently, not by colour alone


class BadChartData(ValueError):
    """Chart numbers in a request that are not of the shape the page sends (answered 404)."""


def encode(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode(text: str) -> dict[str, Any]:
    if not text or len(text) > MAX_ENCODED:
        raise BadChartData("missing or too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise BadChartData("not chart data") from error
    if not isinstance(data, dict):
        raise BadChartData("not chart data")
    return data


def _labels(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_ITEMS:
        raise BadChartData("labels")
    if not all(isinstance(v, str) and len(v) <= MAX_LABEL for v in value):
        raise BadChartData("labels")
    return tuple(value)


def _counts(value: object, length: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise BadChartData("counts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10**12 for v in value):
        raise BadChartData("counts")
    return tuple(value)


def matrix_data(rows: tuple[str, ...], columns: tuple[str, ...], counts: tuple[tuple[int, ...], ...]) -> str:
    return encode({"r": list(rows), "c": list(columns), "n": [list(row) for row in counts]})


def decode_matrix(text: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...]]:
    data = _decode(text)
    rows, columns = _labels(data.get("r")), _labels(data.get("c"))
    counts = data.get("n")
    if not isinstance(counts, list) or len(counts) != len(rows):
        raise BadChartData("counts")
    return rows, columns, tuple(_counts(row, len(columns)) for row in counts)


def bars_data(labels: tuple[str, ...], values: tuple[int, ...]) -> str:
    return encode({"l": list(labels), "v": list(values)})


def decode_bars(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    data = _decode(text)
    labels = _labels(data.get("l"))
    return labels, _counts(data.get("v"), len(labels))


def migration_map(
    t: Localiser, rows: tuple[str, ...], columns: tuple[str, ...], counts: tuple[tuple[int, ...], ...]
) -> HeatMap:
    moved = sum(n for i, row in enumerate(counts) for j, n in enumerate(row) if rows[i] != columns[j])
    total = sum(sum(row) for row in counts)
    return HeatMap(
        title=t.gettext("Tier migration"),
        summary=t.gettext(
            "How many subjects move from each tier now (rows) to each tier under the candidate (columns): "
            "%(moved)s of %(total)s change tier. The table below gives every number.",
            moved=t.number(moved),
            total=t.number(total),
        ),
        row_label=t.gettext("Tier now"),
        column_label=t.gettext("Tier under the candidate"),
        rows=rows,
        columns=columns,
        counts=counts,
        cell_text=tuple(tuple(t.number(n) for n in row) for row in counts),
    )


def change_histogram(t: Localiser, labels: tuple[str, ...], values: tuple[int, ...]) -> Bars:
    return Bars(
        title=t.gettext("Score changes"),
        summary=t.gettext(
            "How many subjects' scores change by how much (candidate minus now), in %(n)s ranges. "
            "The table below gives every number.",
            n=t.number(len(labels)),
        ),
        axis_label=t.gettext("Subjects"),
        labels=labels,
        values=values,
        value_text=tuple(t.number(v) for v in values),
        horizontal=False,
    )


def rules_bars(t: Localiser, labels: tuple[str, ...], values: tuple[int, ...]) -> Bars:
    return Bars(
        title=t.gettext("Rules moving the most points"),
        summary=t.gettext(
            "Points each rule adds (+) or takes away (\u2212) under the candidate compared with now, "
            "for the %(n)s rules moving the most. The table below gives every number.",
            n=t.number(len(labels)),
        ),
        axis_label=t.gettext("Points moved"),
        labels=labels,
        values=values,
        value_text=tuple(t.signed(v) for v in values),
        horizontal=True,
        signed=True,
    )
