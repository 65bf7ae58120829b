"""Figures of a study: cells compared (one curve per cell), and a figure in the 2020 paper's layout.

Both are drawn with the curve helpers of :mod:`hpa.render.series` (``draw_curve``: one seed's line,
or the mean over seeds with a band of ± 1 std; ``mark_decays``: red ticks at the step decays of the
learning rate), so they look like every other figure over epochs.

- ``compare-training``: validation accuracy and training loss, one curve per cell;
- ``compare-n_l``: a panel per layer, ``n_l`` over epochs, one curve per cell;
- ``paper_figure``: Gamba et al. 2020 Figs. 7 and 21 as printed: ``n_l`` of layers 1–7, then of
  layers 8 onwards (Fig. 7: 8–16), then the train and validation loss and accuracy, each divided by
  its maximum, stacked in rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from hpa.render import series as curves
from hpa.render import style

N_L = "projection.n_l"
N_L_LABEL = "$n_l$ (fraction of\nnegative cosines)"
EARLY_LAYERS = 7  # Gamba et al. 2020 Fig. 7: layers 1-7, then 8-16
PANEL_COLUMNS = 4


def cell_colours(count: int) -> list[str]:
    """Distinct colours for the cells: the house palette, then viridis when there are more."""
    palette = [style.PALETTE[name] for name in ("blue", "vermillion", "green", "orange", "purple", "sky", "grey")]
    return palette[:count] if count <= len(palette) else curves.depth_colours(count)


def comparison_figures(cells: Mapping[str, curves.RunSeries], folder: Path, fmt: str, caption: str) -> list[Path]:
    """``compare-training`` and, when the cells ran the projection statistic, ``compare-n_l``."""
    folder.mkdir(parents=True, exist_ok=True)
    with style.drawing(style.FigureOptions(format=fmt)):
        written = _training(cells, folder / "compare-training", fmt, caption)
        if any(series.layer_curves(N_L) for series in cells.values()):
            written += _per_layer(cells, N_L, N_L_LABEL, folder / "compare-n_l", fmt, caption)
    return written


def _seeds_text(cells: Mapping[str, curves.RunSeries]) -> str:
    counts = sorted({len(series.seeds) for series in cells.values()})
    if counts == [1]:
        return "one seed per cell"
    return f"mean ± 1 std over {'-'.join(map(str, (counts[0], counts[-1]) if len(counts) > 1 else counts))} seeds"


def _common_decays(cells: Mapping[str, curves.RunSeries]) -> tuple[int, ...]:
    """Red ticks only where every cell decays (cells of different schedules get none)."""
    decays = {series.decay_epochs for series in cells.values()}
    return next(iter(decays)) if len(decays) == 1 else ()


def _training(cells, stem: Path, fmt: str, caption: str) -> list[Path]:
    fig = style.new_figure(style.FULL, curves.PANEL_HEIGHT + 1.3)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    colours = dict(zip(cells, cell_colours(len(cells))))
    for ax, (key, label) in zip(axes, (("val_accuracy", "validation accuracy"), ("train_loss", "training loss"))):
        curves.mark_decays(ax, _common_decays(cells))
        for name, series in cells.items():
            curves.draw_curve(ax, series.metric_curve(key), colours[name], style.short(name, 40),
                              **series.line_style())
        ax.set_ylabel(label)
        curves.epoch_axis(ax)
    if axes[0].get_legend_handles_labels()[0]:  # a study without a validation split has no such curve
        axes[0].legend(loc="best", fontsize=6)
    fig.supxlabel("epoch")
    style.title(fig, caption, _seeds_text(cells))
    return style.save([fig], stem, fmt)


def _per_layer(cells, column: str, ylabel: str, stem: Path, fmt: str, caption: str) -> list[Path]:
    layers = _layers(cells, column)
    rows = math.ceil(len(layers) / PANEL_COLUMNS)
    cols = min(PANEL_COLUMNS, len(layers))
    fig = style.new_figure(style.FULL, 1.45 * rows + 1.1)
    axes, strip = style.panels(fig, rows, cols, 1.45, legend=True, sharex=True)
    colours = dict(zip(cells, cell_colours(len(cells))))
    decays = _common_decays(cells)
    for index, (ax, layer) in enumerate(zip(axes.flat, layers), 1):
        ax.axhline(0.5, color="0.3", linewidth=0.6, linestyle=":")
        curves.mark_decays(ax, decays)
        for name, series in cells.items():
            curve = series.layer_curves(column).get(layer)
            if curve:
                curves.draw_curve(ax, curve, colours[name], name, **series.line_style())
        ax.set_title(f"{index}: {style.short(layer, 20)}")
        ax.set_ylim(-0.03, 1.03)
        curves.epoch_axis(ax)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    handles = [_line(colours[name]) for name in cells]
    style.legend_strip(strip, handles, [style.short(name, 40) for name in cells], ncols=min(len(cells), 3))
    fig.supxlabel("epoch")
    fig.supylabel(ylabel.replace("\n", " "))
    style.title(fig, caption, _seeds_text(cells))
    return style.save([fig], stem, fmt)


def _layers(cells, column: str) -> list[str]:
    names: list[str] = []
    for series in cells.values():
        names += [name for name in series.layer_curves(column) if name not in names]
    return names


def _line(colour: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour)


# -- the paper's layout ---------------------------------------------------------------------------

def paper_figure(series: curves.RunSeries, stem: Path, fmt: str, title: str, note: str = "",
                 early: int = EARLY_LAYERS, layers: Sequence[str] | None = None) -> list[Path]:
    """``n_l`` of layers 1..early, of the rest, then train/validation loss and accuracy over their maxima."""
    found = series.layer_curves(N_L)
    names = [name for name in (layers or found) if name in found]
    groups = [(f"layers 1–{min(early, len(names))}", names[:early])]
    if len(names) > early:
        groups.append((f"layers {early + 1}–{len(names)}", names[early:]))
    fig = style.new_figure(style.COLUMN * 1.45, 1.75 * (len(groups) + 1) + 0.8)
    axes = fig.subplots(len(groups) + 1, 1, squeeze=False, sharex=True)[:, 0]
    colours = dict(zip(names, curves.depth_colours(len(names))))
    for ax, (label, chosen) in zip(axes, groups):
        ax.axhline(0.5, color="0.3", linewidth=0.6, linestyle=":")
        curves.mark_decays(ax, series.decay_epochs)
        for number, name in enumerate(chosen, names.index(chosen[0]) + 1):
            curves.draw_curve(ax, found[name], colours[name], str(number), **series.line_style())
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(f"$n_l$, {label}")
        ax.legend(ncols=min(len(chosen), 5), fontsize=5.5, handlelength=1.2, columnspacing=0.8, loc="best",
                  title="layer", title_fontsize=5.5)
    _training_panel(axes[-1], series)
    curves.epoch_axis(axes[-1])
    axes[-1].set_xlabel("epoch")
    style.title(fig, " · ".join(filter(None, (title, curves.seeds_note(series), curves.decay_note(series), note))))
    return style.save([fig], stem, fmt)


def _training_panel(ax, series: curves.RunSeries) -> None:
    """Train and validation loss and accuracy, each divided by its maximum (the paper's bottom panel)."""
    curves.mark_decays(ax, series.decay_epochs)
    lines = [("train_loss", "train loss", style.PALETTE["vermillion"], "-"),
             ("val_loss", "val loss", style.PALETTE["vermillion"], (0, (3, 1.5))),
             ("train_accuracy", "train acc", style.PALETTE["blue"], "-"),
             ("val_accuracy", "val acc", style.PALETTE["blue"], (0, (3, 1.5)))]
    for key, label, colour, dash in lines:
        curves.draw_curve(ax, series.metric_curve(key, rescale=True), colour, label, linestyle=dash,
                          **series.line_style())
    ax.set_ylim(0, 1.04)
    ax.set_ylabel("loss, accuracy\n/ their maximum")
    ax.legend(ncols=2, fontsize=5.5, loc="best")
