"""Figures of the projection statistic, after Gamba et al. 2020 (Fig. 1 and 5).

``projection_histograms``: one panel per layer, the cosines of its filters with
the all-ones vector, trained over init when compared; fixed-size panels, 20 to
a page.  ``projection_n_l``: n_l against layer index.  Both read only the
result's JSON-ready values, so ``hpa plot result.json`` redraws them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from hpa.render import style

COLUMNS, ROWS = 4, 5  # panels per page: a full-width page stays legible whatever the model's depth
PANEL_HEIGHT = 1.45  # inches
NAMED_TICKS = 24  # up to this many layers, the n_l axis names every layer


def projection_figures(result, directory: Path, fmt: str) -> list[Path]:
    """``projection_histograms.<fmt>`` (or pages) and ``projection_n_l.<fmt>``; nothing without layers."""
    values = result.statistics["projection"].layers
    names = style.select(list(values), style.current().layers)
    if not names:
        return []
    caption = style.caption(result)
    index = {name: _index(result, name, n) for n, name in enumerate(values)}
    return (histograms(values, names, caption, directory / "projection_histograms", fmt)
            + n_l_figure(values, names, index, caption, directory / "projection_n_l", fmt))


def _index(result, name: str, fallback: int) -> int:
    """The layer's position in execution order, as layers.csv gives it."""
    return result.graph[name].index if name in result.graph else fallback


# -- histograms -----------------------------------------------------------------------------------

def histograms(values: Mapping[str, Any], names: list[str], caption: str, stem: Path, fmt: str) -> list[Path]:
    half = style.current().hist_range or style.nice_ceiling(_largest_cosine(values, names))
    chunks = style.pages(names, COLUMNS * ROWS)
    figures = [_histogram_page(values, chunk, half, caption, page, len(chunks))
               for page, chunk in enumerate(chunks, 1)]
    return style.save(figures, stem, fmt)


def _largest_cosine(values: Mapping[str, Any], names: list[str]) -> float:
    found = [abs(c) for name in names for c in _cosines(values[name]) + _cosines(values[name].get("init"))]
    return max(found, default=1.0)


def _panel_edges(values: Mapping[str, Any], half: float) -> list[float]:
    """Bin edges over the shared [-half, half], as fine as this layer needs (and no finer).

    The x range is shared, so one bin width for all panels would squeeze a deep layer,
    whose cosines spread about ±1/sqrt(n), into two or three bars.  Each panel gets about
    2 sqrt(F) bins (8 to 25) across the spread of its own cosines, trained and init alike.
    """
    import numpy as np

    found = _cosines(values) + _cosines(values.get("init"))
    if len(found) < 2:
        count = 20
    else:
        low, high = np.percentile(found, [2, 98])
        across = int(np.clip(round(2 * np.sqrt(len(found) / (2 if values.get("init") else 1))), 8, 25))
        spread = max(high - low, 2 * half / 200)
        count = int(np.clip(np.ceil(2 * half * across / spread), 10, 200))
    count += count % 2  # an even count keeps 0 on an edge
    return [-half + 2 * half * k / count for k in range(count + 1)]


def _cosines(values: Mapping[str, Any] | None) -> list[float]:
    if not values:
        return []
    return [c for c in values.get("cosines", []) if c is not None]


def _histogram_page(values, names, half, caption, page, n_pages):
    from matplotlib.ticker import FixedLocator, MaxNLocator

    few = len(names) <= 4 and n_pages == 1  # a small model fits one column of a paper
    cols = 2 if few else COLUMNS
    rows = math.ceil(len(names) / cols)
    width = style.COLUMN if few else style.FULL
    compared = any(values[name].get("init") for name in names)
    fig = style.new_figure(width, PANEL_HEIGHT * rows + 0.75 + 0.25 * compared)
    axes, strip = style.panels(fig, rows, cols, PANEL_HEIGHT, legend=compared)
    for ax, name in zip(axes.flat, names):
        _panel(ax, name, values[name], _panel_edges(values[name], half))
        ax.xaxis.set_major_locator(FixedLocator([-half, 0, half]))
        ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}".replace("-", "−"))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True, min_n_ticks=2))
        ax.set_xlim(-half, half)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("cosine of each filter with the all-ones vector")
    fig.supylabel("filters")
    style.title(fig, caption, f"page {page} of {n_pages}" if n_pages > 1 else "")
    if compared:
        style.legend_strip(strip, *_histogram_handles())
    return fig


def _histogram_handles():
    """Legend entries that look like the panels' trained and init histograms."""
    from matplotlib.patches import Patch

    trained = Patch(facecolor=_tint(style.TRAINED), edgecolor=style.TRAINED, linewidth=1.0)
    init = Patch(facecolor="none", edgecolor=style.INIT, hatch=style.INIT_HATCH, linewidth=1.0,
                 linestyle=(0, (3, 1.5)))
    return [trained, init], ["trained", "initialisation"]


