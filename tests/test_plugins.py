"""The plugin system: built-ins, entry points, failures, collisions, and every hook."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

import hpa
from hpa import hookspecs
from hpa.plugins import BUILTIN_PLUGINS, describe_plugins, registries

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
    assert [e.name for e in hpa.list_experiments()] == ["noop"]


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


def test_light_commands_do_not_import_torch(run_hpa):
    code = ("import sys\nfrom hpa.cli import main\n"
            "for argv in (['--help'], ['plugins'], ['scan', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'numpy' in sys.modules)")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH False", proc.stdout + proc.stderr
