"""The plugin manager: built-in and third-party plugins, loaded the same way.

Built-in plugins live in ``hpa_plugins`` (the ``plugins/`` folder) and are
declared in hpa's own ``pyproject.toml`` under the ``hpa`` entry-point group,
exactly like a third-party plugin.  ``BUILTIN_PLUGINS`` names them again so that
hpa still works when entry-point autoloading is turned off or when it runs
from a source tree that was never installed.

Environment variables:

* ``HPA_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points except hpa's own.
* ``HPA_DISABLE_PLUGINS=a,b``: skip the named plugins (built-in or not).
* ``HPA_TRACE_HOOKS=1``: print every hook call on stderr (for plugin authors).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from hpa import hookspecs
from hpa.errors import PluginError
from hpa.registry import Experiment, Loader, Registry, Statistic

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
}


@dataclass(frozen=True)
class PluginFailure:
    name: str
    error: str


class HpaWarning(UserWarning):
    """Warnings hpa emits about plugins and data (shown once, on stderr)."""


class _State:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("hpa")
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.versions: dict[str, str] = {}
        self.loaded = False
        self._registries: dict[str, Registry] | None = None


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
            _register_module(name, module, own_version)
    if not _truthy(os.environ.get("HPA_DISABLE_PLUGIN_AUTOLOAD")):
        for entry_point in metadata.entry_points(group=GROUP):
            if entry_point.name in disabled or entry_point.name in BUILTIN_PLUGINS:
                continue
            dist = getattr(entry_point, "dist", None)
            version = dist.version if dist is not None else ""
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
    _state._registries = None


def unregister(name: str) -> None:
    load_plugins()
    _state.pm.unregister(name=name)
    _state._registries = None


def registries() -> dict[str, Registry]:
    """The loader, statistic and experiment registries, built from the hooks once."""
    load_plugins()
    if _state._registries is None:
        regs = {
            "loaders": Registry[Loader]("loader", "prefix"),
            "statistics": Registry[Statistic]("statistic", "name"),
            "experiments": Registry[Experiment]("experiment", "name"),
        }
        hooks = {
            "loaders": _state.pm.hook.register_loaders,
            "statistics": _state.pm.hook.register_statistics,
            "experiments": _state.pm.hook.register_experiments,
        }
        for key, hook in hooks.items():
            for impl in hook.get_hookimpls():
                owner = impl.plugin_name
                impl.function(register=lambda item, _o=owner, _r=regs[key]: _r.register(item, _o))
        _state._registries = regs
    return _state._registries


def describe_plugins() -> list[dict[str, Any]]:
    """Every plugin with its hooks and version, failures included."""
    load_plugins()
    out = []
    for name, plugin in sorted(_state.pm.list_name_plugin(), key=lambda np_: np_[0]):
        hooks = sorted(h.name for h in _state.pm.get_hookcallers(plugin) or [])
        out.append({
            "name": name,
            "hooks": hooks,
            "version": _state.versions.get(name, ""),
            "builtin": name in BUILTIN_PLUGINS,
        })
    for failure in _state.failures:
        out.append({"name": failure.name, "hooks": [], "version": "", "error": failure.error})
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
