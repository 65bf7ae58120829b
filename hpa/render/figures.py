"""Figures in the style of seed 004: per-layer cosine histograms and n_l per layer."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def projection_figures(result, directory: Path, fmt: str) -> list[Path]:
    values = result.statistics["projection"].layers
    if not values:
        return []
    return [_histograms(values, directory / f"projection_histograms.{fmt}"),
            _n_l(values, directory / f"projection_n_l.{fmt}")]


def _histograms(values: dict, path: Path) -> Path:
    """One panel per layer: trained cosines, with init overlaid when compared (004 Fig. 1)."""
    plt = _pyplot()
    names = list(values)
    cols = min(6, math.ceil(math.sqrt(len(names))))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        v = values[name]
        edges = v["histogram"]["edges"]
        if "init" in v:
            ax.stairs(v["init"]["histogram"]["counts"], edges, fill=True, alpha=0.45, color="tab:gray",
                      label="init")
        ax.stairs(v["histogram"]["counts"], edges, fill=True, alpha=0.65, color="tab:blue", label="trained")
        ax.axvline(0, color="black", lw=0.6)
        n_l = "-" if v["n_l"] is None else f"{v['n_l']:.2f}"
        ax.set_title(f"{name}\n$n_l$={n_l}", fontsize=7)
        ax.set_xlim(-1, 1)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if any("init" in v for v in values.values()):
        axes.flat[0].legend(fontsize=6)
    fig.supxlabel("cosine with the all-ones vector", fontsize=8)
    fig.supylabel("filters", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _n_l(values: dict, path: Path) -> Path:
    plt = _pyplot()
    names = list(values)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(names) + 2), 3.2))
    ax.plot(xs, [_nan(values[n]["n_l"]) for n in names], "o-", label="trained", color="tab:blue")
    if any("init" in values[n] for n in names):
        ax.plot(xs, [_nan(values[n].get("init", {}).get("n_l")) for n in names], "s--", label="init",
                color="tab:gray")
    ax.axhline(0.5, color="black", lw=0.6, ls=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("$n_l$ (fraction of negative cosines)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _nan(value):
    return float("nan") if value is None else value
