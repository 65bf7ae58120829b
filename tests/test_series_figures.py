"""Figures over epochs (hpa.render.series and each statistic's plot_series), for one seed and several."""

from __future__ import annotations

import csv
import json
import struct
import warnings

import numpy as np
import pytest

import hpa
from hpa.registry import Statistic, StatisticResult
from hpa.render import series as curves
from hpa.render import style

SEEDS = (0, 1)
EPOCHS = 3
FIGURES = {"training.png", "projection_n_l_epochs.png", "projection_distance_epochs.png", "cones_states_epochs.png"}


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    """Two seeds of a net with cone pairs (dilated convs, no pooling between), the lr decayed after epoch 2."""
    from hpa.experiments.seeds import train_seeds

    return train_seeds(list(SEEDS), tmp_path_factory.mktemp("series") / "run", task="digits",
                       arch="cifar:small_dilation", epochs=EPOCHS, step_epochs=2, device="cpu",
                       statistics=("projection", "cones"))


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def series_rows(folder, seed: int) -> list[dict]:
    with open(folder / f"seed-{seed}" / "series.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_trainer_draws_each_seed_and_the_seeds_together(seeds_run):
    for folder in [seeds_run / f"seed-{s}" / "figures" for s in SEEDS] + [seeds_run / "figures"]:
        assert {p.name for p in folder.iterdir()} == FIGURES
        for name in FIGURES:
            width, height = png_size(folder / name)
            assert width == round(style.FULL * style.HOUSE_DPI) and 300 < height < width  # a full-width figure


def test_decays_are_where_the_recipe_lowers_the_rate(seeds_run):
    from hpa.experiments.types import Recipe

    recipe = Recipe(step_epochs=2)
    expected = tuple(e - 1 for e in range(2, EPOCHS + 1) if recipe.lr_at(e) < recipe.lr_at(e - 1))
    assert expected == (2,)
    assert hpa.open_run(seeds_run).run_series().decay_epochs == expected


def test_the_band_is_the_mean_and_std_over_seeds(seeds_run):
    data = hpa.open_run(seeds_run).run_series()
    per_layer = data.layer_curves("projection.n_l")
    assert list(per_layer) == ["features.0", "features.2", "features.4", "features.6"]  # execution order
    for layer, curve in per_layer.items():
        epochs, mean, std = curves.mean_std(curve)
        values = np.array([[float(r["projection.n_l"]) for r in series_rows(seeds_run, s) if r["layer"] == layer]
                           for s in SEEDS])
        assert epochs == list(range(EPOCHS + 1))
        np.testing.assert_allclose(mean, values.mean(0), rtol=0, atol=1e-15)
        np.testing.assert_allclose(std, values.std(0), rtol=0, atol=1e-15)
    assert any(std[1] > 0 for _, _, std in map(curves.mean_std, per_layer.values()))  # seeds differ


def test_the_drawn_lines_are_the_values(seeds_run, monkeypatch):
    """Capture the figures instead of saving them and read the plotted data back."""
    drawn = {}

    def capture(figures, stem, fmt):
        drawn[stem.name] = figures
        return [stem]

    monkeypatch.setattr(style, "save", capture)
    hpa.open_run(seeds_run / "seed-1").plot(seeds_run / "unused")
    early, late = drawn["projection_n_l_epochs"][0].axes[:2]
    lines = {line.get_label(): line for line in early.lines + late.lines if not line.get_label().startswith("_")}
    rows = series_rows(seeds_run, 1)
    for layer in ("features.0", "features.6"):
        expected = [float(r["projection.n_l"]) for r in rows if r["layer"] == layer]
        assert list(lines[layer].get_ydata()) == expected
    assert set(lines) == {"features.0", "features.2", "features.4", "features.6"}
    # the training curves: each divided by its own maximum
    metrics = [json.loads(line) for line in (seeds_run / "seed-1" / "metrics.jsonl").read_text().splitlines()]
    loss_axes = drawn["training"][0].axes[0]
    train = next(line for line in loss_axes.lines if line.get_label() == "train")
    losses = [m["train_loss"] for m in metrics if m["train_loss"] is not None]
    np.testing.assert_allclose(train.get_ydata(), np.array(losses) / max(losses))
    # cone states: the fractions stored per epoch
    pair_axes = drawn["cones_states_epochs"][0].axes[1]  # axes[0] is the legend strip
    stored = [json.loads((seeds_run / "seed-1" / "stats" / f"epoch-{e:03d}.json").read_text())["pairs"][0]
              for e in range(EPOCHS + 1)]
    assert pair_axes.get_title().startswith(stored[0]["lower"])
    ofi = next(line for line in pair_axes.lines if line.get_label() == "OUT_FULL_IN")
    assert list(ofi.get_ydata()) == [entry["fractions"]["OUT_FULL_IN"] for entry in stored]


def test_a_third_party_statistic_draws_its_own_figure_over_epochs(temporary_plugin, tmp_path):
    from hpa.experiments.train import train

    seen = {}

    def compute(graph, context):
        return StatisticResult(layers={layer.name: {"max_abs": float(np.abs(layer.weight).max())} for layer in graph})

    def plot_series(data, folder, fmt):
        seen.update(data.layer_curves("max_abs.max_abs"))
        return curves.layer_figure(data, "max_abs.max_abs", folder / "max_abs_epochs", fmt, "max |w|")

    class Plugin:
        @hpa.hookimpl
        def register_statistics(self, register):
            register(Statistic(name="max_abs", compute=compute, plot_series=plot_series))
            register(Statistic(name="no_figures", compute=compute))

    temporary_plugin(Plugin(), "max-abs-series-test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train("digits", out=tmp_path / "run", epochs=1, device="cpu", statistics=("max_abs", "no_figures"))
    assert (run / "figures" / "max_abs_epochs.png").is_file()
    from safetensors.numpy import load_file

    final = load_file(run / "snapshots" / "epoch-001.safetensors")
    assert seen["features.3"][0][1][-1] == pytest.approx(float(np.abs(final["features.3.weight"]).max()))
    assert any("no_figures" in str(w.message) for w in caught)  # not dropped silently
