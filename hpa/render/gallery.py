"""The figures of ``hpa gallery``: n_l against relative depth for every model in one plot, and one
panel per family, legible with hundreds of models (each model a faint line, the median and the
quartiles over models per depth bin drawn over them).

Input is plain data: per model a dict with ``name``, ``family``, ``depth`` (relative depths in (0, 1))
and ``n_l`` (one value per analysed layer), as hpa.gallery.run builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from hpa.render import style

BINS = 20  # depth bins of the median and quartile band
FAR = 0.2  # the band |n_l - 0.5| <= FAR is shaded: layers outside it count as far from one half
PANELS_PER_PAGE = 20  # 4 columns x 5 rows on a full-width page


def gallery_figures(curves: Sequence[Mapping[str, Any]], directory: Path, fmt: str) -> list[Path]:
    """``all_models.FMT`` and ``families.FMT`` (one page per 20 families; pages -1, -2, ... or one PDF)."""
    if not curves:
        return []
    with style.drawing(style.FigureOptions(format=fmt)):
        return (style.save([_all_models(curves)], Path(directory) / "all_models", fmt)
                + style.save(_family_pages(curves), Path(directory) / "families", fmt))


def _all_models(curves: Sequence[Mapping[str, Any]]):
    fig = style.new_figure(style.FULL, 3.4)
    ax = fig.add_subplot()
    _draw(ax, curves, alpha=_alpha(len(curves)), label_stats=True)
    ax.set_xlabel("relative depth (layer i of L at (i + 0.5) / L)")
    ax.set_ylabel("$n_l$ (fraction of negative cosines)")
    layers = sum(len(c["n_l"]) for c in curves)
    ax.set_title(f"{len(curves)} models, {layers} layers: each model a faint line; median and quartiles "
                 f"over models in {BINS} depth bins", loc="left")
    ax.legend(loc="upper right", ncols=4)
    return fig


def _family_pages(curves: Sequence[Mapping[str, Any]]):
    families: dict[str, list[Mapping[str, Any]]] = {}
    for curve in curves:
        families.setdefault(curve["family"], []).append(curve)
    names = sorted(families, key=lambda name: (-len(families[name]), name))
    figures = []
    chunks = style.pages(names, PANELS_PER_PAGE)
    for page, chunk in enumerate(chunks, start=1):
        cols = 4
        rows = -(-len(chunk) // cols)
        fig = style.new_figure(style.FULL, 0.3 + 1.55 * rows)
        axes, _ = style.panels(fig, rows, cols, 1.55, legend=False)
        for index, ax in enumerate(axes.flat):
            if index >= len(chunk):
                ax.axis("off")
                continue
            members = families[chunk[index]]
            _draw(ax, members, alpha=min(0.6, _alpha(len(members)) * 3), label_stats=False)
            ax.set_title(f"{chunk[index]} ({len(members)})", loc="left")
            if index % cols:
                ax.tick_params(labelleft=False)
            if index < len(chunk) - cols:
                ax.tick_params(labelbottom=False)
        more = f" · page {page} of {len(chunks)}" if len(chunks) > 1 else ""
        fig.supxlabel("relative depth")
        fig.supylabel("$n_l$")
        fig.suptitle(f"n_l against relative depth per family, largest families first{more}; "
                     "black: the median, orange: the quartiles over the family's models", fontsize=8)
        figures.append(fig)
    return figures


def _draw(ax, curves: Sequence[Mapping[str, Any]], alpha: float, label_stats: bool) -> None:
    ax.axhspan(0.5 - FAR, 0.5 + FAR, color=style.PALETTE["grey"], alpha=0.08, lw=0,
               label=f"|$n_l$ - 0.5| ≤ {FAR}" if label_stats else None)
    ax.axhline(0.5, color=style.PALETTE["grey"], lw=0.6, ls="--")
    for curve in curves:
        ax.plot(curve["depth"], curve["n_l"], color=style.PALETTE["blue"], lw=0.4, alpha=alpha,
                marker="o" if len(curve["n_l"]) == 1 else None, ms=1.5, zorder=1)
    centres, low, median, high = model_quartiles(curves)
    ax.fill_between(centres, low, high, color=style.PALETTE["orange"], alpha=0.45, lw=0, zorder=3,
                    label="quartiles over models" if label_stats else None)
    for edge in (low, high):
        ax.plot(centres, edge, color=style.PALETTE["vermillion"], lw=0.7, zorder=3)
    ax.plot(centres, median, color="black", lw=1.3, zorder=4, label="median over models" if label_stats else None)
    if label_stats:
        ax.plot([], [], color=style.PALETTE["blue"], lw=0.8, label="one model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def model_quartiles(curves: Sequence[Mapping[str, Any]]):
    """Per depth bin, the quartiles over models of each model's mean n_l in that bin (every model counts
    once, however many layers it has there): (bin centres, first quartile, median, third quartile)."""
    import numpy as np

    per_bin: list[list[float]] = [[] for _ in range(BINS)]
    for curve in curves:
        depth, n_l = np.asarray(curve["depth"], float), np.asarray(curve["n_l"], float)
        which = np.minimum((depth * BINS).astype(int), BINS - 1)
        for b in np.unique(which):
            per_bin[b].append(float(n_l[which == b].mean()))
    filled = [b for b in range(BINS) if per_bin[b]]
    quartiles = [np.percentile(per_bin[b], [25, 50, 75]) for b in filled]
    centres = [(b + 0.5) / BINS for b in filled]
    return centres, [q[0] for q in quartiles], [q[1] for q in quartiles], [q[2] for q in quartiles]


def _alpha(count: int) -> float:
    """Faint enough that hundreds of lines show where models crowd, visible for a handful."""
    return float(min(0.8, max(0.015, 4.0 / max(count, 1))))
