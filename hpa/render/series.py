"""Figures over the epochs of a training run, in the house style of :mod:`hpa.render.style`.

Generic curves live here: the training curves (loss and accuracy rescaled by
their maximum, as Gamba et al. 2020 draws them) and any per-layer column of
``series.csv`` with early and late layers in separate panels.  Each curve is
one seed's values, or over several seeds their mean with a ±1 std band
(Gamba et al. 2020 Fig. 7).  As the paper draws them (A.1), the step decays of
the learning rate are red ticks on the epoch axis of every panel; a smooth
schedule has none, and the caption names the schedule.  Runs longer than
``MARKERS_UP_TO`` epochs are drawn as lines without a marker at every epoch.

Figures of one statistic come from its ``Statistic.plot_series``, which
receives a :class:`RunSeries` and draws with the helpers below, so a
third-party statistic draws its values over epochs like the built-ins.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from hpa.errors import HpaWarning
from hpa.render import style

#: What a Statistic's ``plot_series`` may use: the series it receives and the curve helpers.
__all__ = ["RunSeries", "decay_note", "depth_colours", "draw_curve", "early_late", "epoch_axis", "layer_figure",
           "mark_decays", "mean_std", "seeds_note"]

PANEL_HEIGHT = 1.9  # inches, one row of panels
MARKERS_UP_TO = 40  # epochs; a longer run's markers would merge into a string of dots
# Per seed: (epochs, values) in epoch order.
Curve = Mapping[int, tuple[list[int], list[float]]]


@dataclass(frozen=True)
class RunSeries:
    """A run's values over epochs, for one seed or several; what ``plot_series`` receives."""

    rows: list[dict[str, Any]]  # series.csv rows: "seed", "epoch" (int), "layer", numbers as float or None
    metrics: list[dict[str, Any]]  # metrics.jsonl lines, each with its "seed"
    layers: tuple[str, ...]  # layer names in execution order (graph.json)
    decay_epochs: tuple[int, ...]  # the last epoch trained before each step decay (none for a smooth schedule)
    caption: str  # "digits · cifar:small_max · seed 0"
    statistics: tuple[str, ...]  # the statistics that ran on the snapshots
    # (seed, epoch, result dict) for every stats/epoch-NNN.json, for values that are not per layer
    results: Callable[[], Iterator[tuple[int, int, dict[str, Any]]]]

    schedule: str = ""  # how the learning rate moved, for the caption: "step decay ÷10 every 25 epochs"

    @property
    def seeds(self) -> list[int]:
        return sorted({int(m["seed"]) for m in self.metrics} | {int(r["seed"]) for r in self.rows})

    @property
    def last_epoch(self) -> int:
        return max([int(m["epoch"]) for m in self.metrics] + [int(r["epoch"]) for r in self.rows] + [0])

    def line_style(self) -> dict[str, Any]:
        """Markers at every epoch for short runs; plain lines past ``MARKERS_UP_TO`` epochs."""
        return {"marker": "o", "markersize": 2.2} if self.last_epoch <= MARKERS_UP_TO else {}

    def layer_curves(self, column: str) -> dict[str, Curve]:
        """``column`` of series.csv per layer (execution order) and seed; layers without a value are left out."""
        found: dict[str, dict[int, tuple[list[int], list[float]]]] = {}
        for row in sorted(self.rows, key=lambda r: (r["seed"], r["epoch"])):
            value = row.get(column)
            if value is None or not math.isfinite(value):
                continue
            epochs, values = found.setdefault(row["layer"], {}).setdefault(row["seed"], ([], []))
            epochs.append(row["epoch"])
            values.append(value)
        order = {name: n for n, name in enumerate(self.layers)}
        return {name: found[name] for name in sorted(found, key=lambda n: order.get(n, len(order)))}

    def metric_curve(self, key: str, rescale: bool = False) -> Curve:
        """A metrics.jsonl column per seed; ``rescale`` divides each seed's values by their maximum."""
        out: dict[int, tuple[list[int], list[float]]] = {}
        for line in sorted(self.metrics, key=lambda m: (m["seed"], m["epoch"])):
            value = line.get(key)
            if value is None or not math.isfinite(value):
                continue
            epochs, values = out.setdefault(line["seed"], ([], []))
            epochs.append(line["epoch"])
            values.append(float(value))
        if rescale:
            out = {seed: (e, [v / max(map(abs, vs)) if max(map(abs, vs)) else v for v in vs])
                   for seed, (e, vs) in out.items()}
        return out


