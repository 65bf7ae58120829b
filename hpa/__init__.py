"""hpa: hyperplane-arrangement analysis of trained convolutional networks.

Public API: the names of ``__all__`` here, in ``hpa.experiments``, ``hpa.nn`` and (for a statistic's
figures over epochs) ``hpa.render.series``; every other module is internal::

    graph = hpa.load("timm:vgg19")                 # -> hpa.ConvGraph
    result = hpa.analyse(graph, init=hpa.load("timm:vgg19", weights=None))
    result = hpa.scan("zoo:digits_cnn", compare_init=True)   # load + init + analyse
    result.to_dict(); result.to_csv("layers.csv"); result.plot("figures/")
    tracker = hpa.Tracker(model, out="runs/mine", input_size=(3, 32, 32))   # from your own loop

Heavy modules (torch, numpy) are imported on first use so that the command
line starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hpa.errors import (
    HpaError,
    HpaWarning,
    LoadError,
    NonFiniteWeightsError,
    OptionError,
    OutputError,
    PluginError,
    ReinitError,
    SpecError,
    TrainingError,
    UnsafeFileError,
    UnknownOptionError,
    UnsupportedModelError,
    suggest,
)
from hpa.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ConvGraph", "Experiment", "HpaError", "HpaWarning", "Layer", "LoadError", "LoadOptions", "Loader", "ModuleConverter",
    "NonFiniteWeightsError", "Option", "OptionError", "OutputError", "PluginError", "ReinitError", "RunSeries", "ScanResult", "Skipped", "SpecError",
    "Statistic", "StatisticContext", "StatisticResult", "Tracker", "TrainingError", "UnknownOptionError", "UnsafeFileError",
    "UnsupportedModelError", "__version__", "analyse", "check_model_file", "hookimpl", "list_experiments",
    "list_loaders", "list_models", "list_statistics", "load", "module_converters", "open_run", "parse_input_size", "rebind",
    "reinit",
    "scan", "suggest",
]

_LAZY = {
    "ConvGraph": "hpa.graph", "Layer": "hpa.graph", "Skipped": "hpa.graph",
    "Loader": "hpa.registry", "LoadOptions": "hpa.options", "Statistic": "hpa.registry",
    "StatisticContext": "hpa.registry", "StatisticResult": "hpa.registry", "Experiment": "hpa.registry",
    "RunSeries": "hpa.render.series",  # what a Statistic's plot_series receives
    "Option": "hpa.options", "ModuleConverter": "hpa.registry",
    "ScanResult": "hpa.result",
    "load": "hpa.api", "scan": "hpa.api", "analyse": "hpa.api", "list_loaders": "hpa.api",
    "list_statistics": "hpa.api", "list_experiments": "hpa.api", "list_models": "hpa.api",
    "parse_input_size": "hpa.api",
    "rebind": "hpa.rebind",  # a traced graph's structure with another state's numbers (numpy only)
    "reinit": "hpa.experiments.reinit",  # critical layers: reset each layer to each checkpoint
    "open_run": "hpa.experiments.open_run",  # a training run's metrics, series, graphs and figures
    "Tracker": "hpa.experiments.track",  # a run folder written from the caller's own training loop
    # for plugin authors: a checked model path, and the module-converter registry the tracer reads
    "check_model_file": "hpa.files", "module_converters": "hpa.plugins",
}

if TYPE_CHECKING:
    from hpa.api import (analyse, list_experiments, list_loaders, list_models, list_statistics, load,
                         parse_input_size, scan)
    from hpa.files import check_model_file
    from hpa.graph import ConvGraph, Layer, Skipped
    from hpa.plugins import module_converters
    from hpa.rebind import rebind
    from hpa.render.series import RunSeries
    from hpa.experiments.open_run import open_run
    from hpa.experiments.reinit import reinit
    from hpa.experiments.track import Tracker
    from hpa.options import LoadOptions, Option
    from hpa.registry import Experiment, Loader, ModuleConverter, Statistic, StatisticContext, StatisticResult
    from hpa.result import ScanResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
