"""Figures of ``hpa reinit``: the layers x checkpoints heatmap of Gamba et al. 2020 Fig. 2, and n_l beside criticality.

Layers are numbered 1..L along the horizontal axis as in the paper, checkpoints
run down the vertical axis, and the colour is the relative drop in test
accuracy.  The colour scale is shared by every seed's heatmap and their mean,
so the panels compare at a glance.
"""

from __future__ import annotations

from pathlib import Path

from hpa.render.style import COLUMN, FULL, PALETTE, new_figure, save
from hpa.render.table import shorten_middle

_ANNOTATE_MAX = 240  # cells: beyond this the numbers would be unreadable


def plot_reinit(result, folder: Path, fmt: str = "png") -> list[Path]:
    """Write ``heatmap[-SEED].FMT`` (and ``heatmap-mean`` with several seeds) and ``criticality.FMT``."""
    grids = {seed: result.heatmap(seed) for seed in result.seeds}
    if len(grids) > 1:
        grids["mean"] = result.heatmap()
    finite = [value for grid in grids.values() for value in grid.ravel() if value == value]
    low, high = min([0.0, *finite]), max([1e-9, *finite])
    paths = []
    for label, grid in grids.items():
        stem = "heatmap" if len(grids) == 1 else f"heatmap-{label}"
        paths += save([_heatmap(result, grid, label, low, high)], folder / stem, fmt)
    paths += save([_criticality(result)], folder / "criticality", fmt)
    return paths


def _heatmap(result, grid, label: str, low: float, high: float):
    layers, epochs = result.layers(), result.epochs()
    width = min(FULL, max(COLUMN, 0.9 + 0.32 * len(layers)))
    fig = new_figure(width, max(1.6, 0.9 + 0.22 * len(epochs)))
    axes = fig.add_subplot()
    image = axes.imshow(grid, cmap="viridis", vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    _layer_ticks(axes, range(len(layers)), layers)
    axes.set_yticks(range(len(epochs)), ["random" if e is None else str(e) for e in epochs])
    axes.set_ylabel("reset to epoch")
    for side in ("top", "right"):
        axes.spines[side].set_visible(True)
    if grid.size <= _ANNOTATE_MAX:
        _annotate(axes, grid, low, high)
    bar = fig.colorbar(image, ax=axes, shrink=0.9)
    bar.set_label("relative drop")
    which = "mean over seeds" if label == "mean" else label
    axes.set_title(f"re-initialisation · {Path(result.source).name} · {which}")
    return fig


def _layer_ticks(axes, positions, layers: list[str], most_named: int = 16) -> None:
    """Layer names under the axis when they fit, else indices (the names are in reinit.csv)."""
    if len(layers) <= most_named:
        axes.set_xticks(list(positions), [shorten_middle(name, 14) for name in layers], rotation=40, ha="right")
        axes.set_xlabel("layer")
    else:
        axes.set_xticks(list(positions), [str(i) for i in range(1, len(layers) + 1)])
        axes.set_xlabel("layer (index in execution order; names in reinit.csv)")


def _annotate(axes, grid, low: float, high: float) -> None:
    middle = (low + high) / 2
    for row in range(grid.shape[0]):
        for column in range(grid.shape[1]):
            value = grid[row, column]
            if value == value:  # not NaN
                colour = "black" if value > middle else "white"  # viridis is light at the top
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=5, color=colour)


def _criticality(result):
    layers = result.layers()
    critical = result.criticality()
    n_l = [result._mean_n_l(name) for name in layers]
    positions = list(range(1, len(layers) + 1))
    fig = new_figure(FULL, 2.4)
    by_layer, scatter = fig.subplots(1, 2, width_ratios=[1.6, 1])
    drops = [critical[name] if critical[name] is not None else float("nan") for name in layers]
    by_layer.bar(positions, drops, color=PALETTE["grey"], alpha=0.45, label="criticality (relative drop)")
    by_layer.plot(positions, [float("nan") if v is None else v for v in n_l], "o-", color=PALETTE["vermillion"],
                  label="final $n_l$")
    by_layer.plot(positions, [float("nan") if v is None else abs(v - 0.5) for v in n_l], "s--",
                  color=PALETTE["blue"], label="$|n_l - 0.5|$")
    by_layer.axhline(0.5, color=PALETTE["grey"], linewidth=0.5, linestyle=":")
    _layer_ticks(by_layer, positions, layers)
    by_layer.set_ylim(0, 1.4)  # room for the legend above the data, which lies in [0, 1]
    by_layer.legend(loc="upper center", ncol=3, frameon=False)
    spearman = result.correlation()
    by_layer.set_title(f"$n_l$ and criticality · Spearman ρ: $n_l$ {_rho(spearman['n_l'])}, "
                       f"$|n_l - 0.5|$ {_rho(spearman['bias'])}")
    points = [(abs(v - 0.5), d, i) for v, d, i in zip(n_l, drops, positions) if v is not None and d == d]
    scatter.scatter([p[0] for p in points], [p[1] for p in points], color=PALETTE["vermillion"], s=12)

    for x, y, index in points:
        label = shorten_middle(layers[index - 1], 14) if len(layers) <= 16 else str(index)
        scatter.annotate(label, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    scatter.set_xlabel("$|n_l - 0.5|$ (bias)")
    scatter.set_ylabel("relative drop")
    return fig


def _rho(entry: dict) -> str:
    return "n/a" if entry.get("rho") is None else f"{entry['rho']:+.2f}"
