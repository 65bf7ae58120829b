"""The library entry points: ``load`` a model into a graph, ``scan`` it with statistics."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Sequence

from hpa.errors import OptionError, SpecError, UnsupportedModelError
from hpa.graph import CONV_KINDS, TRANSPOSED_KINDS, ConvGraph
from hpa.plugins import registries
from hpa.registry import Loader, LoadOptions, StatisticContext, match, parse_spec

def list_loaders() -> list[Loader]:
    return registries()["loaders"].items()


def list_statistics():
    return registries()["statistics"].items()


def list_experiments():
    return registries()["experiments"].items()


def list_models(prefix: str, pattern: str | None = None) -> list[str]:
    """The model names a loader can build, filtered by an fnmatch pattern."""
    loader = registries()["loaders"].get(prefix)
    if loader.list_models is None:
        raise SpecError(f"the {prefix} loader reads files and has no list of models; give it a path")
    return match(loader.list_models(), pattern)


def load(spec: Any, *, weights: str | None = None, input_size: Sequence[int] | str | None = None,
         fold_bn: bool = True, trust_pickle: bool = False, seed: int = 0, **extra: Any) -> ConvGraph:
    """Load ``spec`` (``prefix:name``, a model file, a ``torch.nn.Module`` or a graph) as a ConvGraph."""
    if isinstance(spec, ConvGraph):
        return spec
    options = LoadOptions(weights=weights, input_size=parse_input_size(input_size), fold_bn=fold_bn,
                          trust_pickle=trust_pickle, seed=seed, extra=extra)
    if _is_torch_module(spec):
        graph = _load_module(spec, options)
    elif isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        parsed = parse_spec(spec, registries()["loaders"])
        graph = registries()["loaders"].get(parsed.prefix).load(parsed.name, options)
        graph.source = {"spec": spec, "loader": parsed.prefix, **graph.source}
    else:
        raise SpecError(f"cannot load a {type(spec).__name__}; give a spec string, a path or a torch.nn.Module")
    _require_convs(graph)
    return graph


def scan(spec: Any, statistics: Iterable[str] | None = None, *, compare_init: bool = False,
         init: str | os.PathLike | None = None, progress: Callable[[str, int, int], None] | None = None,
         skip_1x1: bool = False, with_linear: bool = False, bins: int = 40,
         weights: str | None = None, input_size: Sequence[int] | str | None = None, fold_bn: bool = True,
         trust_pickle: bool = False, seed: int = 0, **extra: Any):
    """Load ``spec`` and run statistics on its graph; returns a :class:`hpa.ScanResult`.

    ``statistics`` defaults to every registered statistic.  ``compare_init``
    also scans a seeded fresh initialisation of the same architecture through
    the same loader; ``init`` compares against a saved initial snapshot.
    """
    from hpa.result import ScanResult

    if compare_init and init is not None:
        raise OptionError("use either --compare-init or --init PATH, not both")
    if bins < 1:
        raise OptionError(f"--bins must be a positive integer, not {bins}")
    load_options = dict(weights=weights, input_size=input_size, fold_bn=fold_bn,
                        trust_pickle=trust_pickle, seed=seed, **extra)
    _progress(progress, "loading model", 0, 1)
    graph = load(spec, **load_options)
    stats, not_run = _select_statistics(statistics, graph)
    init_graph = None
    if compare_init or init is not None:
        _progress(progress, "loading initialisation", 0, 1)
        init_graph = _load_init(spec, graph, init, load_options)
    options = {"skip_1x1": skip_1x1, "with_linear": with_linear, "bins": int(bins),
               "input_size": parse_input_size(input_size), **extra}
    context = StatisticContext(options=options, init=init_graph, progress=progress)
    results = {}
    for stat in stats:
        _progress(progress, f"statistic {stat.name}", 0, 1)
        results[stat.name] = stat.compute(graph, context)
    return ScanResult(graph=graph, init=init_graph, statistics=results, options=options, not_run=not_run)


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


def _select_statistics(names: Iterable[str] | None, graph: ConvGraph):
    """The statistics to run, and {name: reason} for those a default scan leaves out."""
    registry = registries()["statistics"]
    if names is not None:
        names = [names] if isinstance(names, str) else names
        return [registry.get(name) for name in dict.fromkeys(names)], {}
    chosen, not_run = [], {}
    for stat in registry.items():
        reason = stat.applies(graph) if stat.applies is not None else None
        if reason:
            not_run[stat.name] = reason
        else:
            chosen.append(stat)
    return chosen, not_run


def _load_init(spec: Any, graph: ConvGraph, init: Any, load_options: dict[str, Any]) -> ConvGraph:
    options = dict(load_options)
    if init is None:
        options["weights"] = "none"
        module = _is_torch_module(spec)
        if module:
            from hpa.backends.torch_module import reinitialised
            spec = reinitialised(spec, options["seed"])
            options["weights"] = None
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
        from hpa.backends.torch_module import with_state_dict
        return load(with_state_dict(spec, path, options["trust_pickle"]), **options)
    if _builds_init(graph):
        options["weights"] = path
        return load(spec, **options)
    options["weights"] = None
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


def _require_convs(graph: ConvGraph) -> None:
    if not any(layer.kind in CONV_KINDS + TRANSPOSED_KINDS for layer in graph):
        what = graph.source.get("spec", "the model")
        raise UnsupportedModelError(f"{what} has no conv layers (found: "
                                    f"{', '.join(f'{n} {k}' for k, n in graph.summary().items()) or 'nothing'}); "
                                    "hpa analyses convolutional networks")


def _load_module(module: Any, options: LoadOptions) -> ConvGraph:
    from hpa.backends.torch_trace import trace_module
    if options.input_size is None:
        raise OptionError("a torch.nn.Module needs input_size=(C, H, W) for its dummy forward pass")
    source = {"spec": f"<{type(module).__name__}>", "loader": "module", "fold_bn": options.fold_bn}
    return trace_module(module, options.input_size, fold_bn=options.fold_bn, source=source, seed=options.seed)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _progress(progress, what: str, done: int, total: int) -> None:
    if progress is not None:
        progress(what, done, total)
