"""Reading a run back: ``hpa.open_run``, the ``run:`` loader, ``hpa analyse-run``, resuming past a damaged
file, and the trainer's progress display."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import hpa
from conftest import assert_bad_input

EPOCHS = 2


def _train(folder, **options):
    from hpa.experiments.train import train

    return train("digits", out=folder, epochs=options.pop("epochs", EPOCHS), device="cpu", **options)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("open_run") / "run")


def numpy_n_l(weight: np.ndarray) -> float:
    """docs/statistics.md §1, straight from the array: the fraction of filters whose sum is <= 0."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    cosines = rows.sum(1) / (np.linalg.norm(rows, axis=1) * np.sqrt(rows.shape[1]))
    return float(np.mean(cosines <= 0))


# -- open_run -----------------------------------------------------------------------------------

def test_metrics_and_series_frames_hold_the_files_values(run):
    opened = hpa.open_run(run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    frame = opened.metrics
    assert frame["epoch"].tolist() == [m["epoch"] for m in lines] == list(range(EPOCHS + 1))
    assert frame["val_accuracy"].tolist() == [m["val_accuracy"] for m in lines]
    assert set(frame["seed"]) == {0}
    with open(run / "series.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    series = opened.series
    assert len(series) == len(rows)
    assert series["layer"].tolist() == [r["layer"] for r in rows]
    expected = [float(r["projection.n_l"]) if r["projection.n_l"] else np.nan for r in rows]  # skipped: empty
    np.testing.assert_array_equal(series["projection.n_l"].to_numpy(dtype=float), expected)
    assert np.isfinite(expected).sum() == 3 * (EPOCHS + 1)
    assert opened.epochs() == list(range(EPOCHS + 1))


def test_graph_of_an_epoch_equals_a_fresh_trace_of_its_snapshot(run):
    import torch
    from safetensors.torch import load_file as load_tensors

    from hpa.plugins import registries
    from hpa.options import LoadOptions

    loader = registries()["loaders"].get("cifar")
    module = loader.build("small_max", LoadOptions(weights="none", input_size=(1, 8, 8),
                                                   extra={"num_classes": 10, "in_channels": 1}))
    module.load_state_dict(load_tensors(str(run / "snapshots" / f"epoch-{EPOCHS:03d}.safetensors")))
    traced = hpa.load(module, input_size=(1, 8, 8))
    rebound = hpa.open_run(run).graph(EPOCHS)
    assert [layer.name for layer in rebound] == [layer.name for layer in traced]
    for mine, fresh in zip(rebound, traced):
        assert mine.attributes() == fresh.attributes()
        np.testing.assert_array_equal(mine.weight, fresh.weight)
        np.testing.assert_array_equal(mine.bias, fresh.bias)
    assert [s.to_dict() for s in rebound.skipped] == [s.to_dict() for s in traced.skipped]
    assert rebound.input_shape == traced.input_shape == (1, 8, 8)
    assert not torch.equal(torch.zeros(1), torch.ones(1))  # torch really imported, the module really built


def test_a_missing_epoch_names_the_saved_ones(run):
    with pytest.raises(hpa.OptionError, match="saved epochs are 0, 1, 2"):
        hpa.open_run(run).graph(7)
    with pytest.raises(hpa.HpaError, match="not an hpa run folder"):
        hpa.open_run(run / "snapshots")


# -- the run: loader ------------------------------------------------------------------------------

def test_run_spec_compare_init_is_numpy_on_the_snapshot_and_on_epoch_zero(run, run_hpa):
    proc = run_hpa("scan", f"run:{run}@{EPOCHS}", "--compare-init", "--stat", "projection", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    final = load_file(run / "snapshots" / f"epoch-{EPOCHS:03d}.safetensors")
    init = load_file(run / "snapshots" / "epoch-000.safetensors")
    layers = {entry["name"]: entry["statistics"].get("projection") for entry in result["layers"]}
    for name in ("features.0", "features.3", "features.6"):
        assert layers[name]["n_l"] == numpy_n_l(final[f"{name}.weight"])
        assert layers[name]["init"]["n_l"] == numpy_n_l(init[f"{name}.weight"])
    assert result["init"]["weights"] == "epoch 0"
    # without @EPOCH: the last saved epoch
    proc = run_hpa("scan", f"run:{run}", "--stat", "projection", "--json")
    assert json.loads(proc.stdout)["layers"][1]["statistics"]["projection"]["n_l"] == layers["features.3"]["n_l"]


@pytest.mark.parametrize("epoch, words", [("9", ("epoch 9", "0, 1, 2")), ("x", ("whole number",))])
def test_run_spec_with_a_bad_epoch_is_one_line(run, run_hpa, epoch, words):
    assert_bad_input(run_hpa("scan", f"run:{run}@{epoch}"), *words)


# -- several seeds ------------------------------------------------------------------------------

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from hpa.experiments.seeds import train_seeds

    return train_seeds(list(SEEDS), tmp_path_factory.mktemp("open_run") / "seeds", task="digits", epochs=1,
                       device="cpu", statistics=("projection",))


def _finite(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def test_frames_and_the_summary_of_several_seeds_hold_each_seeds_values(seeds):
    """seeds.py: "summary.csv has one row per (epoch, layer) with the mean and standard deviation over seeds of
    every numeric series.csv column; summary.json holds the same for metrics.jsonl per epoch"."""
    run = hpa.open_run(seeds)
    series, metrics = run.series, run.metrics
    per_seed = {}
    for seed in SEEDS:
        with open(seeds / f"seed-{seed}" / "series.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        per_seed[seed] = {(r["epoch"], r["layer"]): r for r in rows}
        mine = series[series["seed"] == seed]
        assert mine["layer"].tolist() == [r["layer"] for r in rows]
        np.testing.assert_array_equal(mine["projection.n_l"].to_numpy(dtype=float),
                                      [float(r["projection.n_l"] or "nan") for r in rows])
        lines = [json.loads(line) for line in (seeds / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[metrics["seed"] == seed]["test_loss"].tolist() == [m["test_loss"] for m in lines]
    with open(seeds / "summary.csv", newline="") as handle:
        summary = {(r["epoch"], r["layer"]): r for r in csv.DictReader(handle)}
    assert set(summary) == set(per_seed[0]) == set(per_seed[1])
    checked, spread = 0, 0
    for key, row in summary.items():
        assert row["n_seeds"] == str(len(SEEDS))
        for column in set(per_seed[0][key]) - {"epoch", "layer"}:
            values = [_finite(per_seed[seed][key][column]) for seed in SEEDS]
            if None in values:  # not a number in some seed: no mean, no std
                assert not row.get(f"{column}.mean") and not row.get(f"{column}.std")
                continue
            assert float(row[f"{column}.mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            assert float(row[f"{column}.std"]) == pytest.approx(np.std(values), abs=1e-12)  # ddof 0
            checked, spread = checked + 1, spread + (np.std(values) > 0)
    assert checked > 20 and spread > 10  # many columns, and the seeds differ
    (entry,) = json.loads((seeds / "summary.json").read_text())["metrics"][1:]  # epoch 0 has no training loss
    values = metrics[metrics["epoch"] == 1]["train_loss"].to_numpy(dtype=float)
    assert values[0] != values[1]
    assert entry["train_loss.mean"] == pytest.approx(values.mean())
    assert entry["train_loss.std"] == pytest.approx(values.std())


# -- analyse-run ----------------------------------------------------------------------------------

def test_analyse_run_refuses_an_unknown_statistic(run, run_hpa):
    assert_bad_input(run_hpa("analyse-run", run, "--stat", "projecton"), "projection")


# -- resuming past a damaged file -------------------------------------------------------------

def test_a_truncated_last_snapshot_is_rewritten_from_the_state(tmp_path, run_hpa):
    folder = _train(tmp_path / "run")
    snapshot = folder / "snapshots" / f"epoch-{EPOCHS:03d}.safetensors"
    whole = snapshot.read_bytes()
    snapshot.write_bytes(whole[: len(whole) // 2])
    proc = run_hpa("train", "--resume", folder)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "damaged" in warning[0] and snapshot.name in warning[0]
    assert snapshot.read_bytes() == whole


def test_an_unreadable_state_falls_back_to_the_last_good_epoch(tmp_path, run_hpa):
    folder = _train(tmp_path / "run")
    last = folder / "snapshots" / f"epoch-{EPOCHS:03d}.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    state = folder / "state" / "last.pt"
    state.write_bytes(state.read_bytes()[:50])
    proc = run_hpa("train", "--resume", folder)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and f"last good epoch, {EPOCHS - 1}" in warning[0]
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(EPOCHS + 1))
    load_file(last)  # whole again
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"


# -- progress ----------------------------------------------------------------------------------

def test_progress_is_a_bar_per_epoch_on_a_terminal_and_a_line_elsewhere(tmp_path):
    from hpa.render.training_progress import TrainingProgress

    plain, terminal = io.StringIO(), io.StringIO()
    _train(tmp_path / "plain", progress=TrainingProgress(stream=plain, bars=False))
    _train(tmp_path / "bars", progress=TrainingProgress(stream=terminal, bars=True))
    lines = plain.getvalue().splitlines()
    assert len(lines) == EPOCHS + 1 and all(line.startswith(f"epoch {n}/{EPOCHS}:") for n, line in enumerate(lines))
    drawn = terminal.getvalue()
    assert "img/s" in drawn and f"epoch 1/{EPOCHS}:" in drawn and "left" in drawn
    assert f"epoch 2/{EPOCHS}:" in drawn and "last: loss" in drawn  # the first epoch's numbers on the second bar
    assert "\r" in drawn and "\r" not in plain.getvalue()
    for line in lines:  # every plain line is also on the terminal, whole (but its seconds)
        assert line.rsplit(" ", 1)[0] in drawn


def test_the_run_folder_can_be_copied_and_still_opened(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert hpa.open_run(copy).graph(0)["features.0"].weight.shape == (64, 1, 3, 3)


# -- architectures of the torchvision and timm loaders train too ----------------------------------

@pytest.mark.parametrize("arch, first, last", [("torchvision:resnet18", "conv1", "fc"),
                                               ("timm:resnet10t", "conv1.0", "fc")])
def test_torchvision_and_timm_architectures_train_with_the_tasks_channels_and_classes(tmp_path, arch, first, last):
    from safetensors.numpy import load_file as load_arrays

    folder = _train(tmp_path / "run", arch=arch, epochs=1, statistics=("none",))
    graph = hpa.open_run(folder).graph(1)
    assert graph[first].weight.shape[1] == 1  # digits: one channel
    assert graph[last].weight.shape[0] == 10  # ten classes
    assert graph[first].bn_folded  # the BatchNorm after it, folded by rebind as a trace folds it
    before, after = (load_arrays(folder / "snapshots" / f"epoch-00{e}.safetensors")[f"{first}.weight"] for e in (0, 1))
    assert before.shape[1] == 1 and not np.array_equal(before, after)  # it trained