def decay_epochs(metrics: Iterable[Mapping[str, Any]]) -> tuple[int, ...]:
    """Epochs after which the learning rate dropped (the lr of epoch e+1 is below that of epoch e)."""
    rates = {int(m["epoch"]): m["lr"] for m in metrics if m.get("lr") is not None}
    return tuple(sorted(e - 1 for e in rates if e - 1 in rates and rates[e] < rates[e - 1]))


def schedule_text(recipe: Mapping[str, Any]) -> str:
    """The recipe's learning-rate schedule in a few words, for captions."""
    lr = f"lr {recipe.get('lr'):g}"
    if recipe.get("schedule") == "step":
        return f"{lr}, step decay ×{recipe.get('step_factor'):g} every {recipe.get('step_epochs')} epochs"
    if recipe.get("schedule") == "exponential":
        return f"{lr}, exponential decay ×{recipe.get('gamma'):.4g} per epoch"
    return f"{lr}, constant"


# -- drawing helpers, for plot_series implementations ---------------------------------------

def mean_std(curve: Curve) -> tuple[list[int], list[float], list[float]]:
    """Epochs every seed has, with the mean and the (population) standard deviation over seeds."""
    import numpy as np

    common = sorted(set.intersection(*(set(epochs) for epochs, _ in curve.values())))
    stacked = np.array([[dict(zip(epochs, values))[e] for e in common] for epochs, values in curve.values()])
    return common, stacked.mean(axis=0).tolist(), stacked.std(axis=0).tolist()


def draw_curve(ax, curve: Curve, colour: str, label: str, **line) -> None:
    """One seed: its line.  Several: the mean, and a band of ±1 std in the same colour."""
    if not curve:
        return
    if len(curve) == 1:
        epochs, values = next(iter(curve.values()))
        ax.plot(epochs, values, color=colour, label=label, **line)
        return
    epochs, mean, std = mean_std(curve)
    ax.plot(epochs, mean, color=colour, label=label, **line)
    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=colour, alpha=0.2, linewidth=0)


def pixels_text(normalisation: Mapping[str, Any]) -> str:
    """run.json's ``normalisation`` in a few words, for captions ("" when not recorded)."""
    mean, std = set(normalisation.get("mean", ())), set(normalisation.get("std", ()))
    if mean == {0.5} and std == {0.5}:
        return "pixels in [-1, 1]"
    if mean == {0.0} and std == {1.0}:
        return "pixels in [0, 1]"
    if not mean:
        return ""
    whose = "training split's" if normalisation.get("pixels") == "standardised" else "task's"
    return f"pixels standardised (the {whose} channel mean and std)"


def mark_decays(ax, epochs: Sequence[int]) -> None:
    """A red tick on the epoch axis at each epoch that ended a step of the learning rate (Gamba et al. 2020 A.1)."""
    if not epochs:
        return
    ax.plot(list(epochs), [0.0] * len(epochs), linestyle="none", marker="|", markersize=7, markeredgewidth=1.4,
            color=style.PALETTE["vermillion"], transform=ax.get_xaxis_transform(), clip_on=False, zorder=5,
            label="_decay")


def depth_colours(count: int) -> list[str]:
    """``count`` colours from light to dark along viridis (shallow to deep), no yellow end."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["viridis"]
    return [to_hex(cmap(0.85 * k / max(count - 1, 1))) for k in range(count)]


def epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def early_late(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The layers split in two halves, (title, names): the first half early, the rest late."""
    names = list(names)
    if len(names) < 2:
        return [("layers", names)]
    half = math.ceil(len(names) / 2)
    late = f"{half + 1}–{len(names)}" if len(names) > half + 1 else str(len(names))
    return [(f"early layers (1–{half})" if half > 1 else "early layer (1)", names[:half]),
            (f"late layers ({late})" if len(names) > half + 1 else f"late layer ({late})", names[half:])]


