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

from hpa.errors import OptionError, PluginError, SpecError, UnknownOptionError

if TYPE_CHECKING:
    from hpa.graph import ConvGraph, Skipped
    from hpa.result import ScanResult


@dataclass(frozen=True)
class LoadOptions:
    """Options every loader understands.  The CLI flags have the same names."""

    # As the loader sees it: None (or "DEFAULT"): the loader's pretrained or shipped weights;
    # "none": no pretrained weights, a seeded random init; otherwise a weights name or a file path.
    # hpa.load maps its Python spelling (weights=None: random init, as in torchvision and timm;
    # the default "DEFAULT") onto this; loaders should test random_init and default_weights.
    weights: str | None = None
    input_size: tuple[int, ...] | None = None  # (C, H, W) without batch; None: from the model's config
    fold_bn: bool = True  # fold inference BatchNorm into the conv before it (docs/statistics.md §0)
    trust_pickle: bool = False  # allow unpickling code from a file; never on by default
    seed: int = 0  # seed of random initialisations
    # The loader's declared options (Loader.options), converted and validated, defaults filled in.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        """True when no pretrained weights are wanted (``hpa.load(weights=None)``, ``--weights none``)."""
        return isinstance(self.weights, str) and self.weights.lower() == "none"

    @property
    def default_weights(self) -> bool:
        """True when the loader's own pretrained or shipped weights are wanted (``"DEFAULT"``)."""
        return self.weights is None or (isinstance(self.weights, str) and self.weights.upper() == "DEFAULT")


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option a loader, statistic or task declares; ``-o NAME=VALUE`` on the CLI.

    The core routes each key to the one plugin that declares it, converts the CLI
    string with ``type`` and refuses unknown keys with a "did you mean".
    A ``default`` of None means "not given": the owner then uses its own behaviour.
    """

    name: str  # the -o key and the hpa.load/hpa.scan keyword, snake_case
    type: Callable[[Any], Any] = str  # bool, int, float, str, or a converter raising ValueError
    default: Any = None
    help: str = ""  # one line
    choices: tuple[Any, ...] = ()  # allowed values after conversion; empty: any

    def convert(self, value: Any) -> Any:
        """``value`` (a CLI string or a Python value) as this option's type; OptionError if it is not one."""
        try:
            converted = self._convert(value)
        except (TypeError, ValueError):
            raise OptionError(f"option {self.name} must be {self.type_name()}, not {value!r}") from None
        if self.choices and converted not in self.choices:
            raise OptionError(f"option {self.name} must be one of {', '.join(map(str, self.choices))}, "
                              f"not {value!r}")
        return converted

    def _convert(self, value: Any) -> Any:
        if self.type is bool:
            return _to_bool(value)
        if self.type is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)  # int("1.5") fails, int(1.5) would truncate silently
        if self.type is float and isinstance(value, bool):
            raise ValueError(value)
        if self.type is str and not isinstance(value, str):
            raise ValueError(value)
        if self.type in (int, float) and isinstance(value, str):
            value = value.strip()
        converted = self.type(value)
        if self.type is float and converted != converted:  # NaN passes float() but is never meant
            raise ValueError(value)
        return converted

    def type_name(self) -> str:
        """The type as messages say it; for a converter function, its docstring's first line."""
        known = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        if self.type in known:
            return known[self.type]
        doc = (getattr(self.type, "__doc__", None) or "").strip()  # a converter's first line says what it takes
        return doc.splitlines()[0].rstrip(".") if doc else getattr(self.type, "__name__", "valid")

    def describe(self) -> dict[str, Any]:
        """JSON-ready: name, type, default, help, choices (for ``hpa plugins --json``)."""
        type_name = self.type.__name__ if self.type in (bool, int, float, str) else self.type_name()
        return {"name": self.name, "type": type_name,
                "default": self.default, "help": self.help, "choices": list(self.choices)}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def resolve_options(declared: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option: the given value converted and validated, or the default.

    ``given`` must hold only declared names (route first with :func:`route_options`).
    """
    values = {name: option.default for name, option in declared.items()}
    for name, value in given.items():
        values[name] = declared[name].convert(value)
    return values


def route_options(given: Mapping[str, Any], owners: Mapping[str, Mapping[str, Option]],
                  known: Iterable[str] = (), spelled: str = "{}", what: str = "option") -> dict[str, dict[str, Any]]:
    """Split ``given`` between its owners: owner -> {name: value}, each name to the one owner declaring it.

    ``owners`` maps an owner's label (e.g. "loader torchvision", "statistic cones") to
    the options it declares.  A name no owner declares raises UnknownOptionError with a
    "did you mean" over the declared names and ``known`` (the caller's own keywords);
    ``spelled`` formats a name for the message ("-o {}" on the command line).
    """
    routed: dict[str, dict[str, Any]] = {owner: {} for owner in owners}
    for name, value in given.items():
        owner = next((o for o, declared in owners.items() if name in declared), None)
        if owner is None:
            choices = [n for declared in owners.values() for n in declared] + list(known)
            where = ", ".join(owners) or "nothing that takes options"
            raise UnknownOptionError(f"unknown {what} {spelled.format(name)!r}{suggest(name, choices)} "
                                     f"(options go to: {where}; 'hpa plugins' lists them)")
        routed[owner][name] = value
    return routed


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


def suggest(name: str, choices: Iterable[str], what: str = "") -> str:
    """A '; did you mean ...?' tail for error messages, or '' when nothing is close.

    Names that start with ``name`` come first (``vit_tiny`` -> ``vit_tiny_patch16_224``),
    shortest first; then close spellings; then, for names of 4 or more characters,
    names that contain it.
    """
    choices = list(choices)
    lowered = name.lower()
    close = sorted((c for c in choices if len(lowered) >= 2 and c.lower().startswith(lowered) and c != name),
                   key=lambda c: (len(c), c))[:3]
    if not close:
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close and len(lowered) >= 4:
        close = [c for c in choices if lowered in c.lower()][:3]
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
    if os.path.isfile(spec):  # no or an unknown suffix: recognise the file by its content
        return ParsedSpec(sniff_loader(spec, loaders), spec)
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
    if _looks_like_path(spec):
        known = ", ".join(sorted(by_suffix)) or "none"
        raise SpecError(f"{spec} does not exist; check the path (hpa reads model files ending in {known}, "
                        "or a spec such as torchvision:resnet18)")
    raise SpecError(
        f"{spec!r} is neither a file nor a 'prefix:name' spec; "
        f"try e.g. 'torchvision:{Path(spec).name}' or 'timm:{Path(spec).name}' "
        f"(loaders: {', '.join(loaders.names())})"
    )


def _looks_like_path(spec: str) -> bool:
    """A folder in it, or a file suffix such as ``.h5`` (a timm tag such as ``.tv_in1k`` has an underscore)."""
    suffix = Path(spec).suffix
    return any(sep in spec for sep in ("/", "\\", os.sep)) or spec.startswith(("~", ".")) or bool(
        suffix and "_" not in suffix and suffix[1:2].isalpha() and suffix[1:].isalnum())


def sniff_loader(path: str, loaders: Registry[Loader]) -> str:
    """The prefix of the first loader whose ``sniff`` recognises the file's content."""
    tried = []
    for loader in loaders.items():
        if loader.sniff is None:
            continue
        try:
            if loader.sniff(Path(path)):
                return loader.prefix
        except Exception:  # a plugin's faulty check must not hide the other loaders
            pass
        what = (loader.sniff.__doc__ or "").strip().splitlines()
        tried.append(f"{loader.prefix} ({what[0].rstrip('.')})" if what else loader.prefix)
    known = ", ".join(sorted({s for l in loaders.items() for s in l.suffixes})) or "none"
    raise SpecError(
        f"{path} is not a model file hpa recognises: its suffix is none of {known}, and its content "
        f"matches no loader (tried: {'; '.join(tried) or 'no loader can sniff'}); "
        f"name its loader with a prefix (torch:PATH, onnx:PATH, ...) if it is in a format hpa reads"
    )
