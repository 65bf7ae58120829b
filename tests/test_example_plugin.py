"""The third-party plugin in examples/hpa-filter-norms, installed for real and found through entry points.

It is pip-installed (offline, no build isolation) into a temporary folder that
only the subprocesses here put on PYTHONPATH, so the test venv is never changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hpa
from conftest import ROOT, assert_bad_input

EXAMPLE = ROOT / "examples" / "hpa-filter-norms"

pytestmark = pytest.mark.slow


def _pip_install(package: Path, work: Path) -> Path:
    """Install ``package`` with real pip into ``work/site`` (module + dist-info with its entry point)."""
    source = shutil.copytree(package, work / "src")  # the build writes egg-info; keep the repo clean
    target = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed example plugin."""
    target = _pip_install(EXAMPLE, tmp_path_factory.mktemp("example-plugin"))
    assert (target / "hpa_filter_norms.py").exists()
    return target


@pytest.fixture
def hpa_with_plugin(site, tmp_path):
    """Run ``hpa`` with the example installed and entry-point autoloading on."""

    def run(*args, autoload: bool = True):
        env = {k: v for k, v in os.environ.items() if k != "HPA_DISABLE_PLUGIN_AUTOLOAD"}
        if not autoload:
            env["HPA_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-m", "hpa", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)

    return run


