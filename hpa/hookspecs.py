"""Hook specifications: the whole surface a plugin can implement.

Each ``register_*`` hook receives a ``register`` callback.  The core owns the
registries, so name collisions and lookups are decided in one place
(``hpa/registry.py``, ``hpa/plugins.py``).  ``register_commands`` receives the
click group instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from hpa.experiments.types import Task
    from hpa.registry import Experiment, Loader, ModuleConverter, Statistic

hookspec = pluggy.HookspecMarker("hpa")
hookimpl = pluggy.HookimplMarker("hpa")


# -- model loaders ------------------------------------------------------------

@hookspec
def register_loaders(register: Callable[[Loader], None]) -> None:
    """Register model loaders by calling ``register(Loader(...))`` once per loader.

    A loader turns a spec such as ``timm:vgg19`` or ``model.onnx`` into a
    :class:`hpa.ConvGraph`.  Its ``prefix`` must be unique.  It declares its
    ``-o KEY=VALUE`` options in ``Loader.options`` (:class:`hpa.Option`); ``load``
    then finds them, converted and with defaults filled in, in ``options.extra``.
    """


@hookspec
def register_module_converters(register: Callable[[ModuleConverter], None]) -> None:
    """Register torch module classes the tracer reads as one layer: ``register(hpa.ModuleConverter(cls, convert))``.

    ``convert(module, name, x, y) -> hpa.Layer`` builds the layer from the module,
    its traced name, its input tensor ``x`` and its output ``y``.  Called when a
    module is first traced, so the hookimpl may import torch.  One converter per
    class: a second one for the same class is refused.
    """


# -- statistics ---------------------------------------------------------------

@hookspec
def register_statistics(register: Callable[[Statistic], None]) -> None:
    """Register statistics by calling ``register(Statistic(...))`` once per statistic.

    A statistic reads only the :class:`hpa.ConvGraph` and returns a
    :class:`hpa.StatisticResult`.  Its ``name`` must be unique.  Its options
    (``Statistic.options``) are global option names, so prefix them with the
    statistic's name; ``compute`` reads them, converted and with defaults, in
    ``context.options``.
    """


# -- experiments --------------------------------------------------------------

@hookspec
def register_experiments(register: Callable[[Task | Experiment], None]) -> None:
    """Register experiments by calling ``register(...)`` once per item; every ``name`` must be unique.

    * ``register(hpa.experiments.Task(...))``: a training task (a dataset function returning an
      :class:`hpa.experiments.Dataset` of numpy arrays, a default architecture spec such as
      ``"cifar:vgg19"``, and a default :class:`hpa.experiments.Recipe`).  ``hpa train --plugin NAME``
      trains it, ``hpa experiments`` lists it.  Keep the module torch-free at import time.
    * ``register(Experiment(...))``: any other reproducible experiment.
    """


# -- command line -------------------------------------------------------------

@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``hpa`` command group."""