def seeds_note(series: RunSeries) -> str:
    seeds = series.seeds
    return "" if len(seeds) < 2 else f"mean ± 1 std over {len(seeds)} seeds"


def decay_note(series: RunSeries) -> str:
    """The schedule, and what the red ticks are when there are any."""
    ticks = "red ticks: learning-rate decays" if series.decay_epochs else ""
    return " · ".join(filter(None, (series.schedule, ticks)))


# -- the generic figures ---------------------------------------------------------------------

def layer_figure(series: RunSeries, column: str, stem: Path, fmt: str, ylabel: str, *,
                 limits: tuple[float, float] | None = None, reference: float | None = None) -> list[Path]:
    """``column`` per layer over epochs, early and late layers side by side; nothing when no layer has it."""
    curves = series.layer_curves(column)
    names = style.select(list(curves), style.current().layers)
    if not names:
        return []
    groups = early_late(names)
    fig = style.new_figure(style.FULL if len(groups) > 1 else style.COLUMN, PANEL_HEIGHT + 1.2)
    # A fixed range (n_l) is shared; free ones are not, or deep layers' small values would flatten.
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=limits is not None)[0]
    colours = dict(zip(names, depth_colours(len(names))))
    for ax, (title, chosen) in zip(axes, groups):
        if reference is not None:
            ax.axhline(reference, color="0.3", linewidth=0.7, linestyle=":")
        mark_decays(ax, series.decay_epochs)
        for name in chosen:
            draw_curve(ax, curves[name], colours[name], style.short(name, 18), **series.line_style())
        ax.set_title(title)
        epoch_axis(ax)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.legend(ncols=2 if len(chosen) > 6 else 1, fontsize=6, handlelength=1.6, loc="best")
    axes[0].set_ylabel(ylabel)
    fig.supxlabel("epoch")
    style.title(fig, series.caption, " · ".join(filter(None, (seeds_note(series), decay_note(series)))))
    return style.save([fig], stem, fmt)


def training_figure(series: RunSeries, stem: Path, fmt: str) -> list[Path]:
    """Loss and accuracy, train and validation, each divided by its maximum (Gamba et al. 2020 Fig. 5)."""
    panels = [("loss / its maximum", "loss"), ("accuracy / its maximum", "accuracy")]
    splits = [("train", style.PALETTE["vermillion"], "-"), ("val", style.PALETTE["blue"], (0, (3, 1.5))),
              ("test", style.PALETTE["grey"], (0, (1, 1)))]
    fig = style.new_figure(style.FULL, PANEL_HEIGHT + 0.9)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, (ylabel, what) in zip(axes, panels):
        mark_decays(ax, series.decay_epochs)
        for split, colour, dash in splits:
            curve = series.metric_curve(f"{split}_{what}", rescale=True)
            draw_curve(ax, curve, colour, {"val": "validation"}.get(split, split), linestyle=dash)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.04)
        epoch_axis(ax)
        if ax.get_legend_handles_labels()[0]:  # a run without, say, accuracies (hpa.Tracker's may have none)
            ax.legend(loc="best")
    fig.supxlabel("epoch")
    style.title(fig, series.caption, " · ".join(filter(None, (seeds_note(series), decay_note(series)))))
    return style.save([fig], stem, fmt)


def plot_run(series: RunSeries, folder: Path, fmt: str, statistic_plugins: Mapping[str, Any]) -> list[Path]:
    """The training curves, then each statistic's ``plot_series``; returns the files written.

    A statistic that ran but has no ``plot_series`` (or whose plugin is gone) is
    named in a warning, not dropped silently.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = training_figure(series, folder / "training", fmt) if series.metrics else []
    missing = []
    for name in series.statistics:
        stat = statistic_plugins.get(name)
        if stat is None or getattr(stat, "plot_series", None) is None:
            missing.append(name)
            continue
        written += stat.plot_series(series, folder, fmt)
    if missing:
        warnings.warn(f"no figures over epochs for {', '.join(missing)}: its plugin draws none or is not "
                      "installed", HpaWarning, stacklevel=2)
    return written
