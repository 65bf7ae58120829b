"""hpa: hyperplane-arrangement analysis of trained convolutional networks.

Public API (everything else is internal)::

    graph = hpa.load("timm:vgg19")                 # -> hpa.ConvGraph
    result = hpa.scan("zoo:digits_cnn", compare_init=True)
    result.to_dict(); result.to_csv("layers.csv"); result.plot("figures/")

Heavy modules (torch, numpy) are imported on first use so that the command
line starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hpa.errors import (
    HpaError,
    LoadError,
    NonFiniteWeightsError,
    OptionError,
    PluginError,
    SpecError,
    UnsafeFileError,
    UnsupportedModelError,
)
from hpa.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ConvGraph", "Experiment", "HpaError", "Layer", "LoadError", "LoadOptions", "Loader",
    "NonFiniteWeightsError", "OptionError", "PluginError", "ScanResult", "Skipped", "SpecError",
    "Statistic", "StatisticContext", "StatisticResult", "UnsafeFileError", "UnsupportedModelError",
    "__version__", "hookimpl", "list_experiments", "list_loaders", "list_models", "list_statistics",
    "load", "scan",
]

_LAZY = {
    "ConvGraph": "hpa.graph", "Layer": "hpa.graph", "Skipped": "hpa.graph",
    "Loader": "hpa.registry", "LoadOptions": "hpa.registry", "Statistic": "hpa.registry",
    "StatisticContext": "hpa.registry", "StatisticResult": "hpa.registry", "Experiment": "hpa.registry",
    "ScanResult": "hpa.result",
    "load": "hpa.api", "scan": "hpa.api", "list_loaders": "hpa.api", "list_statistics": "hpa.api",
    "list_experiments": "hpa.api", "list_models": "hpa.api",
}

if TYPE_CHECKING:
    from hpa.api import list_experiments, list_loaders, list_models, list_statistics, load, scan
    from hpa.graph import ConvGraph, Layer, Skipped
    from hpa.registry import (Experiment, Loader, LoadOptions, Statistic, StatisticContext,
                              StatisticResult)
    from hpa.result import ScanResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
