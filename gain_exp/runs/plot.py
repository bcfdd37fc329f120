"""A table (gain_exp.table) as grouped bar charts: one panel per metric, one bar per row, mean ± std over seeds.

    python -m gain_exp.table <runs> --plot table.png     (or --spec <spec> --plot table.png)

Needs matplotlib (``pip install 'gain-exp[plot]'``); gain_exp.table imports this module only for ``--plot``.
Drawn with the Agg canvas (no display, no pyplot state) at a fixed size and DPI, without a Software tag, so the
same table gives the same PNG bytes.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import matplotlib
import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gain_exp.output.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from gain_exp.runs.tables import Table

Style = tuple[tuple[float, float, float], str]  # a row's bar colour (RGB) and hatch

DPI = 120
HATCHES = ("", "///", "...", "xxx", "\\\\\\", "ooo")  # one per value of the leading row keys (e.g. per dataset)
PANEL_HEIGHT = 2.6  # inches per row of panels
SLOT = 0.24  # inches per bar
GAP = 0.6  # bars' worth of space between groups of rows that share the leading row keys
STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "hatch.linewidth": 0.8,
}


def plot_table(table: Table, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Draw ``table`` as one bar panel per metric (bar = mean, error bar = std) and save it as PNG at ``path``."""
    if not table.metrics:
        raise ValueError("the table has no metric columns to plot; name the metrics to draw with --metrics.")
    if not table.rows:
        raise ValueError("the table has no rows to plot; build it from at least one completed run.")
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):  # the user's matplotlibrc left out
        figure = _draw(table, title)
        if path is not None:
            save_png(figure, path)
    return figure


def save_png(figure: Figure, path: str | Path) -> None:
    """Write ``figure`` as PNG at ``path`` (parents created, written atomically), bytes fixed by its content."""
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=DPI, metadata={"Software": None})


def row_style(table: Table) -> list[Style]:
    """(colour, hatch) per row: by default a colour per row (hatched once the palette's 20 colours are used up).

    When the last row key's values repeat under the leading keys' (``dataset,loss``: each loss on each dataset),
    the colour follows the last key and the hatch the leading ones, so ``shapes / gain`` and ``digits / gain``
    share a colour and differ by hatch.
    """
    lasts = _unique(row.values[-1:] for row in table.rows)
    leads = _unique(row.values[:-1] for row in table.rows)
    if 1 < len(leads) <= len(HATCHES) and len(lasts) < len(table.rows) and len(lasts) <= 20:
        palette = _palette(len(lasts))
        return [(palette[lasts.index(row.values[-1:])], HATCHES[leads.index(row.values[:-1])]) for row in table.rows]
    palette = _palette(len(table.rows))
    return [(palette[i % len(palette)], HATCHES[i // len(palette) % len(HATCHES)]) for i in range(len(table.rows))]


def bar_positions(table: Table) -> list[float]:
    """x of each row's bar: consecutive, with a gap where the leading row keys change (dataset to dataset)."""
    positions, x = [], 0.0
    for i, row in enumerate(table.rows):
        if i and row.values[:-1] != table.rows[i - 1].values[:-1]:
            x += GAP
        positions.append(x)
        x += 1.0
    return positions


def grid_shape(n_metrics: int) -> tuple[int, int]:
    """(rows, columns) of panels: up to 3 across, 2 x 2 for four metrics."""
    columns = 2 if n_metrics == 4 else min(n_metrics, 3)
    return math.ceil(n_metrics / columns), columns


def default_title(table: Table) -> str:
    """``<metrics> per <row keys>, mean ± std over seeds`` (no "per" part without row keys)."""
    rows = f" per {' / '.join(table.row_keys)}" if table.row_keys else ""
    return f"{', '.join(table.metrics)}{rows}, mean\u00a0±\u00a0std over seeds"  # no line break in "mean ± std"


def _draw(table: Table, title: str | None) -> Figure:
    """The figure: a grid of metric panels, a shared legend of rows below, the title above."""
    labels = [row.label() for row in table.rows]
    positions = bar_positions(table)
    styles = row_style(table)
    grid_rows, grid_cols = grid_shape(len(table.metrics))
    panel_width = max(2.6, SLOT * (positions[-1] + 1) + 0.9)
    width = panel_width * grid_cols
    legend_cols = max(1, min(len(labels), int(width // (0.075 * max(map(len, labels)) + 0.6))))
    legend_rows = math.ceil(len(labels) / legend_cols)
    heading = textwrap.fill(
        title if title is not None else default_title(table), width=int(width * 11), break_on_hyphens=False
    )
    height = PANEL_HEIGHT * grid_rows + 0.22 * legend_rows + 0.2 * (heading.count("\n") + 1) + 0.3

    figure = Figure(figsize=(width, round(height, 2)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, grid_cols, squeeze=False).ravel()
    for ax in axes[len(table.metrics) :]:
        ax.remove()
    for ax, metric in zip(axes, table.metrics):
        _panel(ax, table, metric, positions, styles, labels)
    handles = [Patch(facecolor=colour, hatch=hatch, edgecolor="black", linewidth=0.5) for colour, hatch in styles]
    figure.legend(handles, labels, loc="outside lower center", ncols=legend_cols, frameon=False)
    figure.suptitle(heading)
    return figure


def _panel(ax: Axes, table: Table, metric: str, positions: list[float], styles: list[Style], labels: list[str]) -> None:
    """One metric: a bar per row that reports it (labelled with the row), error bar = std when n > 1."""
    means, highs = [], []
    for row, x, (colour, hatch), label in zip(table.rows, positions, styles, labels):
        mean, std, _ = row.stats(metric)
        if mean is None:
            continue
        ax.bar(
            [x],
            [mean],
            width=0.8,
            color=colour,
            hatch=hatch,
            edgecolor="black",
            linewidth=0.5,
            label=label,
            yerr=None if std is None else [std],
            capsize=2,
            error_kw={"elinewidth": 0.8, "capthick": 0.8},
        )
        means.append(mean)
        highs.append(mean + (std or 0.0))
    ax.set_title(metric)
    ax.set_xticks([])
    ax.set_xlim(positions[0] - 0.7, positions[-1] + 0.7)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    if not highs:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylim(0, 1)
    elif 0.0 <= min(means) and max(means) <= 1.0:  # a rate or score: its full scale, so panels compare
        ax.set_ylim(0, max(1.0, max(highs)) * 1.02)


def _unique(items: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """Distinct tuples in first-seen order."""
    out: list[tuple[str, ...]] = []
    for item in items:
        if tuple(item) not in out:
            out.append(tuple(item))
    return out


def _palette(n: int) -> list[tuple[float, float, float]]:
    """tab10 for up to 10 colours, else tab20 with its 10 strong colours first and the 10 light ones after."""
    if n <= 10:
        return list(matplotlib.colormaps["tab10"].colors)
    colours = list(matplotlib.colormaps["tab20"].colors)
    return colours[0::2] + colours[1::2]
