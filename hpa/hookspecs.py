"""Hook specifications: the whole surface a plugin can implement.

Each hook receives a ``register`` callback.  The core owns the registries, so
name collisions and lookups are decided in one place (``hpa/registry.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from hpa.registry import Experiment, Loader, Statistic

hookspec = pluggy.HookspecMarker("hpa")
hookimpl = pluggy.HookimplMarker("hpa")


# -- model loaders ------------------------------------------------------------

@hookspec
def register_loaders(register: Callable[[Loader], None]) -> None:
    """Register model loaders by calling ``register(Loader(...))`` once per loader.

    A loader turns a spec such as ``timm:vgg19`` or ``model.onnx`` into a
    :class:`hpa.ConvGraph`.  Its ``prefix`` must be unique.
    """


# -- statistics ---------------------------------------------------------------

@hookspec
def register_statistics(register: Callable[[Statistic], None]) -> None:
    """Register statistics by calling ``register(Statistic(...))`` once per statistic.

    A statistic reads only the :class:`hpa.ConvGraph` and returns a
    :class:`hpa.StatisticResult`.  Its ``name`` must be unique.
    """


# -- experiments --------------------------------------------------------------

@hookspec
def register_experiments(register: Callable[[Experiment], None]) -> None:
    """Register experiments (training runs, re-initialisation studies, ...)."""


# -- command line -------------------------------------------------------------

@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``hpa`` command group."""
