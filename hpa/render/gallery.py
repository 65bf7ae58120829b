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
    ax.legend(loc="upper right", ncols=3)
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
                     "black: the family's median", fontsize=8)
        figures.append(fig)
    return figures


def _draw(ax, curves: Sequence[Mapping[str, Any]], alpha: float, label_stats: bool) -> None:
    import numpy as np

    ax.axhspan(0.5 - FAR, 0.5 + FAR, color=style.PALETTE["grey"], alpha=0.08, lw=0)
    ax.axhline(0.5, color=style.PALETTE["grey"], lw=0.6, ls="--")
    for curve in curves:
        ax.plot(curve["depth"], curve["n_l"], color=style.PALETTE["blue"], lw=0.45, alpha=alpha,
                marker="o" if len(curve["n_l"]) == 1 else None, ms=1.5)
    depth = np.concatenate([np.asarray(c["depth"], float) for c in curves])
    n_l = np.concatenate([np.asarray(c["n_l"], float) for c in curves])
    which = np.minimum((depth * BINS).astype(int), BINS - 1)
    centres, median, low, high = [], [], [], []
    for b in range(BINS):
        inside = n_l[which == b]
        if inside.size:
            centres.append((b + 0.5) / BINS)
            q1, q2, q3 = np.percentile(inside, [25, 50, 75])
            low.append(q1)
            median.append(q2)
            high.append(q3)
    ax.fill_between(centres, low, high, color=style.PALETTE["orange"], alpha=0.35, lw=0,
                    label="quartiles over models" if label_stats else None)
    ax.plot(centres, median, color="black", lw=1.3, label="median over models" if label_stats else None)
    if label_stats:
        ax.plot([], [], color=style.PALETTE["blue"], lw=0.8, label="one model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def _alpha(count: int) -> float:
    """Faint enough that hundreds of lines show where models crowd, visible for a handful."""
    return float(min(0.8, max(0.04, 6.0 / max(count, 1))))
