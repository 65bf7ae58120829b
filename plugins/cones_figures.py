"""Figures of the cone statistics, after Gamba et al. 2019 (Fig. 1).

``cones_states``: the four nesting states per layer pair as stacked horizontal
bars, init hatched beside trained.  ``cones_distributions``: the distribution
of the per-cone means of |d|, |delta| and rho as heat maps, one row per pair
(so it works for 3 pairs or 40), trained and init in separate panels.  Both
read only the pairs' JSON-ready entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpa.render import style

STATES = ("OUT_FULL_IN", "IN_FULL_OUT", "OUT_PARTIAL_IN", "IN_PARTIAL_OUT")
_COLOURS = {"OUT_FULL_IN": style.PALETTE["blue"], "IN_FULL_OUT": style.PALETTE["orange"],
            "OUT_PARTIAL_IN": style.PALETTE["green"], "IN_PARTIAL_OUT": style.PALETTE["purple"]}
_CONTINUOUS = (("distance", "apex distance |d|"), ("opening", "opening offset |δ|"), ("rotation", "rotation ρ"))
PAIRS_PER_PAGE = 30  # bars per page of cones_states: keeps the labels at the house font size


def cone_figures(pairs: list[dict[str, Any]], caption: str, directory: Path, fmt: str) -> list[Path]:
    """``cones_states.<fmt>`` and ``cones_distributions.<fmt>``; nothing when there are no pairs."""
    pattern = style.current().layers  # a pair is drawn when either of its layers is chosen
    pairs = [e for e in pairs if style.select([e["lower"], e["upper"]], pattern)]
    if not pairs:
        return []
    written = states_figure(pairs, caption, directory / "cones_states", fmt)
    if any(len(entry.get("histograms", {})) > 1 for entry in pairs):
        written += distributions_figure(pairs, caption, directory / "cones_distributions", fmt)
    return written


def _label(entry: dict[str, Any]) -> str:
    return f"{style.short(entry['lower'], 20)} → {style.short(entry['upper'], 20)}"


# -- states ------------------------------------------------------------------------------------------

def states_figure(pairs: list[dict[str, Any]], caption: str, stem: Path, fmt: str) -> list[Path]:
    chunks = style.pages(pairs, PAIRS_PER_PAGE)
    figures = [_states_page(chunk, caption, page, len(chunks)) for page, chunk in enumerate(chunks, 1)]
    return style.save(figures, stem, fmt)


def _states_page(pairs, caption: str, page: int, n_pages: int):
    from matplotlib.patches import Patch

    with_init = any("init" in entry for entry in pairs)
    bar_rows = len(pairs) * (2 if with_init else 1)
    wide = max(len(_label(e)) for e in pairs) > 30 or len(pairs) > 16  # else the labels leave the bars room
    fig = style.new_figure(style.FULL if wide else style.COLUMN, 1.5 + 0.11 * bar_rows + 0.06 * len(pairs))
    ax = fig.subplots()
    height = 0.4 if with_init else 0.7
    ys = list(range(len(pairs)))
    # with init: trained the upper bar of each pair, init the lower, hatched
    sources = [("trained", None, -height / 2 if with_init else 0.0)] + (
        [("init", style.INIT_HATCH, height / 2)] if with_init else [])
    for which, hatch, offset in sources:
        left = [0.0] * len(pairs)
        for state in STATES:
            widths = [_fraction(entry if which == "trained" else entry.get("init"), state) for entry in pairs]
            ax.barh([y + offset for y in ys], widths, height, left=left,
                    color=_COLOURS[state], hatch=hatch, edgecolor="white", linewidth=0.4)
            left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys, [_label(e) for e in pairs])
    ax.invert_yaxis()  # first pair on top, as the table lists them
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of cones")
    ax.spines[["left"]].set_visible(False)
    ax.tick_params(axis="y", length=0)
    handles = [Patch(facecolor=_COLOURS[s], label=s) for s in STATES]
    if with_init:
        handles += [Patch(facecolor="0.75", edgecolor="white", label="trained (upper bar)"),
                    Patch(facecolor="0.75", edgecolor="white", hatch=style.INIT_HATCH, label="init (lower, hatched)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2 if not wide else 3)
    more = f", page {page} of {n_pages}" if n_pages > 1 else ""
    style.title(fig, caption, f"states of the non-degenerate cones per layer pair{more}")
    return fig


def _fraction(entry: dict[str, Any] | None, state: str) -> float:
    value = (entry or {}).get("fractions", {}).get(state)
    return value or 0.0


# -- distributions ---------------------------------------------------------------------------------

NAMED_PAIRS = 12  # up to this many pairs, the rows are labelled with the pairs' names


def distributions_figure(pairs: list[dict[str, Any]], caption: str, stem: Path, fmt: str) -> list[Path]:
    """One heat map per statistic: a row per layer pair, the shade the fraction of its cones per bin.

    A row per pair works for 3 pairs or 40 (lines overlap; a legend of 34 entries does not
    fit), shows mass at 0 as a dark first column, and prints in greyscale.
    """
    from matplotlib.colors import PowerNorm

    rows = [("trained", lambda e: e)] + ([("init", lambda e: e.get("init"))] if any("init" in e for e in pairs)
                                         else [])
    named = len(pairs) <= NAMED_PAIRS
    # named rows need room for a label; numbered rows shrink, so 40 pairs still fit a page
    panel = 0.11 * max(len(pairs), 6) if named else min(2.6, 1.32 + 0.02 * len(pairs))
    height = 0.9 + len(rows) * (0.35 + panel)
    fig = style.new_figure(style.FULL, height)
    axes = fig.subplots(len(rows), 3, squeeze=False, sharex=True, sharey=True)
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=1)  # the square root keeps the tails visible beside a peak
    image = None
    for row, (which, pick) in enumerate(rows):
        for col, (key, title) in enumerate(_CONTINUOUS):
            ax = axes[row, col]
            image = _heat_map(ax, [pick(e) for e in pairs], key, norm) or image
            ax.set_title(f"{title} · {which}")
        labels = [_label(e) for e in pairs] if named else None
        _pair_axis(axes[row, 0], len(pairs), labels)
    for ax in axes.flat:
        ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.tick_params(axis="y", length=0)
        ax.spines[["left", "bottom"]].set_position(("outward", 2))  # mass at 0 stays clear of the spine
    fig.supxlabel("per-cone mean over the predecessors of each cone")
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8, aspect=25, pad=0.02)
        bar.set_label("fraction of the pair's cones")
    style.title(fig, caption)
    return style.save([fig], stem, fmt)


def _heat_map(ax, entries: list[dict[str, Any] | None], key: str, norm):
    """Rows of per-bin fractions; None (and a note) when no pair has this statistic."""
    import numpy as np

    rows, extent = [], None
    for entry in entries:
        histograms = (entry or {}).get("histograms", {})
        counts = np.asarray(histograms.get(key) or [], dtype=float)
        if counts.sum() > 0:
            low, high = histograms.get("range", (0.0, 1.0))
            extent = (low, high)
            rows.append(counts / counts.sum())
        else:
            rows.append(None)
    if extent is None:
        ax.text(0.5, 0.5, "not computed\n(no plane size)", ha="center", va="center", transform=ax.transAxes)
        return None
    width = max(len(r) for r in rows if r is not None)
    grid = np.array([r if r is not None and len(r) == width else np.full(width, np.nan) for r in rows])
    return ax.imshow(grid, aspect="auto", cmap="Blues", norm=norm, interpolation="nearest",
                     extent=(extent[0], extent[1], len(rows) - 0.5, -0.5))


def _pair_axis(ax, count: int, labels: list[str] | None) -> None:
    """Pair names on the first panel of a row when they fit, else pair numbers (as in pairs.csv)."""
    if labels is not None:
        ax.set_yticks(range(count), labels)
    else:
        step = max(1, -(-count // 8))
        ax.set_yticks(range(0, count, step))
        ax.set_ylabel("layer pair (row of pairs.csv)")


# -- over the epochs of a training run --------------------------------------------------------------

PAIRS_OVER_EPOCHS = 12  # panels per page of cones_states_epochs (3 columns)


def cones_series_figures(series, directory: Path, fmt: str) -> list[Path]:
    """``cones_states_epochs``: each state's fraction per layer pair over epochs (Gamba et al. 2019 Fig. 1)."""
    curves = _state_curves(series)
    pattern = style.current().layers
    pairs = [p for p in curves if style.select(list(p), pattern)]
    if not pairs:
        return []
    chunks = style.pages(pairs, PAIRS_OVER_EPOCHS)
    figures = [_states_epochs_page(series, curves, chunk, page, len(chunks)) for page, chunk in enumerate(chunks, 1)]
    return style.save(figures, directory / "cones_states_epochs", fmt)


