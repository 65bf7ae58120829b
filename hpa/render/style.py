"""The house style shared by every hpa figure, and the options a user sets for them.

One look for all figures: fonts legible when a figure is printed one column
(3.3 in) or the full text width (6.9 in) of a two-column paper, one dpi,
constrained layout, TrueType (Type 42) fonts in PDFs, colour-blind-safe
colours.  Whatever the user's ``matplotlibrc`` sets wins over the house style,
and ``--dpi`` wins over both.

Renderers (a statistic's ``plot``) draw with :func:`new_figure`, save with
:func:`save` and read the user's choices from :func:`current`.  matplotlib is
imported only when a figure is drawn, never by importing this module.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from hpa.errors import OptionError

COLUMN = 3.3  # inches: one column of a two-column paper
FULL = 6.9  # inches: the full text width
HOUSE_DPI = 200  # 6.9 in -> 1380 px: sharp in print, small enough to open anywhere
FORMATS = ("png", "pdf", "svg")

#: Okabe & Ito's colour-blind-safe palette (no yellow: it vanishes on white).
PALETTE = {"blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "vermillion": "#D55E00",
           "sky": "#56B4E9", "purple": "#CC79A7", "grey": "#555555"}
#: Trained against init, as in Gamba et al. 2020 Fig. 1 (init blue, trained orange).  They also differ
#: in line style and fill (solid and filled against dashed and hatched), so greyscale keeps them apart.
TRAINED = PALETTE["vermillion"]
INIT = PALETTE["blue"]
INIT_HATCH = "////"

# Applied only where the user's matplotlibrc leaves matplotlib's default.
_HOUSE = {
    "font.size": 8, "axes.titlesize": 7.5, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 8, "figure.labelsize": 8,
    "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
    "xtick.major.size": 2.5, "ytick.major.size": 2.5, "lines.linewidth": 1.1, "lines.markersize": 4,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    "hatch.linewidth": 0.6, "savefig.dpi": HOUSE_DPI, "figure.dpi": 100,
}
# Always: reviewers and publishers reject Type 3 fonts.
_FORCED = {"pdf.fonttype": 42, "ps.fonttype": 42}


@dataclass(frozen=True)
class FigureOptions:
    """What the user chose for the figures (``--format``, ``--dpi``, ``--hist-range``, ``--layers``)."""

    format: str = "png"  # one of FORMATS
    dpi: float | None = None  # None: savefig.dpi of the user's matplotlibrc, else HOUSE_DPI
    hist_range: float | None = None  # half-width of histogram x ranges; None: chosen from the data
    layers: str | None = None  # fnmatch patterns, comma-separated, choosing layers; None: all

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise OptionError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.dpi is not None and not 10 <= self.dpi <= 2400:
            raise OptionError(f"--dpi must be between 10 and 2400, not {self.dpi}")
        if self.hist_range is not None and not 0 < self.hist_range <= 1:
            raise OptionError(f"--hist-range is the half-width of the cosine axis, in (0, 1]; "
                              f"not {self.hist_range}")


_CURRENT: ContextVar[FigureOptions] = ContextVar("hpa_figure_options", default=FigureOptions())


def current() -> FigureOptions:
    """The options of the figures being drawn now (defaults outside :func:`drawing`)."""
    return _CURRENT.get()


@contextmanager
def drawing(options: FigureOptions) -> Iterator[None]:
    """Draw with ``options`` and the house style (the user's matplotlibrc still wins)."""
    import matplotlib

    token = _CURRENT.set(options)
    try:
        with matplotlib.rc_context(house_rc()):
            yield
    finally:
        _CURRENT.reset(token)


def house_rc() -> dict[str, Any]:
    """The house rcParams, less those the user set in a matplotlibrc or in code."""
    import matplotlib

    params = {key: value for key, value in _HOUSE.items()
              if matplotlib.rcParams[key] == matplotlib.rcParamsDefault[key]}
    return params | _FORCED


def new_figure(width: float, height: float):
    """A pyplot-free Figure (no global state, no GUI backend) with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def panels(fig, rows: int, cols: int, panel_height: float, legend: bool, **kwargs):
    """A rows x cols array of axes, under a thin legend strip when ``legend``; returns (axes, strip).

    The strip is an axes of its own, so constrained layout keeps the legend clear of the
    title, the panels and the shared axis labels.
    """
    import numpy as np

    ratios = ([0.24 / panel_height] if legend else []) + [1.0] * rows
    grid = fig.add_gridspec(rows + int(legend), cols, height_ratios=ratios)
    strip = fig.add_subplot(grid[0, :]) if legend else None
    if strip is not None:
        strip.axis("off")
    first = int(legend)
    axes = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            share = {k: axes[0, 0] for k in ("sharex",) if kwargs.get(k) and (r or c)}
            axes[r, c] = fig.add_subplot(grid[first + r, c], **share)
    return axes, strip


def legend_strip(strip, handles, labels, ncols: int | None = None) -> None:
    """The figure's legend, centred in its strip, entries side by side."""
    strip.legend(handles, labels, loc="center", ncols=ncols or len(handles), borderaxespad=0,
                 handlelength=2.4, columnspacing=1.6)


def save(figures: Sequence[Any], stem: Path, fmt: str) -> list[Path]:
    """Write one page per figure: ``stem.fmt``, or a multi-page PDF, or ``stem-1.fmt``, ``stem-2.fmt``..."""
    dpi = current().dpi  # None: savefig.dpi from rcParams (the user's matplotlibrc, else the house dpi)
    if len(figures) == 1 or fmt == "pdf":
        path = stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "pdf":
            from matplotlib.backends.backend_pdf import PdfPages

            with PdfPages(path) as pdf:
                for figure in figures:
                    pdf.savefig(figure, dpi=dpi)
        else:
            figures[0].savefig(path, dpi=dpi)
        return [path]
    paths = [stem.with_name(f"{stem.name}-{page}.{fmt}") for page in range(1, len(figures) + 1)]
    for figure, path in zip(figures, paths):
        figure.savefig(path, dpi=dpi)
    return paths


def caption(result) -> str:
    """'vgg16 · weights none · input 3×64×64 · compared with init (weights none, seed 0)'."""
    source = result.graph.source
    name = source.get("model") or source.get("spec") or "model"
    weights = source.get("weights") or "default"
    size = source.get("input_size") or result.graph.input_shape or result.options.get("input_size")
    parts = [str(name), f"weights {weights}"]
    if size:
        parts.append("input " + "×".join(str(int(s)) for s in size))
    if result.init is not None:
        init = result.init.source
        seed = f", seed {init['seed']}" if init.get("seed") is not None else ""
        parts.append(f"compared with init (weights {init.get('weights') or 'snapshot'}{seed})")
    return " · ".join(parts)


def title(fig, caption: str, more: str = "") -> None:
    """``caption`` as the figure's title, broken at its " · " separators to fit the figure's width."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.font_manager import FontProperties

    size = matplotlib.rcParams["figure.titlesize"]
    points = size if isinstance(size, (int, float)) else 9.0
    renderer, font = FigureCanvasAgg(fig).get_renderer(), FontProperties(size=points)

    def fits(text: str) -> bool:  # measured in the figure's font, with a margin either side
        width = renderer.get_text_width_height_descent(text, font, ismath=False)[0]
        return width <= 0.94 * fig.get_figwidth() * fig.dpi

    lines: list[str] = []
    for part in caption.split(" · "):
        if lines and fits(lines[-1] + " · " + part):
            lines[-1] += " · " + part
        else:
            lines.append(part)
    lines += [more] if more else []
    # Each line past the first makes the figure taller by its height, so a long caption does not squeeze the panels.
    fig.set_figheight(fig.get_figheight() + (len(lines) - 1) * points * 1.25 / 72)
    fig.suptitle("\n".join(lines))


def panel_title(ax, text: str, sep: str = " → ") -> None:
    """``text`` as the panel's title, broken after ``sep`` when one line is wider than the panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(ax.figure).get_renderer()  # a pyplot-free canvas, to measure the text
    title = ax.set_title(text)
    if sep in text and title.get_window_extent(renderer).width > ax.get_window_extent(renderer).width:
        head, tail = text.split(sep, 1)
        ax.set_title(f"{head}{sep.rstrip()}\n{tail}")


def select(names: Sequence[str], pattern: str | None) -> list[str]:
    """``names`` matching ``pattern`` (comma-separated fnmatch patterns), in their order."""
    if not pattern:
        return list(names)
    patterns = [p.strip() for p in pattern.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``value``, at most 1."""
    if not value > 0 or value >= 1:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return min(1.0, step * power)
    return 1.0


def short(text: str, limit: int = 24) -> str:
    """``text`` cut in the middle with '…' when longer than ``limit`` (keeps both ends of layer names)."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def pages(items: Sequence[Any], per_page: int) -> list[Sequence[Any]]:
    """``items`` in consecutive chunks of at most ``per_page``."""
    return [items[start:start + per_page] for start in range(0, len(items), per_page)] or [items]
