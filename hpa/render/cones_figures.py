"""Figures of the cone statistics: state fractions per layer pair (000 Fig. 1) and distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATES = ("OUT_FULL_IN", "IN_FULL_OUT", "OUT_PARTIAL_IN", "IN_PARTIAL_OUT")
_COLOURS = {"OUT_FULL_IN": "tab:blue", "IN_FULL_OUT": "tab:orange", "OUT_PARTIAL_IN": "tab:green",
            "IN_PARTIAL_OUT": "tab:red"}
_CONTINUOUS = (("distance", "normalised apex distance |d|"), ("opening", "opening offset |delta|"),
               ("rotation", "rotation rho"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cone_figures(pairs: list[dict[str, Any]], directory: Path, fmt: str) -> list[Path]:
    """``cones_states.<fmt>`` and ``cones_distributions.<fmt>``; nothing when there are no pairs."""
    if not pairs:
        return []
    written = [_states(pairs, directory / f"cones_states.{fmt}")]
    if any(len(entry.get("histograms", {})) > 1 for entry in pairs):
        written.append(_distributions(pairs, directory / f"cones_distributions.{fmt}"))
    return written


def _label(entry: dict[str, Any]) -> str:
    return f"{entry['lower']} → {entry['upper']}"


def _states(pairs: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars of the state fractions per layer pair; init bars beside them, hatched."""
    plt = _pyplot()
    with_init = any("init" in entry for entry in pairs)
    width = 0.4 if with_init else 0.7
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(pairs) + 2), 4.2))
    xs = list(range(len(pairs)))
    for offset, which, hatch in ((0.0, None, None), (width, "init", "//")):
        if which == "init" and not with_init:
            continue
        bottom = [0.0] * len(pairs)
        shift = offset - (width / 2 if with_init else 0.0)
        for state in STATES:
            heights = []
            for entry in pairs:
                source = entry.get(which, {}) if which else entry
                value = source.get("fractions", {}).get(state) if source else None
                heights.append(value or 0.0)
            ax.bar([x + shift for x in xs], heights, width, bottom=bottom, color=_COLOURS[state], hatch=hatch,
                   edgecolor="white" if hatch else None, linewidth=0.3,
                   label=state if which is None else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(xs)
    ax.set_xticklabels([_label(e) for e in pairs], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of non-degenerate cones")
    title = "cone states per layer pair" + (" (hatched: initialisation)" if with_init else "")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _distributions(pairs: list[dict[str, Any]], path: Path) -> Path:
    """One panel per continuous statistic: the per-cone means of every pair, one line per pair."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (key, title) in zip(axes.flat, _CONTINUOUS):
        drawn = False
        for n, entry in enumerate(pairs):
            histograms = entry.get("histograms", {})
            counts = histograms.get(key)
            if not counts or not sum(counts):
                continue
            low, high = histograms.get("range", (0.0, 1.0))
            edges = [low + (high - low) * n / len(counts) for n in range(len(counts) + 1)]
            total = sum(counts)
            ax.stairs([c / total for c in counts], edges,
                      color=cmap(n / max(1, len(pairs) - 1)), label=f"{entry['lower']} → {entry['upper']}")
            drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("per-cone mean over predecessors")
        if not drawn:
            ax.text(0.5, 0.5, "not computed\n(no plane size)", ha="center", va="center", transform=ax.transAxes)
    axes.flat[0].set_ylabel("fraction of cones")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles and len(handles) <= 20:
        fig.tight_layout()
        fig.legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
