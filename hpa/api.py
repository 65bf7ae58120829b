"""The library entry points: ``load`` a model into a graph, ``analyse`` a graph, ``scan`` = both.

Keyword arguments beyond the named ones are plugin options: those the chosen
loader declares go to it, those of the statistics being run go to them
(``Loader.options``, ``Statistic.options``).  A keyword nothing declares is
refused with :class:`hpa.errors.UnknownOptionError`, a ``TypeError``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hpa.errors import HpaWarning, LoadError, OptionError, SpecError, UnsupportedModelError
from hpa.files import MANIFEST, atomic_directory
from hpa.graph import CONV_KINDS, TRANSPOSED_KINDS, ConvGraph
from hpa.options import LoadOptions, Option, resolve_options, route_options
from hpa.plugins import registries
from hpa.registry import Loader, Statistic, StatisticContext, match
from hpa.result import FIGURE_SUFFIXES, ScanResult
from hpa.specs import parse_spec

# The named keywords of each entry point, offered as "did you mean" targets for a misspelt one.
_LOAD_KEYWORDS = ("weights", "input_size", "fold_bn", "trust_pickle", "seed")
_ANALYSE_KEYWORDS = ("init", "statistics", "progress", "skip_1x1", "with_linear", "bins", "input_size",
                     "on_statistic")
_SCAN_KEYWORDS = _LOAD_KEYWORDS + _ANALYSE_KEYWORDS + ("compare_init",)


def list_loaders() -> list[Loader]:
    return registries()["loaders"].items()


def list_statistics() -> list[Statistic]:
    return registries()["statistics"].items()


def list_experiments():
    return registries()["experiments"].items()


def list_models(prefix: str, pattern: str | None = None) -> list[str]:
    """The model names a loader can build, filtered by an fnmatch pattern."""
    loader = registries()["loaders"].get(prefix)
    if loader.list_models is None:
        raise SpecError(f"the {prefix} loader reads files and has no list of models; give it a path")
    return match(loader.list_models(), pattern)


def load(spec: Any, *, weights: str | os.PathLike | None = "DEFAULT", input_size: Sequence[int] | str | None = None,
         fold_bn: bool = True, trust_pickle: bool = False, seed: int = 0, **options: Any) -> ConvGraph:
    """Load ``spec`` (``prefix:name``, a model file, a ``torch.nn.Module`` or a graph) as a ConvGraph.

    ``weights``: ``"DEFAULT"`` the loader's pretrained or shipped weights; ``None`` no
    pretrained weights (a random init seeded by ``seed``, as ``weights=None`` in
    torchvision and timm); a weights name; or a file path.  ``**options``: the
    loader's declared options; anything else raises UnknownOptionError (a TypeError).
    """
    loader, name = _loader_for(spec)
    extra = _loader_options(loader, options, _LOAD_KEYWORDS)
    if isinstance(spec, ConvGraph):
        return spec
    load_options = LoadOptions(weights=_loader_weights(weights), input_size=parse_input_size(input_size),
                               fold_bn=fold_bn, trust_pickle=trust_pickle, seed=seed, extra=extra)
    if loader is None:
        graph = _load_module(spec, load_options)
    else:
        graph = loader.load(name, load_options)
        graph.source = {"spec": os.fspath(spec), "loader": loader.prefix, **graph.source}
    graph.source.update(_load_facts(graph, load_options))
    _require_convs(graph)
    return graph


def _load_facts(graph: ConvGraph, options: LoadOptions) -> dict[str, Any]:
    """What every graph's source records of how it was loaded, whatever its loader: whether BatchNorm
    was folded, and the (C, H, W) it was traced at (None where the format has none, as a state_dict)."""
    return {"fold_bn": options.fold_bn, "input_size": None if graph.input_shape is None else list(graph.input_shape)}


def analyse(graph: ConvGraph, *, init: Any = None, statistics: Iterable[str] | str | None = None,
            progress: Callable[[str, int, int], None] | None = None, skip_1x1: bool = False,
            with_linear: bool = False, bins: int = 40, input_size: Sequence[int] | str | None = None,
            on_statistic: Callable[[str, Any, bool], None] | None = None, **options: Any):
    """Run statistics on a loaded graph; returns a :class:`hpa.ScanResult`.

    ``init``: None, or the initial state of the same architecture to compare
    against, as a ConvGraph or a ``torch.nn.Module`` (traced like ``graph``).
    ``statistics`` defaults to every registered statistic that applies to the
    graph.  ``**options``: the options the statistics declare.
    ``on_statistic(name, partial, finished)`` is called before and after each
    statistic with a ScanResult of the statistics finished so far, so that a caller
    can show results early.  Statistics that fill the layer table (``columns``) run
    first; the result keeps the statistics in their usual order.
    """
    if not isinstance(graph, ConvGraph):
        raise OptionError(f"analyse takes a ConvGraph, not a {type(graph).__name__}; "
                          "use hpa.load first, or hpa.scan for both steps")
    if bins < 1:
        raise OptionError(f"--bins must be a positive integer, not {bins}")
    size = parse_input_size(input_size)
    chosen = _chosen_statistics(statistics)
    stat_values = _statistic_options(chosen, options, _ANALYSE_KEYWORDS)
    init_graph = _init_graph(init, graph, size)
    stats, not_run = _applicable(chosen, graph, explicit=statistics is not None)
    _warn_unused(options, chosen, not_run)
    context = StatisticContext(options={"skip_1x1": skip_1x1, "with_linear": with_linear, "bins": int(bins),
                                        "input_size": size, **stat_values}, init=init_graph, progress=progress)
    results = {}

    def so_far() -> ScanResult:
        done = {stat.name: results[stat.name] for stat in stats if stat.name in results}
        return ScanResult(graph=graph, init=init_graph, statistics=done, options=dict(context.options),
                          not_run=not_run, statistic_plugins={stat.name: stat for stat in stats})

    for stat in sorted(stats, key=lambda s: s.columns is None):  # stable: the table's columns first
        if on_statistic is not None:
            on_statistic(stat.name, so_far(), False)
        _progress(progress, f"statistic {stat.name}", 0, 1)
        results[stat.name] = stat.compute(graph, context)
        if on_statistic is not None:
            on_statistic(stat.name, so_far(), True)
    return so_far()


def scan(spec: Any, statistics: Iterable[str] | str | None = None, *, compare_init: bool = False,
         init: Any = None, progress: Callable[[str, int, int], None] | None = None,
         skip_1x1: bool = False, with_linear: bool = False, bins: int = 40,
         weights: str | os.PathLike | None = "DEFAULT", input_size: Sequence[int] | str | None = None,
         fold_bn: bool = True, trust_pickle: bool = False, seed: int = 0,
         on_statistic: Callable[[str, Any, bool], None] | None = None, **options: Any):
    """Load ``spec`` and analyse it: ``load`` + (the initial state) + ``analyse``.

    ``compare_init`` also loads a seeded fresh initialisation of the same
    architecture through the same loader.  ``init`` is the initial state to
    compare against: a saved snapshot's path, a ConvGraph or a ``torch.nn.Module``.
    ``**options`` are split between the loader and the statistics that declare them;
    every option is checked before anything is loaded.
    """
    if compare_init and init is not None:
        raise OptionError("use either --compare-init or --init PATH, not both")
    if bins < 1:
        raise OptionError(f"--bins must be a positive integer, not {bins}")
    loader, _ = _loader_for(spec)
    chosen = _chosen_statistics(statistics)
    loader_given, stat_given = _split_scan_options(loader, chosen, options)
    _statistic_options(chosen, stat_given, _SCAN_KEYWORDS)  # validate every value before the load
    load_options = dict(weights=weights, input_size=input_size, fold_bn=fold_bn, trust_pickle=trust_pickle,
                        seed=seed, **loader_given)
    _progress(progress, "loading model", 0, 1)
    graph = load(spec, **load_options)
    init_graph = init
    if compare_init or isinstance(init, (str, os.PathLike)):
        _progress(progress, "loading initialisation", 0, 1)
        init_graph = _load_init(spec, graph, init, load_options)
    return analyse(graph, init=init_graph, statistics=statistics, progress=progress, skip_1x1=skip_1x1,
                   with_linear=with_linear, bins=bins, input_size=input_size, on_statistic=on_statistic,
                   **stat_given)


def parse_input_size(value: Sequence[int] | str | None) -> tuple[int, ...] | None:
    """``"3,224,224"`` or ``(3, 224, 224)`` -> ``(3, 224, 224)``; validated."""
    if value is None:
        return None
    parts = value.replace("x", ",").split(",") if isinstance(value, str) else list(value)
    try:
        size = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise OptionError(f"--input-size must be C,H,W integers such as 3,224,224, not {value!r}") from None
    if not 2 <= len(size) <= 4 or min(size) < 1:
        raise OptionError(f"--input-size must be 2 to 4 positive integers (C,L / C,H,W / C,D,H,W), not {value!r}")
    return size


# -- options ------------------------------------------------------------------------------------

def _loader_for(spec: Any) -> tuple[Loader | None, str | None]:
    """The loader of ``spec`` and the name it receives; (None, None) for a module or a graph."""
    if isinstance(spec, ConvGraph) or _is_torch_module(spec):
        return None, None
    if isinstance(spec, (str, os.PathLike)):
        parsed = parse_spec(os.fspath(spec), registries()["loaders"])
        return registries()["loaders"].get(parsed.prefix), parsed.name
    raise SpecError(f"cannot load a {type(spec).__name__}; give a spec string, a path or a torch.nn.Module")


def _declared(options: Iterable[Option]) -> dict[str, Option]:
    return {option.name: option for option in options}


def _loader_options(loader: Loader | None, given: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The loader's declared options with ``given`` converted into them; unknown names refused."""
    declared = _declared(loader.options) if loader is not None else {}
    owners = {f"loader {loader.prefix}": declared} if loader is not None else {}
    route_options(given, owners, known)
    return resolve_options(declared, given)