def test_entry_point_is_discovered_through_importlib_metadata(site):
    code = ("from importlib.metadata import entry_points; "
            "print([(e.name, e.value, e.dist.name) for e in entry_points(group='hpa') if e.name == 'filter_norms'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(site))).stdout
    assert out.strip() == "[('filter_norms', 'hpa_filter_norms', 'hpa-filter-norms')]"


def test_hpa_plugins_lists_it(hpa_with_plugin):
    proc = hpa_with_plugin("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    entry = next(p for p in json.loads(proc.stdout) if p["name"] == "filter_norms")
    assert entry["hooks"] == ["register_loaders", "register_statistics"]
    assert entry["version"] == "0.1.0" and not entry.get("builtin") and "error" not in entry
    assert entry["distribution"] == "hpa-filter-norms"  # what was pip-installed, not the entry point's name
    assert next(p for p in json.loads(proc.stdout) if p["name"] == "projection")["distribution"] == "hpa"


def test_hpa_plugins_shows_the_installed_distribution_and_its_version(hpa_with_plugin):
    proc = hpa_with_plugin("plugins")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("filter_norms "))
    assert line.split()[:3] == ["filter_norms", "hpa-filter-norms", "0.1.0"], line
    assert line.rstrip().endswith("register_loaders, register_statistics")


def test_autoload_off_leaves_it_out(hpa_with_plugin):
    proc = hpa_with_plugin("plugins", "--json", autoload=False)
    assert proc.returncode == 0, proc.stderr
    assert "filter_norms" not in [p["name"] for p in json.loads(proc.stdout)]
    assert_bad_input(hpa_with_plugin("scan", "zoo:digits_cnn", "--stat", "filter_norms", autoload=False),
                     "filter_norms")


def test_scan_stat_filter_norms_reports_the_norms(hpa_with_plugin):
    proc = hpa_with_plugin("scan", "zoo:digits_cnn", "--stat", "filter_norms", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["statistics"] == ["filter_norms"]
    graph = hpa.load("zoo:digits_cnn")  # in this process, without the plugin: the same weights
    for entry in data["layers"]:
        values = entry["statistics"].get("filter_norms")
        if entry["kind"] == "linear":
            assert values is None
            continue
        w = np.asarray(graph[entry["name"]].weight, np.float64)
        expected = np.array([np.linalg.norm(w[i]) for i in range(w.shape[0])])  # bn-folded, as analysed
        np.testing.assert_allclose(values["norms"], expected, rtol=1e-12)
        assert values["mean"] == pytest.approx(expected.mean(), rel=1e-12)
        assert (values["min"], values["max"]) == pytest.approx((expected.min(), expected.max()), rel=1e-12)
        assert values["n_filters"] == w.shape[0]
    assert {"name": "fc", "reason": "linear layer; pass --with-linear", "statistic": "filter_norms"} \
        in data["skipped"]


def test_scan_table_shows_its_columns(hpa_with_plugin):
    proc = hpa_with_plugin("scan", "zoo:digits_cnn", "--stat", "filter_norms")
    assert proc.returncode == 0, proc.stderr
    assert "mean norm" in proc.stdout


def test_npz_loader_loads_a_file_written_here(hpa_with_plugin, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"stem.weight": rng.standard_normal((8, 3, 3, 3)), "stem.bias": rng.standard_normal(8),
              "block.weight": rng.standard_normal((4, 8, 1, 1)), "head.weight": rng.standard_normal((2, 4)),
              "step": np.array(7)}
    path = tmp_path / "weights.npz"
    np.savez(path, **arrays)
    for spec in (path, f"npz:{path}"):
        proc = hpa_with_plugin("scan", spec, "--json", "--with-linear")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["model"]["loader"] == "npz"
        assert [(l["name"], l["kind"]) for l in data["layers"]] == [
            ("stem", "conv2d"), ("block", "conv2d"), ("head", "linear")]
        for layer in data["layers"]:
            w = arrays[f"{layer['name']}.weight"].reshape(len(arrays[f"{layer['name']}.weight"]), -1)
            cos = w.sum(1) / (np.linalg.norm(w, axis=1) * np.sqrt(w.shape[1]))
            np.testing.assert_allclose(layer["statistics"]["projection"]["cosines"], cos, atol=1e-12)
            np.testing.assert_allclose(layer["statistics"]["filter_norms"]["norms"], np.linalg.norm(w, axis=1),
                                       rtol=1e-12)
        assert data["skipped"][0]["name"] == "step"


def test_npz_loader_rejects_a_damaged_file(hpa_with_plugin, tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(os.urandom(256))
    assert_bad_input(hpa_with_plugin("scan", path), "broken.npz", "not a readable .npz")


def test_library_use_example_runs(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "library_use.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "conv4  n_l=" in proc.stdout
    assert (tmp_path / "out" / "digits_cnn.csv").exists()
    assert list((tmp_path / "out" / "digits_cnn").glob("*.png"))


# -- a third-party training task: examples/hpa-stripes ------------------------------------------

STRIPES = ROOT / "examples" / "hpa-stripes"


@pytest.fixture(scope="module")
def stripes_site(tmp_path_factory) -> Path:
    return _pip_install(STRIPES, tmp_path_factory.mktemp("stripes-plugin"))


def _hpa_with(site: Path, cwd: Path, *args):
    env = {k: v for k, v in os.environ.items() if k != "HPA_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "hpa", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_an_installed_task_is_listed_and_trained_by_hpa_train(stripes_site, tmp_path):
    proc = _hpa_with(stripes_site, tmp_path, "experiments", "--json")
    assert proc.returncode == 0, proc.stderr
    task = next(t for t in json.loads(proc.stdout) if t["name"] == "stripes")
    assert task["architecture"] == "cifar:small_max" and task["num_classes"] == 3
    proc = _hpa_with(stripes_site, tmp_path, "train", "--plugin", "stripes", "--epochs", "3", "--device", "cpu",
                     "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["task"] == "stripes" and record["num_classes"] == 3
    assert record["config"]["recipe"]["batch_size"] == 32  # the task's own recipe
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["test_accuracy"] > 0.6  # chance is 1/3: the stripes are learnt
    # the same labels, recomputed here: the orientation of each image's stripes
    sys.path.insert(0, str(stripes_site))
    try:
        import hpa_stripes

        data = hpa_stripes.stripes(None, False)
    finally:
        sys.path.remove(str(stripes_site))
    for image, label in zip(data.train_images[:, 0] > 0.5, data.train_labels):
        uniform_rows = all(len(set(row)) == 1 for row in image)  # horizontal stripes
        uniform_cols = all(len(set(col)) == 1 for col in image.T)  # vertical stripes
        assert (label == 0) == uniform_rows and (label == 1) == uniform_cols


def test_a_misspelt_task_suggests_the_installed_one(stripes_site, tmp_path):
    proc = _hpa_with(stripes_site, tmp_path, "train", "--plugin", "stripe", "--out", tmp_path / "run")
    assert_bad_input(proc, "did you mean 'stripes'")
    assert not (tmp_path / "run").exists()