def _tint(colour: str) -> tuple[float, float, float]:
    """``colour`` at 30 % on white: the trained fill, opaque so that it prints the same everywhere."""
    from matplotlib.colors import to_rgb

    return tuple(1 - 0.3 * (1 - c) for c in to_rgb(colour))


def _panel(ax, name: str, values: Mapping[str, Any], edges: list[float]) -> bool:
    """Trained filled with a solid outline; init hatched with a dashed outline.  True if init is drawn."""
    init = values.get("init")
    trained, outside = _counts(values, edges)
    ax.stairs(trained, edges, fill=True, facecolor=_tint(style.TRAINED), linewidth=0)
    ax.stairs(trained, edges, color=style.TRAINED, linewidth=1.0, label="trained")
    title = f"{style.short(name)}\n$n_l$ {_fmt(values.get('n_l'))}"
    if init:
        init_counts, init_outside = _counts(init, edges)
        outside += init_outside
        ax.stairs(init_counts, edges, fill=True, facecolor="none", edgecolor=style.INIT, hatch=style.INIT_HATCH,
                  linewidth=0)
        ax.stairs(init_counts, edges, color=style.INIT, linewidth=1.0, linestyle=(0, (3, 1.5)), label="init")
        title += f" · init {_fmt(init.get('n_l'))}"
    ax.axvline(0, color="0.35", linewidth=0.5, zorder=0)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    if outside:  # nothing dropped silently: cosines beyond a user-fixed --hist-range are counted here
        ax.text(0.98, 0.97, f"{outside} beyond ±{edges[-1]:g}", transform=ax.transAxes, ha="right", va="top",
                fontsize=6)
    return bool(init)


def _counts(values: Mapping[str, Any], edges: list[float]) -> tuple[list[int], int]:
    """Histogram of the filters' cosines over ``edges``, and how many fall outside them."""
    import numpy as np

    cosines = np.array(_cosines(values), dtype=float)
    if "cosines" not in values:  # a result without per-filter values: regroup its stored histogram
        stored = values["histogram"]
        centres = (np.array(stored["edges"][:-1]) + np.array(stored["edges"][1:])) / 2
        cosines = np.repeat(centres, stored["counts"])
    counts, _ = np.histogram(cosines, bins=np.array(edges))
    return counts.tolist(), int(len(cosines) - counts.sum())


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


# -- n_l per layer ----------------------------------------------------------------------------------

def n_l_figure(values: Mapping[str, Any], names: list[str], index: Mapping[str, int], caption: str,
               stem: Path, fmt: str) -> list[Path]:
    """n_l against layer index (Gamba et al. 2020 Fig. 5), init beside trained, with the 0.5 of no bias marked."""
    from matplotlib.ticker import MaxNLocator

    named = len(names) <= NAMED_TICKS
    width = style.COLUMN if len(names) <= 16 else style.FULL
    fig = style.new_figure(width, 3.1 if named else 2.5)
    axes, strip = style.panels(fig, 1, 1, 2.0, legend=True)
    ax = axes[0, 0]
    xs = [index[n] for n in names]
    marker = 4 if len(names) <= 60 else 2.5
    ax.axhline(0.5, color="0.3", linewidth=0.7, linestyle=":", label="0.5 (no bias)")
    if any(values[n].get("init") for n in names):
        ax.plot(xs, [_nan(values[n].get("init", {}).get("n_l")) for n in names], linestyle=(0, (3, 1.5)),
                marker="s", markersize=marker, markerfacecolor="white", color=style.INIT, label="init")
    ax.plot(xs, [_nan(values[n]["n_l"]) for n in names], marker="o", markersize=marker, color=style.TRAINED,
            label="trained")
    ax.set_ylim(-0.06, 1.06)  # room for a whole marker at n_l = 0 or 1
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_ylabel("$n_l$ (fraction of\nnegative cosines)")
    if named:
        ax.set_xticks(xs, [f"{style.short(n, 18)} ({x})" for n, x in zip(names, xs)], rotation=90)
        ax.set_xlabel("layer (index in execution order)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer index in execution order (names: layers.csv)")
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    style.title(fig, caption)
    style.legend_strip(strip, *ax.get_legend_handles_labels())
    return style.save([fig], stem, fmt)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


# -- over the epochs of a training run ------------------------------------------------------------

def projection_series_figures(series, directory: Path, fmt: str) -> list[Path]:
    """``projection_n_l_epochs`` (Gamba et al. 2020 Figs. 5, 7, 8) and ``projection_distance_epochs``."""
    from hpa.render import series as curves

    return (curves.layer_figure(series, "projection.n_l", directory / "projection_n_l_epochs", fmt,
                                "$n_l$ (fraction of\nnegative cosines)", limits=(-0.03, 1.03), reference=0.5)
            + curves.layer_figure(series, "projection.distance_from_init.relative_l2",
                                  directory / "projection_distance_epochs", fmt,
                                  "$\\|W - W_0\\|_2 \\,/\\, \\|W_0\\|_2$"))