def _chosen_statistics(names: Iterable[str] | str | None) -> list[Statistic]:
    """The statistics named (unknown names refused), or every registered one when None."""
    registry = registries()["statistics"]
    if names is None:
        return registry.items()
    names = [names] if isinstance(names, str) else list(names)
    return [registry.get(name) for name in dict.fromkeys(names)]


def _statistic_options(chosen: list[Statistic], given: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """Every option of the chosen statistics, given or default, converted and validated."""
    owners = {f"statistic {stat.name}": _declared(stat.options) for stat in chosen}
    _refuse_options_of_other_statistics(chosen, given)
    route_options(given, owners, known)
    values: dict[str, Any] = {}
    for declared in owners.values():
        values.update(resolve_options(declared, {k: v for k, v in given.items() if k in declared}))
    return values


def _refuse_options_of_other_statistics(chosen: list[Statistic], given: Mapping[str, Any]) -> None:
    """An option of a statistic this scan does not run would do nothing: say so instead of ignoring it."""
    running = {stat.name for stat in chosen}
    for stat in registries()["statistics"].items():
        for name in set(given) & set(_declared(stat.options)):
            if stat.name not in running:
                raise OptionError(f"option {name!r} belongs to the statistic {stat.name}, which this scan does "
                                  f"not run; add --stat {stat.name} (statistics=[..., {stat.name!r}]) or drop it")


def _split_scan_options(loader: Loader | None, chosen: list[Statistic],
                        given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``given`` split into the loader's options and the statistics' options."""
    _refuse_options_of_other_statistics(chosen, given)
    owners = {f"statistic {stat.name}": _declared(stat.options) for stat in chosen}
    if loader is not None:
        owners = {f"loader {loader.prefix}": _declared(loader.options), **owners}
    routed = route_options(given, owners, _SCAN_KEYWORDS)
    loader_given = routed.pop(f"loader {loader.prefix}", {}) if loader is not None else {}
    return loader_given, {k: v for part in routed.values() for k, v in part.items()}


def _warn_unused(given: Mapping[str, Any], chosen: list[Statistic], not_run: Mapping[str, str]) -> None:
    for stat in chosen:
        unused = sorted(set(given) & set(_declared(stat.options)))
        if stat.name in not_run and unused:
            warnings.warn(f"option {', '.join(unused)} has no effect: the statistic {stat.name} does not apply "
                          f"to this model ({not_run[stat.name]})", HpaWarning, stacklevel=3)


def _loader_weights(weights: Any) -> str | None:
    """The Python spelling of ``weights`` as LoadOptions holds it (None there is the loader's default)."""
    if weights is None:
        return "none"
    if isinstance(weights, os.PathLike):
        return os.fspath(weights)
    if not isinstance(weights, str):
        raise OptionError(f"weights must be \"DEFAULT\", None, a weights name or a file path, not {weights!r}")
    return None if weights.upper() == "DEFAULT" else weights


# -- analysis ---------------------------------------------------------------------------------

def _applicable(chosen: list[Statistic], graph: ConvGraph, explicit: bool):
    """The statistics to run, and {name: reason} for those a default scan leaves out."""
    if explicit:
        return chosen, {}
    stats, not_run = [], {}
    for stat in chosen:
        reason = stat.applies(graph) if stat.applies is not None else None
        if reason:
            not_run[stat.name] = reason
        else:
            stats.append(stat)
    return stats, not_run


def _init_graph(init: Any, graph: ConvGraph, input_size: tuple[int, ...] | None) -> ConvGraph | None:
    """``init`` as a graph checked against ``graph``; a module is traced like the graph was."""
    if init is None:
        return None
    if _is_torch_module(init):
        size = input_size or graph.source.get("input_size") or graph.input_shape
        if size is None:
            raise OptionError("init is a torch.nn.Module, so analyse needs input_size=(C, H, W) to trace it")
        init = load(init, input_size=tuple(size), fold_bn=graph.source.get("fold_bn", True))
        init.source.update(role="init")
    if not isinstance(init, ConvGraph):
        raise OptionError(f"init must be a ConvGraph or a torch.nn.Module (hpa.scan also takes a snapshot path), "
                          f"not a {type(init).__name__}")
    init.source.setdefault("role", "init")
    _check_same_architecture(graph, init)
    return init


def _load_init(spec: Any, graph: ConvGraph, init: Any, load_options: dict[str, Any]) -> ConvGraph:
    """The initial state for ``compare_init`` (init None) or a snapshot path ``init``, checked against graph."""
    options = dict(load_options)
    if init is None:
        options["weights"] = None  # no pretrained weights: the seeded fresh init
        module = _is_torch_module(spec)
        if module:
            # here, not at the top: backends.torch_module imports torch
            from hpa.backends.torch_module import reinitialised
            spec = reinitialised(spec, options["seed"])
            options["weights"] = "DEFAULT"  # the module as it is: already re-initialised
        elif isinstance(spec, ConvGraph):
            raise OptionError("--compare-init needs a model spec, not a ready graph; pass --init PATH instead")
        elif not _builds_init(graph):
            raise OptionError(f"the {graph.source['loader']} loader cannot build a fresh initialisation of "
                              "this model; save the initial weights and pass --init PATH")
        init_graph = load(spec, **options)
        if module:  # no loader labels a re-initialised module
            init_graph.source.update(weights="none", seed=options["seed"])
    else:
        init_graph = _load_snapshot(spec, graph, os.fspath(init), options)
    init_graph.source.setdefault("role", "init")
    _check_same_architecture(graph, init_graph)
    return init_graph


def _load_snapshot(spec: Any, graph: ConvGraph, path: str, options: dict[str, Any]) -> ConvGraph:
    if _is_torch_module(spec):
        # here, not at the top: backends.torch_module imports torch
        from hpa.backends.torch_module import with_state_dict
        return load(with_state_dict(spec, path, options["trust_pickle"]), **options)
    if _builds_init(graph):
        options["weights"] = path
        return load(spec, **options)
    options["weights"] = "DEFAULT"
    loader, _ = _loader_for(path)
    if loader.prefix != graph.source.get("loader"):  # another loader: the model's own options do not apply
        options = {key: options[key] for key in _LOAD_KEYWORDS}
    return load(path, **options)


def _builds_init(graph: ConvGraph) -> bool:
    loaders = registries()["loaders"]
    prefix = graph.source.get("loader")
    return prefix in loaders and loaders.get(prefix).builds_init


def _check_same_architecture(graph: ConvGraph, init: ConvGraph) -> None:
    for layer in graph:
        if layer.name not in init:
            raise OptionError(f"the initial snapshot has no layer {layer.name!r}; it must come from the same "
                              "architecture")
        if init[layer.name].weight.shape != layer.weight.shape:
            raise OptionError(f"layer {layer.name!r} is {tuple(layer.weight.shape)} but "
                              f"{tuple(init[layer.name].weight.shape)} in the initial snapshot; "
                              "it must come from the same architecture")


#: What one entry a loader skips is, by the loader or the torch file's content: for the message of a
#: model with no conv layers ("21 ConvInteger nodes: ...").
_ENTRY_NOUNS = {"onnx": "node", "matconvnet": "layer", "torchscript": "call", "state_dict": "tensor group",
                "module": "module", "torchvision": "module", "timm": "module", "zoo": "module"}


def _require_convs(graph: ConvGraph) -> None:
    """Refuse a graph without conv layers, naming what the loader found instead: its layers by kind and
    its skipped entries by operator and count, and the control-flow branches it searched."""
    if any(layer.kind in CONV_KINDS + TRANSPOSED_KINDS for layer in graph):
        return
    what = graph.source.get("spec", "the model")
    found = [f"{n} {kind} layer{'s' if n != 1 else ''}" for kind, n in graph.summary().items()]
    found += _skipped_summary(graph)
    branches = graph.source.get("branches") or ()
    searched = f", not even inside its {len(branches)} control-flow branches" if branches else ""
    raise UnsupportedModelError(f"{what} has no conv layers{searched} (found: "
                                f"{'; '.join(found) or 'no layer with weights'}); hpa analyses convolutional networks")


def _skipped_summary(graph: ConvGraph) -> list[str]:
    """The loader's skipped entries grouped by what they are: "2 LSTM nodes: recurrent layers ... (lstm, gru)".

    A reason "OP: why" groups by its operator; any other reason by its text without the trailing
    details in parentheses (shapes, which differ from entry to entry).
    """
    noun = _ENTRY_NOUNS.get(graph.source.get("content") or graph.source.get("loader"), "entry")
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in graph.skipped:
        head, _, why = entry.reason.partition(": ")
        if not why or " " in head:
            head, why = "", re.sub(r"\s*\((?:[^()]|\([^()]*\))*\)$", "", entry.reason)
        groups.setdefault((head, why), []).append(entry.name)
    lines = []
    for (head, why), names in groups.items():
        count = len(names)
        plural = noun if count == 1 else ("entries" if noun == "entry" else f"{noun}s")
        examples = ", ".join(names[:3]) + (", ..." if count > 3 else "")
        lines.append(f"{count} {head + ' ' if head else ''}{plural}: {why} ({examples})")
    return lines


def _load_module(module: Any, options: LoadOptions) -> ConvGraph:
    from hpa.backends.torch_trace import trace_module  # here, not at the top: backends.torch_trace imports torch

    if options.input_size is None:
        raise OptionError("a torch.nn.Module needs input_size=(C, H, W) for its dummy forward pass")
    source = {"spec": f"<{type(module).__name__}>", "loader": "module"}
    return trace_module(module, options.input_size, fold_bn=options.fold_bn, source=source, seed=options.seed)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _progress(progress, what: str, done: int, total: int) -> None:
    if progress is not None:
        progress(what, done, total)


# -- reading a result back --------------------------------------------------------------------

def read_result(path: str | os.PathLike, statistics: Iterable[Statistic] = ()) -> ScanResult:
    """The ScanResult saved in ``path`` (a result.json, or the folder holding one).

    Rendered by ``statistics`` (Statistic plugins) and, for the others it holds, the installed ones.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoadError(f"result file {path} does not exist; give the result.json that hpa scan --out wrote") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read result file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    given = {stat.name: stat for stat in statistics}
    result = ScanResult.from_json(text, given.values())
    installed = registries()["statistics"]
    found = {name: installed.get(name) for name in result.statistics if name not in given and name in installed}
    result.statistic_plugins = {**found, **given}
    return result


def redraw(path: str | os.PathLike, out: str | os.PathLike, format: str = "png",
           **figure_options: Any) -> list[Path]:
    """Redraw the figures of the result in ``path`` into the folder ``out``; returns the figures.

    ``out`` follows the rules of ``hpa scan --out`` (hpa.files): it is replaced as a
    whole, atomically, and only when it is new, empty or holds nothing but what hpa
    wrote.  The files it held besides figures (result.json, CSVs) are kept, so a
    result folder can be redrawn in place.
    """
    result = read_result(path)
    result._check_layer_pattern(figure_options.get("layers"))  # fail before touching ``out``
    with atomic_directory(out) as staging:
        _keep_non_figures(Path(out), staging, skip=(MANIFEST,))
        files = result.plot(staging, format, **figure_options)
    return [Path(out) / f.relative_to(staging) for f in files]


def _keep_non_figures(source: Path, staging: Path, skip: tuple[str, ...]) -> None:
    """Copy what ``source`` holds (hpa's own files, checked by atomic_directory) except its figures."""
    if not source.is_dir():
        return
    for entry in source.rglob("*"):
        relative = entry.relative_to(source)
        if entry.is_dir() or relative.name in skip or entry.suffix.lower() in FIGURE_SUFFIXES:
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(entry, staging / relative)
