"""What plugins register (Loader, Statistic, ModuleConverter, Experiment) and the registry that holds them.

Plugins only call ``register``; lookups, collisions and fnmatch listing live here.
Options are in ``hpa/options.py``, spec parsing in ``hpa/specs.py``, recognising a
file by its content in ``hpa/sniff.py``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, TypeVar

from hpa.errors import PluginError, SpecError, suggest
from hpa.options import LoadOptions, Option

if TYPE_CHECKING:
    from hpa.graph import ConvGraph, Skipped
    from hpa.result import ScanResult


@dataclass(frozen=True)
class Loader:
    """A source of models: ``prefix:name`` specs, or plain paths with one of ``suffixes``."""

    prefix: str  # "timm", "onnx", ...
    load: Callable[[str, LoadOptions], ConvGraph]  # (name after the prefix, options) -> graph
    list_models: Callable[[], Iterable[str]] | None = None  # names it can build, for list-models
    # True if load(name, weights="none") builds a seeded fresh init of the architecture
    # and weights=PATH loads a snapshot into it (what --compare-init and --init need).
    builds_init: bool = False
    suffixes: tuple[str, ...] = ()  # file suffixes claimed for plain paths, e.g. (".onnx",)
    description: str = ""
    options: tuple[Option, ...] = ()  # loader-specific options (-o KEY=VALUE)
    # Recognises the loader's files by content (for paths with no or an unknown suffix):
    # path -> True when the file is in this loader's format.  Reads a few bytes, never unpickles.
    sniff: Callable[[Path], bool] | None = None
    # Builds the trainable torch.nn.Module that ``load`` traces: (name, options) -> module.
    # ``load`` is then trace(build(...)); experiments train what build returns.
    build: Callable[[str, LoadOptions], Any] | None = None
    # name -> the init scheme its paper's code used (hpa.experiments.types.INIT_SCHEMES), the
    # default of 'hpa train --arch PREFIX:NAME'; None: every model keeps its own ("default").
    init_scheme: Callable[[str], str] | None = None
    # pretrained -> the names 'hpa gallery PREFIX:PATTERN' matches: one per distinct model at those weights
    # (timm: each pretrained tag, or each architecture for seeded inits); None: list_models.
    gallery_models: Callable[[bool], Iterable[str]] | None = None
    # (name, options) -> None when ``load`` needs nothing from the network (cached weights, a random init,
    # a file); else the shell command that fills the cache on a connected machine, which 'hpa gallery'
    # shows for a model it lists as not cached instead of downloading it.
    download_command: Callable[[str, LoadOptions], str | None] | None = None


@dataclass
class StatisticResult:
    """What one statistic found.  Values must be JSON-ready (lists, floats, None)."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer name -> values
    skipped: list[Skipped] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the result's top level
    # One line per layer whose weights are damaged (NaN or Inf).  The CLI writes all
    # output, then exits with status 2 naming the first, so that scripts notice.
    damaged: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StatisticContext:
    """Everything a statistic may use besides the graph."""

    options: Mapping[str, Any]  # scan options (skip_1x1, with_linear, bins, ...) plus -o extras
    init: ConvGraph | None = None  # the initial graph when comparing against initialisation
    progress: Callable[[str, int, int], None] | None = None  # (what, done, total)


@dataclass(frozen=True)
class Statistic:
    """A statistic computed from the graph alone."""

    name: str
    compute: Callable[[ConvGraph, StatisticContext], StatisticResult]
    description: str = ""
    # Per-layer cells for the terminal table: values of one layer -> {header: text}.
    columns: Callable[[Mapping[str, Any]], dict[str, str]] | None = None
    # Extra text for the terminal after the layer table (e.g. a table of layer pairs).
    report: Callable[[ScanResult], str] | None = None
    # Write figures for this statistic into a folder; returns the files written.
    plot: Callable[[ScanResult, Path, str], list[Path]] | None = None
    # Extra CSV files: result -> {filename: rows (list of dicts)}.
    tables: Callable[[ScanResult], dict[str, list[dict[str, Any]]]] | None = None
    # Why the statistic does not apply to a graph (None: it applies).  A default scan
    # runs only the statistics that apply and records the others with their reason.
    applies: Callable[[ConvGraph], str | None] | None = None
    options: tuple[Option, ...] = ()  # statistic-specific options (-o KEY=VALUE)
    # Figures over the epochs of a training run (one seed or several): (hpa.render.series.RunSeries,
    # folder, format) -> the files written.  The trainer and hpa.open_run(...).plot() call it.
    plot_series: Callable[[Any, Path, str], list[Path]] | None = None
    # The rough cost of a statistic that can take minutes, before it runs: (graph, scan options) ->
    # (the work, as in "12 layer pairs"; CPU seconds).  'hpa scan' prints it when the statistic starts.
    estimate: Callable[[ConvGraph, Mapping[str, Any]], tuple[str, float]] | None = None


@dataclass(frozen=True)
class Experiment:
    """A reproducible experiment (training, re-initialisation, noise)."""

    name: str
    run: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class ModuleConverter:
    """Trace every module of ``module_class`` as one layer: ``convert(module, name, x, y) -> hpa.Layer``.

    ``x`` is the module's input tensor and ``y`` its output, from the tracing
    forward pass.  For layers whose maths is not a single conv call, such as the
    channel-wise-ReLU conv of Gamba et al. 2019 eq. (4) (``hpa.nn.ChannelReLUConv2d``).
    """

    module_class: type
    convert: Any  # Callable[[torch.nn.Module, str, torch.Tensor, torch.Tensor], Layer]


T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> item, refusing duplicates and suggesting close names on a miss."""

    def __init__(self, what: str, key: str) -> None:
        self.what = what  # "loader", used in messages
        self.key = key  # attribute holding the name: "prefix" or "name"
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def register(self, item: T, owner: str) -> None:
        name = getattr(item, self.key)
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(f"plugin {owner} registered a {self.what} with invalid name {name!r}")
        if name in self._items:
            raise PluginError(
                f"plugins {self._owners[name]} and {owner} both register the {self.what} {name!r}; "
                f"uninstall one of them or disable one with HPA_DISABLE_PLUGINS"
            )
        self._items[name] = item
        self._owners[name] = owner

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SpecError(f"unknown {self.what} {name!r}{suggest(name, self._items)}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def owner(self, name: str) -> str:
        """The plugin that registered ``name``."""
        self.get(name)
        return self._owners[name]

    def items(self) -> list[T]:
        return [self._items[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items


def match(names: Iterable[str], pattern: str | None) -> list[str]:
    """Names matching an fnmatch pattern (all when pattern is None), sorted."""
    names = sorted(set(names))
    if not pattern:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
