"""The plugin manager: built-in and third-party plugins, registered the same way.

Built-in plugins live in ``hpa_plugins`` (the ``plugins/`` folder).  They are
registered by module path from ``BUILTIN_PLUGINS`` with the very same hookimpls a
third-party plugin uses (as ``llm``'s ``DEFAULT_PLUGINS``), so hpa works from a
source tree that was never installed and when autoloading is off.  hpa's
``pyproject.toml`` also declares them under the ``hpa`` entry-point group, for
tools that read entry points; ``tests/test_plugins.py`` checks that the two
lists agree, and entry points named like a built-in are not loaded twice.
Third-party plugins are loaded from the ``hpa`` entry-point group.

The core owns every registry (:func:`registries`, :func:`module_converters`):
each ``register_*`` hookimpl is called once, through pluggy, with a ``register``
callback that records which plugin registered what and refuses collisions.

Environment variables:

* ``HPA_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (the built-ins still load).
* ``HPA_DISABLE_PLUGINS=a,b``: skip the named plugins (built-in or not).
* ``HPA_TRACE_HOOKS=1``: print every hook call on stderr, the ``register_*`` ones included.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any, Callable

import pluggy

from hpa import hookspecs
from hpa.errors import HpaWarning, PluginError
from hpa.registry import Experiment, Loader, ModuleConverter, Registry, Statistic

GROUP = "hpa"

BUILTIN_PLUGINS: dict[str, str] = {
    "torchvision": "hpa_plugins.torchvision_loader",
    "timm": "hpa_plugins.timm_loader",
    "torch": "hpa_plugins.torch_loader",
    "zoo": "hpa_plugins.zoo_loader",
    "onnx": "hpa_plugins.onnx_loader",
    "matconvnet": "hpa_plugins.matconvnet_loader",
    "projection": "hpa_plugins.projection",
    "cones": "hpa_plugins.cones",
    "cifar": "hpa_plugins.cifar_models",
    "digits_task": "hpa_plugins.digits_task",
    "cifar_task": "hpa_plugins.cifar_task",
    "mnist_task": "hpa_plugins.mnist_task",
    "imagefolder_task": "hpa_plugins.imagefolder_task",
    "run": "hpa_plugins.run_loader",
}


@dataclass(frozen=True)
class PluginFailure:
    name: str
    error: str


class _State:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("hpa")
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.versions: dict[str, str] = {}
        self.distributions: dict[str, str] = {}  # plugin -> the installed distribution that provides it
        self.loaded = False
        self._registries: dict[str, Registry] | None = None
        self._converters: dict[type, Any] | None = None  # module class -> convert function


_state = _State()


def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, with every plugin loaded."""
    load_plugins()
    return _state.pm


def load_plugins() -> None:
    if _state.loaded:
        return
    _state.loaded = True
    disabled = _split(os.environ.get("HPA_DISABLE_PLUGINS", ""))
    own_version = _version("hpa")
    for name, module in BUILTIN_PLUGINS.items():
        if name not in disabled:
            _state.distributions[name] = "hpa"
            _register_module(name, module, own_version)
    if not _truthy(os.environ.get("HPA_DISABLE_PLUGIN_AUTOLOAD")):
        for entry_point in metadata.entry_points(group=GROUP):
            if entry_point.name in disabled or entry_point.name in BUILTIN_PLUGINS:
                continue
            dist = getattr(entry_point, "dist", None)
            version = dist.version if dist is not None else ""
            # what the user installed (pip's name), which need not be the entry point's name
            _state.distributions[entry_point.name] = dist.name if dist is not None else ""
            _register_module(entry_point.name, entry_point.value, version)
    if _truthy(os.environ.get("HPA_TRACE_HOOKS")):
        _state.pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
        _state.pm.enable_tracing()


def _register_module(name: str, target: str, version: str) -> None:
    try:
        module = importlib.import_module(target.split(":")[0])
        _state.pm.register(module, name=name)
        _check_hooks(name)
    except Exception as exc:  # a broken plugin must never break hpa
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _state.failures.append(PluginFailure(name, message))
        warnings.warn(f'Error importing plugin "{name}": {message}', HpaWarning, stacklevel=2)
        return
    _state.versions[name] = version


def _check_hooks(name: str) -> None:
    """A hookimpl that matches no hookspec (a typo) is an error, as in pytest."""
    try:
        _state.pm.check_pending()
    except pluggy.PluginValidationError as exc:
        _state.pm.unregister(name=name)
        raise PluginError(str(exc).splitlines()[0]) from None


def register(plugin: ModuleType | object, name: str) -> None:
    """Register an in-process plugin (a module or object with hookimpls)."""
    load_plugins()
    _state.pm.register(plugin, name=name)
    _check_hooks(name)
    _forget_registries()


def unregister(name: str) -> None:
    load_plugins()
    _state.pm.unregister(name=name)
    _forget_registries()


def _forget_registries() -> None:
    """The registries are rebuilt from the hooks on next use (after a plugin came or went)."""
    _state._registries = None
    _state._converters = None


def registries() -> dict[str, Registry]:
    """The loader, statistic and experiment registries, built from the hooks once."""
    load_plugins()
    if _state._registries is None:
        regs = {
            "loaders": Registry[Loader]("loader", "prefix"),
            "statistics": Registry[Statistic]("statistic", "name"),
            "experiments": Registry[Experiment]("experiment", "name"),
        }
        hooks = {"loaders": "register_loaders", "statistics": "register_statistics",
                 "experiments": "register_experiments"}
        for key, hook_name in hooks.items():
            _call_each(hook_name, regs[key].register)
        _check_option_names(regs)
        _state._registries = regs
    return _state._registries


