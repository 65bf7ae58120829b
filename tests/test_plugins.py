"""The plugin system: built-ins, entry points, failures, collisions, and every hook."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hpa
from hpa import hookspecs
from conftest import assert_bad_input
from hpa.plugins import BUILTIN_PLUGINS, describe_plugins, module_converters, registries

ROOT = Path(__file__).resolve().parent.parent


def fake_distribution(root: Path, name: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """Write an installed-looking distribution (dist-info + modules) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[hpa]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


THIRD_PARTY = """
    import hpa
    from hpa.registry import Statistic, StatisticResult

    def compute(graph, context):
        return StatisticResult(layers={l.name: {"n_weights": int(l.weight.size)} for l in graph})

    @hpa.hookimpl
    def register_statistics(register):
        register(Statistic(name="weight_count", compute=compute, description="weights per layer"))
"""


def test_builtins_are_listed_with_hooks_and_version(run_hpa):
    proc = run_hpa("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert set(BUILTIN_PLUGINS) <= set(listed)
    assert listed["projection"]["hooks"] == ["register_statistics"]
    assert listed["torchvision"]["hooks"] == ["register_loaders"]
    assert listed["projection"]["version"] == hpa.__version__


def test_entry_point_plugin_is_found_and_usable(tmp_path, run_hpa):
    site = fake_distribution(tmp_path / "site", "hpa-weight-count", {"hpa_weight_count": THIRD_PARTY},
                             {"weight_count": "hpa_weight_count"})
    env = {"PYTHONPATH": str(site), "HPA_DISABLE_PLUGIN_AUTOLOAD": ""}
    listed = {p["name"]: p for p in json.loads(run_hpa("plugins", "--json", env=env).stdout)}
    assert listed["weight_count"]["version"] == "0.3" and listed["weight_count"]["hooks"] == ["register_statistics"]
    net = tmp_path / "net.pt"
    import torch
    torch.save(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 1)).state_dict(), net)
    proc = run_hpa("scan", net, "--stat", "weight_count", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout)["layers"]
    assert [l["statistics"]["weight_count"]["n_weights"] for l in layers] == [2 * 3 * 9, 3 * 4]
    disabled = run_hpa("plugins", "--json", env=dict(env, HPA_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert "weight_count" not in {p["name"] for p in json.loads(disabled.stdout)}


def test_plugin_that_fails_to_import_is_reported_not_fatal(tmp_path, run_hpa):
    site = fake_distribution(tmp_path / "site", "hpa-broken", {"hpa_broken": "raise ImportError('needs libfoo')"},
                             {"broken": "hpa_broken"})
    env = {"PYTHONPATH": str(site), "HPA_DISABLE_PLUGIN_AUTOLOAD": "0"}
    proc = run_hpa("plugins", "--json", env=env)
    assert proc.returncode == 0
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert "needs libfoo" in listed["broken"]["error"]
    assert 'Error importing plugin "broken"' in proc.stderr
    assert "projection" in listed


def test_misspelled_hook_is_an_error(temporary_plugin):
    class Typo:
        @hpa.hookimpl
        def register_statistic(self, register):  # missing "s"
            pass

    with pytest.raises(hpa.PluginError, match="register_statistic"):
        temporary_plugin(Typo(), "typo")


def test_name_collision_is_refused(temporary_plugin):
    from hpa.registry import Statistic

    class Clash:
        @hpa.hookimpl
        def register_statistics(self, register):
            register(Statistic(name="projection", compute=lambda g, c: None))

    temporary_plugin(Clash(), "clash")
    with pytest.raises(hpa.PluginError, match="both register the statistic 'projection'"):
        registries()


def test_hook_register_loaders(temporary_plugin):
    from hpa.graph import ConvGraph, Layer
    from hpa.registry import Loader

    def load(name, options):
        weight = np.full((2, 1, 3, 3), float(name))
        return ConvGraph([Layer(name="only", index=0, kind="conv2d", weight=weight)])

    class Const:
        @hpa.hookimpl
        def register_loaders(self, register):
            register(Loader(prefix="const", load=load, list_models=lambda: ["1", "-1"]))

    temporary_plugin(Const(), "const")
    assert hpa.list_models("const") == ["-1", "1"]
    assert hpa.scan("const:-1").statistics["projection"].layers["only"]["n_l"] == 1.0
    assert hpa.scan("const:1").statistics["projection"].layers["only"]["n_l"] == 0.0


def test_hook_register_statistics(temporary_plugin):
    from hpa.registry import Statistic, StatisticResult

    class Norms:
        @hpa.hookimpl
        def register_statistics(self, register):
            register(Statistic(name="max_abs", compute=lambda g, c: StatisticResult(
                layers={l.name: {"max": float(np.abs(l.weight).max())} for l in g})))

    temporary_plugin(Norms(), "norms")
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    result = hpa.scan(model, input_size=(1, 5, 5), statistics=["max_abs"])
    assert result.to_dict()["layers"][0]["statistics"]["max_abs"]["max"] == pytest.approx(
        float(model[0].weight.abs().max()))
    assert set(result.statistics) == {"max_abs"}


def test_hook_register_experiments(temporary_plugin):
    from hpa.registry import Experiment

    class Exp:
        @hpa.hookimpl
        def register_experiments(self, register):
            register(Experiment(name="noop", run=lambda: 42, description="does nothing"))

    temporary_plugin(Exp(), "exp")
    assert "noop" in [e.name for e in hpa.list_experiments()]
    assert registries()["experiments"].owner("noop") == "exp"


def test_hook_register_commands(tmp_path, run_hpa):
    source = """
        import click, hpa
        @hpa.hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello from a plugin")
    """
    site = fake_distribution(tmp_path / "site", "hpa-hello", {"hpa_hello": source}, {"hello": "hpa_hello"})
    proc = run_hpa("hello", env={"PYTHONPATH": str(site), "HPA_DISABLE_PLUGIN_AUTOLOAD": ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "hello from a plugin"


def test_every_hook_has_a_test_and_is_documented():
    hooks = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    tests = {name for name in globals() if name.startswith("test_hook_")}
    readme = (ROOT / "README.md").read_text()
    for hook in hooks:
        assert f"test_hook_{hook}" in tests, f"no test for hook {hook}"
        assert f"{hook}(" in readme, f"hook {hook} is not documented in README.md"


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["plugins", "--json"], ["scan", "--help"]])
def test_light_commands_do_not_import_torch_and_are_fast(argv):
    # CPU time inside a fresh interpreter, from the first hpa import to the command's exit (the
    # interpreter's own start is not hpa's); CPU rather than wall time, and the best of three,
    # because other processes share this machine.
    code = ("import sys, time\nstart = time.process_time()\nfrom hpa.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.process_time() - start)")
    timings = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        marker, seconds = proc.stdout.strip().splitlines()[-1].split()
        assert marker == "NO-TORCH", proc.stdout + proc.stderr
        timings.append(float(seconds))
    assert min(timings) < 0.3, timings


def test_hook_register_module_converters(temporary_plugin):
    from hpa.graph import Layer
    from hpa.registry import ModuleConverter

    class Doubled(nn.Module):
        """A conv whose weights are stored halved: the real filter is 2 * halved."""

        def __init__(self):
            super().__init__()
            self.halved = nn.Parameter(torch.tensor([[[[-1.0, 2.0], [3.0, 4.0]]], [[[-5.0, -1.0], [0.5, 1.0]]]]))

        def forward(self, x):
            return nn.functional.conv2d(x, 2 * self.halved)

    def convert(module, name, x, y):
        weight = (2 * module.halved).detach().double().numpy()
        return Layer(name=name, index=0, kind="conv2d", weight=weight,
                     input_shape=tuple(x.shape[1:]), output_shape=tuple(y.shape[1:]))

    class Converters:
        @hpa.hookimpl
        def register_module_converters(self, register):
            register(ModuleConverter(Doubled, convert))

    temporary_plugin(Converters(), "doubled")
    assert module_converters()[Doubled] is convert
    graph = hpa.load(nn.Sequential(Doubled()), input_size=(1, 4, 4))
    assert [layer.name for layer in graph] == ["0"]
    np.testing.assert_array_equal(graph["0"].weight, 2 * Doubled().halved.detach().double().numpy())
    # filter 0 sums to +16, filter 1 to -9: one of two cosines is negative
    assert hpa.analyse(graph, statistics=["projection"]).statistics["projection"].layers["0"]["n_l"] == 0.5


def test_module_converter_collisions_and_bad_registrations_are_refused(temporary_plugin):
    from hpa.nn import ChannelReLUConv2d
    from hpa.registry import ModuleConverter

    class Clash:
        @hpa.hookimpl
        def register_module_converters(self, register):
            register(ModuleConverter(ChannelReLUConv2d, lambda module, name, x, y: None))

    temporary_plugin(Clash(), "clash")
    with pytest.raises(hpa.PluginError, match="both register a module converter for hpa.nn.ChannelReLUConv2d"):
        module_converters()
    hpa.plugins.unregister("clash")

    class NotAConverter:
        @hpa.hookimpl
        def register_module_converters(self, register):
            register(nn.Conv2d)

    temporary_plugin(NotAConverter(), "bad")
    with pytest.raises(hpa.PluginError, match="hpa.ModuleConverter"):
        module_converters()


def test_trace_hooks_traces_every_hook_call(run_hpa):
    proc = run_hpa("plugins", env={"HPA_TRACE_HOOKS": "1"})
    assert proc.returncode == 0, proc.stderr
    for hook in ("register_commands", "register_loaders", "register_statistics", "register_experiments"):
        assert hook in proc.stderr, (hook, proc.stderr)
    # one call per implementing plugin, each traced with the plugin's name
    for name in ("projection", "cones", "torchvision", "zoo"):
        assert f"<register for plugin '{name}'>" in proc.stderr, name
    quiet = run_hpa("plugins")
    assert "register_loaders" not in quiet.stderr


def test_disable_plugins_removes_their_registrations(run_hpa, tmp_path):
    proc = run_hpa("plugins", "--json", env={"HPA_DISABLE_PLUGINS": "cones, zoo"})
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert "cones" not in names and "zoo" not in names and "projection" in names
    scan = run_hpa("scan", "zoo:digits_cnn", env={"HPA_DISABLE_PLUGINS": "zoo"})
    assert_bad_input(scan, "unknown loader prefix 'zoo'")
    stat = run_hpa("scan", "x.onnx", "--stat", "cones", env={"HPA_DISABLE_PLUGINS": "cones"})
    assert_bad_input(stat, "unknown statistic 'cones'")


def test_builtin_plugin_list_matches_pyproject():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["hpa"]
    assert entry_points == BUILTIN_PLUGINS


def test_plugins_lists_registrations_and_their_options(run_hpa):
    listed = {p["name"]: p for p in json.loads(run_hpa("plugins", "--json").stdout)}
    cones = listed["cones"]["statistics"]
    assert [s["name"] for s in cones] == ["cones"]
    options = {o["name"]: o for o in cones[0]["options"]}
    assert set(options) == {"cones_device", "cones_memory_mb", "cones_rotation"}
    assert options["cones_rotation"] == {"name": "cones_rotation", "type": "bool", "default": True,
                                         "help": options["cones_rotation"]["help"], "choices": []}
    assert listed["onnx"]["loaders"][0]["suffixes"] == [".onnx"]
    assert "num_classes" in {o["name"] for o in listed["torchvision"]["loaders"][0]["options"]}
    # every registry entry appears under the plugin that registered it, and nowhere else
    for kind, registry in registries().items():
        for name in registry.names():
            owners = [p for p in listed.values() if name in {e["name"] for e in p.get(kind, [])}]
            assert [p["name"] for p in owners] == [registry.owner(name)]
    text = run_hpa("plugins").stdout
    assert "statistic cones" in text and "-o cones_device=VALUE" in text and "loader torchvision:" in text


def test_scan_help_lists_installed_statistics(run_hpa, temporary_plugin):
    proc = run_hpa("scan", "--help")
    assert proc.returncode == 0
    help_text = proc.stdout
    for stat in registries()["statistics"].items():
        assert stat.name in help_text
        for option in stat.options:
            assert f"-o {option.name}=" in help_text
