"""Egret's charts: matplotlib figures from plain view-model data, as SVG bytes.

One look for every chart (`style`, `figure`, `to_svg`): the portal's palette and fonts,
text left as text (the browser draws Chinese with its own fonts; nothing is downloaded),
deterministic output, and a <title> and <desc> inside the SVG for assistive technology.
Each chart is one function over a view model: `history` for the History page; `heat_map`
and `bars` (a histogram or a bar chart) for the staff console (views/figures.py).

matplotlib keeps state shared by every figure (rcParams, font caches), so figures are drawn
one at a time (`_DRAWING`) and the style is set once, on first use.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime
from xml.sax.saxutils import escape, quoteattr

import matplotlib
from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from services.portal.i18n import Localiser
from services.portal.views.figures import Bars, HeatMap
from services.portal.views.history import Chart

# The portal's palette (static/portal.css :root; a unit test keeps them equal). Every
# colour here has at least 4.5:1 contrast on white, text and lines alike.
TEXT = "#1b1b1b"  # --text
MUTED = "#505a5f"  # --muted
BRAND = "#0b3a6f"  # --brand
CORRECTED = "#7a4a00"  # --warn
GRID = "#b1b4b6"  # --border

# The heat map's cells: white to the brand blue; the count is written in every cell, in
# white on the darker half, so no reading depends on telling shades apart.
HEAT = ("#ffffff", BRAND)
# Bars adding points: brand blue, plain; taking points away: the warning brown, hatched.
GAIN, LOSS = BRAND, CORRECTED

# Width and height in CSS pixels (the SVG's points, at 72 per inch, are drawn as pixels).
WIDTH, HEIGHT = 720, 320

# Text is measured with DejaVu Sans, which matplotlib ships: the same layout on every host,
# whatever fonts it has. Its stand-in for a glyph it lacks (a Chinese character) is wider
# than the glyph a browser draws, so measured text never overlaps when drawn. The browser
# picks from the whole list, as the portal's stylesheet does.
FONTS = ["DejaVu Sans", "PingFang SC", "Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC"]


@dataclass(frozen=True)
class Look:
    """How a series is drawn: never by colour alone."""

    gid: str  # the SVG group's id
    colour: str
    linestyle: str
    marker: str
    width: float


# As known then: solid, round markers; as corrected: dashed, square markers.
SERIES = (Look("series-known", BRAND, "-", "o", 2.5), Look("series-corrected", CORRECTED, "--", "s", 2))

# Beyond this many changes, markers merge into a smear: the line styles alone tell the series apart.
MARKED_CHANGES = 60

_DRAWING = threading.Lock()


@functools.cache
def style() -> None:
    """matplotlib's settings for every Egret chart, applied once per process."""
    matplotlib.use("Agg")
    matplotlib.rcParams.update(
        {
            "svg.fonttype": "none",  # text stays <text>
            "svg.hashsalt": "egret",  # stable element ids: the same data gives the same bytes
            "font.family": "sans-serif",
            "font.sans-serif": FONTS,
            "font.size": 14,
            "text.color": TEXT,
            "axes.edgecolor": MUTED,
            "axes.labelcolor": TEXT,
            "axes.linewidth": 1,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "axes.grid.axis": "y",
            "axes.axisbelow": True,
            "grid.color": GRID,
            "grid.linewidth": 0.75,
            "xtick.color": MUTED,
            "ytick.color": MUTED,
            "xtick.labelcolor": TEXT,
            "ytick.labelcolor": TEXT,
            "legend.frameon": False,
            "figure.facecolor": "white",
        }
    )


def figure() -> Figure:
    """A blank figure of the portal's size, laid out to fit its labels. Not pyplot's: no
    global figure list, nothing to close."""
    style()
    return Figure(figsize=(WIDTH / 72, HEIGHT / 72), dpi=72, layout="constrained")


def to_svg(fig: Figure, title: str, description: str) -> bytes:
    """The figure as a standalone SVG image, named and described for assistive technology."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # DejaVu Sans has no Chinese: measured with its stand-in (FONTS), not worth a warning.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue().decode("utf-8")
    root = re.search(r"<svg\b[^>]*>", svg)
    if root is None:
        raise ValueError("matplotlib wrote no <svg> element")
    opening = root.group(0)[:-1] + ' role="img" aria-labelledby="chart-title chart-desc">'
    named = (
        f"\n <title id={quoteattr('chart-title')}>{escape(title)}</title>"
        f"\n <desc id={quoteattr('chart-desc')}>{escape(description)}</desc>"
    )
    return (svg[: root.start()] + opening + named + svg[root.end() :]).encode("utf-8")


def history(t: Localiser, chart: Chart) -> bytes:
    """The score over time as steps: as known then (solid, round markers) and as corrected
    (dashed, square markers), with the tier thresholds labelled at the right."""
    with _DRAWING:
        fig = figure()
        ax = fig.add_subplot()
        for series, look in zip((chart.known, chart.corrected), SERIES, strict=True):
            if series is not None:
                _series(ax, series.points, series.label, look)
        for threshold in chart.thresholds:
            ax.axhline(threshold.score, color=MUTED, linestyle=":", linewidth=1.5, gid="threshold")
        ax.set_xlim(chart.start, chart.end)  # type: ignore[arg-type]
        ax.margins(y=0.1)
        _date_axis(ax, t)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: t.number(round(value))))
        ax.set_ylabel(chart.score_label)
        _threshold_labels(ax, chart)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=2, borderaxespad=0, handlelength=3)
        return to_svg(fig, chart.title, chart.summary)


def _series(ax: Axes, points: tuple[tuple[datetime, int], ...], label: str, look: Look) -> None:
    # A marker at each change while they can be told apart; the last point holds the
    # score until now, a corner of the step rather than a change.
    (line,) = ax.plot(
        [at for at, _ in points],  # type: ignore[arg-type]  # datetimes: matplotlib converts them
        [score for _, score in points],
        drawstyle="steps-post",
        color=look.colour,
        linestyle=look.linestyle,
        linewidth=look.width,
        marker=look.marker if len(points) <= MARKED_CHANGES else "None",
        markersize=6,
        markevery=slice(0, max(len(points) - 1, 1)),
        label=label,
    )
    line.set_gid(look.gid)


def _threshold_labels(ax: Axes, chart: Chart) -> None:
    """Each threshold's tier named at the right end of its line, close ones moved apart."""
    low, high = ax.get_ylim()
    # The plot is at least this tall once laid out: spacing by it never lets labels touch.
    plot_height = HEIGHT - 110
    gap = matplotlib.rcParams["font.size"] * 1.3
    previous = -gap
    for threshold in sorted(chart.thresholds, key=lambda th: th.score):
        at = (threshold.score - low) / (high - low) * plot_height
        placed = max(at, previous + gap)
        previous = placed
        ax.annotate(
            threshold.label,
            xy=(1, threshold.score),
            xycoords=ax.get_yaxis_transform(),
            xytext=(6, placed - at),
            textcoords="offset points",
            ha="left",
            va="center",
            annotation_clip=False,
            gid="threshold-label",
        )