def _call_each(hook_name: str, add: Callable[[Any, str], None]) -> None:
    """Call every implementation of a ``register_*`` hook through pluggy (so tracing sees it), one
    plugin at a time, with a ``register`` callback that passes ``add`` the item and its plugin."""
    caller = getattr(_state.pm.hook, hook_name)
    plugins = [plugin for _, plugin in _state.pm.list_name_plugin()]
    for impl in caller.get_hookimpls():
        others = [plugin for plugin in plugins if plugin is not impl.plugin]
        one = _state.pm.subset_hook_caller(hook_name, remove_plugins=others)
        one(register=_Register(impl.plugin_name, add))


class _Register:
    """The ``register`` callback one plugin receives; named after the plugin in hook traces."""

    def __init__(self, owner: str, add: Callable[[Any, str], None]) -> None:
        self.owner = owner
        self.add = add

    def __call__(self, item: Any) -> None:
        self.add(item, self.owner)

    def __repr__(self) -> str:
        return f"<register for plugin {self.owner!r}>"


# Scan keywords a plugin option must not shadow (hpa.scan's own parameters).
RESERVED_OPTIONS = frozenset({"weights", "input_size", "fold_bn", "trust_pickle", "seed", "init", "statistics",
                              "progress", "skip_1x1", "with_linear", "bins", "compare_init"})


def _check_option_names(regs: dict[str, Registry]) -> None:
    """Each statistic option has one owner, and no option shadows a scan keyword or a statistic's option.

    Loaders may share names among themselves (only the chosen loader sees its options).
    """
    owner_of: dict[str, str] = {}
    for stat in regs["statistics"].items():
        for option in stat.options:
            _check_option_name(option.name, f"statistic {stat.name}", owner_of)
            owner_of[option.name] = f"statistic {stat.name}"
    for loader in regs["loaders"].items():
        for option in loader.options:
            _check_option_name(option.name, f"loader {loader.prefix}", owner_of)


def _check_option_name(name: str, owner: str, owner_of: dict[str, str]) -> None:
    if name in RESERVED_OPTIONS or not name.isidentifier():
        raise PluginError(f"the {owner} declares the option {name!r}, which is reserved or not a Python name; "
                          "rename it in the plugin")
    if name in owner_of:
        raise PluginError(f"the {owner_of[name]} and the {owner} both declare the option {name!r}; "
                          "prefix it with the statistic's name in one plugin")


# -- module converters: torch module classes traced as one layer ------------------------------

def module_converters() -> dict[type, Any]:
    """Module class -> convert function, from the plugins' ``register_module_converters`` hooks."""
    load_plugins()
    if _state._converters is None:
        found: dict[type, tuple[ModuleConverter, str]] = {}
        _call_each("register_module_converters", lambda item, owner: _add_converter(found, item, owner))
        _state._converters = {cls: converter.convert for cls, (converter, _) in found.items()}
    return _state._converters


def _add_converter(table: dict[type, tuple[ModuleConverter, str]], converter: Any, owner: str) -> None:
    if not isinstance(converter, ModuleConverter) or not isinstance(converter.module_class, type):
        raise PluginError(f"plugin {owner} registered {converter!r} as a module converter; "
                          "call register(hpa.ModuleConverter(module_class, convert))")
    cls = converter.module_class
    if cls in table and (table[cls][1], table[cls][0]) != (owner, converter):
        raise PluginError(f"plugins {table[cls][1]} and {owner} both register a module converter for "
                          f"{cls.__module__}.{cls.__qualname__}; disable one with HPA_DISABLE_PLUGINS")
    table[cls] = (converter, owner)


def describe_plugins() -> list[dict[str, Any]]:
    """Every plugin with its distribution and version, hooks, what it registers and their options; failures
    included.  ``distribution`` is the installed package that provides it ("hpa" for the built-ins, "" for a
    plugin registered in-process)."""
    load_plugins()
    registered = _registered_by_plugin()
    out = []
    for name, plugin in sorted(_state.pm.list_name_plugin(), key=lambda np_: np_[0]):
        hooks = sorted(h.name for h in _state.pm.get_hookcallers(plugin) or [])
        out.append({
            "name": name,
            "hooks": hooks,
            "distribution": _state.distributions.get(name, ""),
            "version": _state.versions.get(name, ""),
            "builtin": name in BUILTIN_PLUGINS,
            **registered.get(name, {}),
        })
    for failure in _state.failures:
        out.append({"name": failure.name, "hooks": [], "distribution": _state.distributions.get(failure.name, ""),
                    "version": "", "error": failure.error})
    return out


def _registered_by_plugin() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """plugin -> {"loaders": [...], "statistics": [...], ...}: names, descriptions and options."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind, registry in registries().items():
        for item in registry.items():
            name = getattr(item, registry.key)
            entry = {"name": name, "kind": type(item).__name__.lower(),  # loader, statistic, experiment, task
                     "description": getattr(item, "description", "")}
            if getattr(item, "suffixes", ()):
                entry["suffixes"] = list(item.suffixes)
            entry["options"] = [option.describe() for option in getattr(item, "options", ())]
            out.setdefault(registry.owner(name), {}).setdefault(kind, []).append(entry)
    return out


def _split(value: str) -> set[str]:
    return {part.strip() for part in value.split(",") if part.strip()}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _reset_for_tests() -> None:
    """Forget every loaded plugin; the next call loads them again."""
    global _state
    _state = _State()
