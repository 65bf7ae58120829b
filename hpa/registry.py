"""The registries the core owns: loaders, statistics and experiments.

Plugins only call ``register``; lookups, collisions, ``prefix:name`` parsing,
fnmatch listing and "did you mean" suggestions all live here.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, TypeVar

from hpa.errors import PluginError, SpecError

if TYPE_CHECKING:
    from hpa.graph import ConvGraph, Skipped
    from hpa.result import ScanResult


@dataclass(frozen=True)
class LoadOptions:
    """Options every loader understands.  The CLI flags have the same names."""

    weights: str | None = None  # None: the loader's default; "none": seeded random init; a name or a path
    input_size: tuple[int, ...] | None = None  # (C, H, W) without batch; None: from the model's config
    fold_bn: bool = True  # fold inference BatchNorm into the conv before it (STATISTICS.md §0)
    trust_pickle: bool = False  # allow unpickling code from a file; never on by default
    seed: int = 0  # seed of random initialisations
    extra: Mapping[str, Any] = field(default_factory=dict)  # loader-specific options (-o key=value)


@dataclass(frozen=True)
class Option:
    """One option a loader, statistic or task declares; ``-o NAME=VALUE`` on the CLI.

    The core routes each key to the one plugin that declares it, converts the CLI
    string with ``type`` and refuses unknown keys with a "did you mean".
    """

    name: str  # the -o key and the hpa.load/hpa.scan keyword, snake_case
    type: Callable[[Any], Any] = str  # bool, int, float, str, or a converter raising ValueError
    default: Any = None
    help: str = ""  # one line
    choices: tuple[Any, ...] = ()  # allowed values after conversion; empty: any


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


@dataclass(frozen=True)
class Experiment:
    """A reproducible experiment (training, re-initialisation, noise)."""

    name: str
    run: Callable[..., Any]
    description: str = ""


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

    def items(self) -> list[T]:
        return [self._items[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items


def suggest(name: str, choices: Iterable[str], what: str = "") -> str:
    """A '; did you mean ...?' tail for error messages, or '' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered and lowered in c.lower()][:3]
    if close:
        return "; did you mean " + " or ".join(repr(what + c) for c in close) + "?"
    if choices and len(choices) <= 12:
        return "; choose from " + ", ".join(sorted(choices))
    return ""


def match(names: Iterable[str], pattern: str | None) -> list[str]:
    """Names matching an fnmatch pattern (all when pattern is None), sorted."""
    names = sorted(set(names))
    if not pattern:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


@dataclass(frozen=True)
class ParsedSpec:
    prefix: str
    name: str


def parse_spec(spec: str, loaders: Registry[Loader]) -> ParsedSpec:
    """Split ``prefix:name[.tag]`` or recognise a plain file path by its suffix."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in loaders:
        return ParsedSpec(prefix, rest)
    by_suffix = {s: l.prefix for l in loaders.items() for s in l.suffixes}
    lower = spec.lower()
    for suffix in sorted(by_suffix, key=len, reverse=True):
        if lower.endswith(suffix):
            return ParsedSpec(by_suffix[suffix], spec)
    if sep and len(prefix) > 1:  # "x:..." but not a Windows drive letter
        raise SpecError(
            f"unknown loader prefix {prefix!r} in {spec!r}{suggest(prefix, loaders.names())} "
            f"(run 'hpa plugins' to see the installed loaders)"
        )
    if os.path.exists(spec):
        kind = "folder" if os.path.isdir(spec) else "file"
        known = ", ".join(sorted(by_suffix)) or "none"
        raise SpecError(
            f"{spec} is a {kind} hpa does not know how to load; give a model file "
            f"({known}) or a spec such as torchvision:resnet18"
        )
    raise SpecError(
        f"{spec!r} is neither a file nor a 'prefix:name' spec; "
        f"try e.g. 'torchvision:{Path(spec).name}' or 'timm:{Path(spec).name}' "
        f"(loaders: {', '.join(loaders.names())})"
    )