def _date_axis(ax: Axes, t: Localiser) -> None:
    """Ticks at round dates in the city's time zone, each named as the reader's locale
    writes a date."""
    # matplotlib.dates has no annotations yet.
    locator = mdates.AutoDateLocator(tz=t.timezone, minticks=2, maxticks=4)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda value, _: t.date(mdates.num2date(value)))  # type: ignore[no-untyped-call]
    )


def heat_map(chart: HeatMap) -> bytes:
    """A matrix as coloured cells, each with its count written in it; rows and columns
    named on the axes. The diagonal (no move) is outlined."""
    with _DRAWING:
        fig = figure()
        fig.set_size_inches(WIDTH / 72, max(150, 90 + 50 * len(chart.rows)) / 72)
        ax = fig.add_subplot()
        ax.grid(False)
        top = max((max(row) for row in chart.counts if row), default=0) or 1
        cmap = LinearSegmentedColormap.from_list("egret-heat", HEAT)
        ax.imshow(chart.counts, cmap=cmap, vmin=0, vmax=top, aspect="auto", gid="cells")
        for i, row in enumerate(chart.counts):
            for j, value in enumerate(row):
                dark = value > top / 2
                ax.text(
                    j,
                    i,
                    chart.cell_text[i][j],
                    ha="center",
                    va="center",
                    color="white" if dark else TEXT,
                    fontweight="bold" if chart.rows[i] != chart.columns[j] and value else "normal",
                    gid="cell-value",
                )
                if chart.rows[i] == chart.columns[j]:
                    ax.add_patch(
                        Rectangle(
                            (j - 0.5, i - 0.5),
                            1,
                            1,
                            fill=False,
                            edgecolor=MUTED,
                            linestyle="--",
                            linewidth=1.5,
                        )
                    )
        ax.set_xticks(range(len(chart.columns)), chart.columns)
        ax.set_yticks(range(len(chart.rows)), chart.rows)
        ax.xaxis.set_ticks_position("top")
        ax.xaxis.set_label_position("top")
        ax.set_xlabel(chart.column_label)
        ax.set_ylabel(chart.row_label)
        for spine in ax.spines.values():
            spine.set_visible(False)
        return to_svg(fig, chart.title, chart.summary)


def bars(chart: Bars) -> bytes:
    """Bars with their value written at each end. Horizontal (one labelled row per bar,
    e.g. a rule) or vertical (a histogram's buckets along the axis); when `signed`, bars
    taking away are hatched as well as coloured differently."""
    with _DRAWING:
        fig = figure()
        if chart.horizontal:
            # A row per bar, whatever their number: one bar is a short chart, not a block.
            fig.set_size_inches(WIDTH / 72, max(140, 90 + 34 * len(chart.labels)) / 72)
        ax = fig.add_subplot()
        positions = range(len(chart.labels))
        colours = [LOSS if chart.signed and v < 0 else GAIN for v in chart.values]
        hatches = ["//" if chart.signed and v < 0 else "" for v in chart.values]
        if chart.horizontal:
            drawn = ax.barh(
                positions,
                chart.values,
                height=0.6,
                color=colours,
                hatch=hatches,
                edgecolor="white",
                gid="bars",
            )
            low, high = min(0, *chart.values), max(0, *chart.values)
            room = (high - low or 1) * 0.2  # for the values written past the bars' ends
            ax.set_xlim(low - (room if low < 0 else 0), high + (room if high > 0 else room / 4))
            ax.set_yticks(positions, chart.labels)
            ax.set_ylim(len(chart.labels) - 0.3, -0.7)  # the first (largest) at the top
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.grid(axis="x")
            ax.grid(axis="y", visible=False)
            ax.set_xlabel(chart.axis_label)
            if chart.signed:
                ax.axvline(0, color=MUTED, linewidth=1)
        else:
            drawn = ax.bar(
                positions, chart.values, color=colours, hatch=hatches, edgecolor="white", gid="bars"
            )
            ax.set_xticks(
                positions,
                chart.labels,
                rotation=45 if len(chart.labels) > 6 else 0,
                ha="right" if len(chart.labels) > 6 else "center",
            )
            ax.set_ylabel(chart.axis_label)
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.bar_label(drawn, labels=list(chart.value_text), padding=3, gid="bar-values")
        if not chart.horizontal:
            ax.margins(x=0.02, y=0.15)
        return to_svg(fig, chart.title, chart.summary)