def _state_curves(series) -> dict[tuple[str, str], dict[str, dict[int, tuple[list[int], list[float]]]]]:
    """(lower, upper) -> state -> seed -> (epochs, fractions), read from each epoch's stored result."""
    curves: dict = {}
    for seed, epoch, result in sorted(series.results(), key=lambda item: item[:2]):
        for entry in result.get("pairs") or []:
            states = curves.setdefault((entry["lower"], entry["upper"]), {})
            for state in STATES:
                epochs, values = states.setdefault(state, {}).setdefault(seed, ([], []))
                epochs.append(epoch)
                values.append(_fraction(entry, state))
    return curves


def _states_epochs_page(series, curves, pairs, page: int, n_pages: int):
    import math

    from matplotlib.lines import Line2D

    from hpa.render import series as over_epochs

    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = style.new_figure(style.COLUMN if cols == 1 else style.FULL, 1.55 * rows + 1.3)
    axes, strip = style.panels(fig, rows, cols, 1.55, legend=True, sharex=True)
    for ax, pair in zip(axes.flat, pairs):
        over_epochs.mark_decays(ax, series.decay_epochs)
        for state in STATES:
            over_epochs.draw_curve(ax, curves[pair][state], _COLOURS[state], state)
        style.panel_title(ax, f"{style.short(pair[0], 20)} → {style.short(pair[1], 20)}")
        ax.set_ylim(-0.02, 1.02)
        over_epochs.epoch_axis(ax)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    fig.supxlabel("epoch")
    fig.supylabel("fraction of cones")
    handles = [Line2D([], [], color=_COLOURS[s]) for s in STATES]
    style.legend_strip(strip, handles, list(STATES), ncols=4)
    notes = [over_epochs.seeds_note(series), over_epochs.decay_note(series),
             f"page {page} of {n_pages}" if n_pages > 1 else ""]
    style.title(fig, series.caption, " · ".join(filter(None, notes)))
    return fig
