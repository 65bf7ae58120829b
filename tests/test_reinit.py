"""``hpa reinit``: re-initialisation cells against an independent computation, outputs and bad input.

One tiny real run of ``hpa train --plugin digits`` (2 epochs, every snapshot) is made once per
module; every test reads it and writes only under its own tmp_path.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hpa
from hpa.errors import ReinitError
from hpa.experiments.reinit import reinit

EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from hpa.experiments.train import train

    folder = tmp_path_factory.mktemp("reinit") / "run"
    train("digits", out=folder, epochs=EPOCHS, seed=0, device="cpu", statistics=["projection"])
    return folder


@pytest.fixture(scope="module")
def result(run):
    return reinit(run)


# -- an independent computation --------------------------------------------------------------------

def _digits_test_split():
    """The digits task's test split, straight from scikit-learn (the task's documented split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    _, x_test, _, y_test = train_test_split(images, digits.target, test_size=0.25, random_state=0,
                                            stratify=digits.target)
    return torch.from_numpy(x_test), torch.from_numpy(y_test.astype(np.int64))


def _fresh_small_max():
    """A new module of the run's architecture, built without hpa's reinit code."""
    from hpa.plugins import registries
    from hpa.options import LoadOptions

    cifar = registries()["loaders"].get("cifar")
    return cifar.build("small_max", LoadOptions(weights="none", input_size=(1, 8, 8),
                                                extra={"num_classes": 10, "in_channels": 1}))


def _accuracy_by_hand(run, layer_prefix: str, epoch: int):
    record = json.loads((run / "run.json").read_text())
    mean, std = record["normalisation"]["mean"][0], record["normalisation"]["std"][0]
    model = _fresh_small_max()
    model.load_state_dict(load_file(str(run / f"snapshots/epoch-{EPOCHS:03d}.safetensors")))
    earlier = load_file(str(run / f"snapshots/epoch-{epoch:03d}.safetensors"))
    with torch.no_grad():
        for suffix in ("weight", "bias"):
            dict(model.named_parameters())[f"{layer_prefix}.{suffix}"].copy_(earlier[f"{layer_prefix}.{suffix}"])
        images, labels = _digits_test_split()
        logits = model.eval()((images - mean) / std)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return accuracy, F.cross_entropy(logits.double(), labels).item()


@pytest.mark.parametrize(("layer", "epoch"), [("features.0", 0), ("features.6", 1)])
def test_cell_equals_independent_computation(run, result, layer, epoch):
    expected_accuracy, expected_loss = _accuracy_by_hand(run, layer, epoch)
    cell = result.to_pandas().set_index(["layer", "epoch"]).loc[(layer, epoch)]
    assert cell["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
    assert cell["loss"] == pytest.approx(expected_loss, rel=1e-5)
    trained = result.trained["seed-0"]["accuracy"]
    assert cell["absolute_drop"] == pytest.approx(trained - expected_accuracy, abs=1e-12)
    assert cell["relative_drop"] == pytest.approx((trained - expected_accuracy) / trained, abs=1e-12)


def test_trained_accuracy_is_the_runs_final_test_accuracy(run, result):
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert result.trained["seed-0"]["accuracy"] == metrics[-1]["test_accuracy"]


def test_reset_to_final_epoch_drops_nothing(result):
    final = result.to_pandas().query(f"epoch == {EPOCHS}")
    assert len(final) == 4  # every conv of small_max
    assert (final["absolute_drop"] == 0).all() and (final["relative_drop"] == 0).all()
    assert (final["accuracy"] == result.trained["seed-0"]["accuracy"]).all()


def test_reset_to_init_hurts_some_layer(result):
    # After two epochs the network is far above chance; some layer's init must cost accuracy.
    assert result.trained["seed-0"]["accuracy"] > 0.3
    assert result.to_pandas().query("epoch == 0")["absolute_drop"].max() > 0.05


def test_model_is_restored_after_the_sweep(run):
    # A second sweep over the same checkpoints gives the same numbers only if every cell restored its layer.
    first = reinit(run, epochs=[0]).to_pandas()
    second = reinit(run, epochs=[0, EPOCHS]).to_pandas().query("epoch == 0").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, second)


def test_final_n_l_and_spearman(run, result):
    series = pd.read_csv(run / "series.csv").query(f"epoch == {EPOCHS}").set_index("layer")
    data = result.to_dict()
    final = load_file(str(run / f"snapshots/epoch-{EPOCHS:03d}.safetensors"))
    for layer, value in data["final_n_l"].items():
        recorded = series.loc[layer, "projection.n_l"]
        if np.isnan(recorded):  # the run's scan skips a conv on a 1x1 plane: count sum(w) <= 0 by hand
            weight = final[f"{layer}.weight"].double().flatten(1)
            recorded = (weight.sum(1) <= 0).double().mean().item()
        assert value == pytest.approx(recorded, abs=1e-12)
    from scipy.stats import spearmanr

    layers = [name for name, value in data["final_n_l"].items() if value is not None]
    assert len(layers) == 4  # the fixture gives both correlations a value
    n_l, drops = [data["final_n_l"][n] for n in layers], [data["criticality"][n] for n in layers]
    for key, values in (("n_l", n_l), ("bias", [abs(v - 0.5) for v in n_l])):
        rho, p = spearmanr(values, drops)
        assert data["spearman"][key] == {"rho": pytest.approx(rho), "p": pytest.approx(p)}
    assert set(data["n_l_missing"]) == {name for name, value in data["final_n_l"].items() if value is None}


def test_rerandomize_is_seeded_and_averaged(run):
    once = reinit(run, rerandomize=True, draws=2, layers=["features.3"])
    again = reinit(run, rerandomize=True, draws=2, layers=["features.3"])
    other = reinit(run, rerandomize=True, draws=2, layers=["features.3"], seed=5)
    assert once.rows == again.rows
    row = once.rows[0]
    assert row["epoch"] is None and row["accuracy_std"] > 0  # the two draws differ
    # Two draws on a test split of n images: mean +- std are the two accuracies, each a count over n.
    n = len(_digits_test_split()[1])
    for count in ((row["accuracy"] - row["accuracy_std"]) * n, (row["accuracy"] + row["accuracy_std"]) * n):
        assert count == pytest.approx(round(count), abs=1e-6)
    assert row["accuracy"] != other.rows[0]["accuracy"] or row["loss"] != other.rows[0]["loss"]
    assert row["accuracy"] < once.trained["seed-0"]["accuracy"]


def test_spec_with_weights_against_fresh_init(run):
    final = run / f"snapshots/epoch-{EPOCHS:03d}.safetensors"
    result = reinit("cifar:small_max", weights=str(final), plugin="digits", layers=["features.0"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert result.trained["cifar:small_max"]["accuracy"] == metrics[-1]["test_accuracy"]
    assert result.epochs() == [0]


# -- outputs ---------------------------------------------------------------------------------------

def test_cli_writes_json_csv_and_figures(run, tmp_path, capsys):
    from hpa.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["reinit", str(run), "--epochs", f"0,{EPOCHS}", "--out", str(out)])
    assert exit_.value.code == 0
    err = capsys.readouterr().err
    assert "8 cells" in err and err.count("cells,") == 2  # the count, then one line per checkpoint
    names = {p.name for p in out.iterdir()}
    assert {"reinit.json", "reinit.csv", "heatmap.png", "criticality.png"} <= names
    table = pd.read_csv(out / "reinit.csv")
    assert list(table.columns[:8]) == ["seed", "layer", "kind", "epoch", "accuracy", "loss", "absolute_drop",
                                       "relative_drop"]
    saved = json.loads((out / "reinit.json").read_text())
    assert saved["epochs"] == [0, EPOCHS] and len(saved["cells"]) == len(table) == 8
    assert "rho" in saved["spearman"]["n_l"]


def test_several_seeds_give_a_heatmap_each_and_the_mean(tmp_path):
    from hpa.experiments.seeds import train_seeds

    folder = train_seeds([0, 1], tmp_path / "seeds", task="digits", epochs=1, device="cpu", statistics=())
    result = reinit(folder)
    assert result.seeds == ["seed-0", "seed-1"]
    mean = result.heatmap()
    np.testing.assert_allclose(mean, (result.heatmap("seed-0") + result.heatmap("seed-1")) / 2)
    data = result.to_dict()  # final n_l and criticality: means over the seeds, which differ
    assert data["per_seed_n_l"]["seed-0"] != data["per_seed_n_l"]["seed-1"]
    for layer in result.layers():
        per_seed = [data["per_seed_n_l"][seed][layer] for seed in result.seeds]
        assert data["final_n_l"][layer] == pytest.approx(np.mean(per_seed))
        first = [row["relative_drop"] for row in result.rows if row["layer"] == layer and row["epoch"] == 0]
        assert len(first) == 2 and data["criticality"][layer] == pytest.approx(np.mean(first))
    paths = result.plot(tmp_path / "figures")
    assert {p.name for p in paths} == {"heatmap-seed-0.png", "heatmap-seed-1.png", "heatmap-mean.png",
                                       "criticality.png"}


# -- bad input -------------------------------------------------------------------------------------

def _bad(capsys, *argv):
    from hpa.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["reinit", *map(str, argv), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_run_without_snapshots(run, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    assert "no snapshots" in _bad(capsys, bare)
    assert not (bare / "reinit").exists()


def test_epoch_not_saved(run, capsys):
    line = _bad(capsys, run, "--epochs", "0,7", "--out", run.parent / "never")
    assert "epoch 7 was not saved" in line and f"0, 1, {EPOCHS}" in line
    assert not (run.parent / "never").exists()


def test_unknown_layer_suggests(run, capsys):
    line = _bad(capsys, run, "--layer", "features.7", "--out", run.parent / "never")
    assert "features.7" in line and "did you mean" in line


def test_not_a_run_folder(tmp_path, capsys):
    assert "not an hpa run folder" in _bad(capsys, tmp_path)


def test_task_without_test_split(run, capsys, temporary_plugin):
    from hpa.experiments.types import Dataset, Task
    from hpa.hookspecs import hookimpl
    from hpa_plugins.digits_task import load_digits_dataset

    def no_test(data_dir, download):
        full = load_digits_dataset(data_dir, download)
        return Dataset(full.train_images, full.train_labels, full.test_images[:0], full.test_labels[:0],
                       num_classes=10)

    class NoTestTask:
        @hookimpl
        def register_experiments(self, register):
            register(Task(name="digits_notest", dataset=no_test, architecture="cifar:small_max",
                          input_size=(1, 8, 8)))

    temporary_plugin(NoTestTask(), "digits_notest")
    final = run / f"snapshots/epoch-{EPOCHS:03d}.safetensors"
    line = _bad(capsys, "cifar:small_max", "--weights", final, "--plugin", "digits_notest", "--out",
                run.parent / "never")
    assert "no test split" in line


def test_library_raises_hpa_errors(run):
    with pytest.raises(ReinitError):
        reinit(run, epochs=[99])
    with pytest.raises(hpa.HpaError):
        reinit(run, draws=0)


# -- BatchNorm: kept trained by default, reset with reset_bn ---------------------------------------

def _bn_subject():
    import copy

    from torch import nn

    from hpa.experiments.reinit import _Subject
    from hpa.experiments.types import Dataset

    torch.manual_seed(0)
    trained = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 8 * 8, 3))
    with torch.no_grad():
        for module in (trained[1],):
            module.weight.uniform_(0.5, 2)
            module.bias.uniform_(-1, 1)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    earlier = copy.deepcopy(trained)
    with torch.no_grad():
        for tensor in earlier.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.mul_(-0.7).add_(0.1)  # a different state, BatchNorm statistics included
        earlier[1].running_var.uniform_(0.1, 0.4)  # a variance stays positive
    structure = hpa.load(copy.deepcopy(trained), input_size=(1, 8, 8))
    rng = np.random.default_rng(0)
    images = rng.random((60, 1, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 3, 60)
    dataset = Dataset(images, labels, images, labels, num_classes=3)
    state = {k: v.clone() for k, v in earlier.state_dict().items()}
    checkpoints = {0: lambda: state}  # epoch -> its weights, read when the sweep asks
    subject = _Subject(label="bn", seed=0, model=trained, structure=structure, dataset=dataset, task="bn",
                       init="default", checkpoints=checkpoints)
    return subject, copy.deepcopy(trained), earlier, images, labels


@pytest.mark.parametrize("reset_bn", [False, True])
def test_reset_bn_copies_the_batchnorm_only_when_asked(reset_bn):
    from hpa.experiments.reinit import _Sweep

    subject, trained, earlier, images, labels = _bn_subject()
    keys = ["0.weight", "0.bias"] + (["1.weight", "1.bias", "1.running_mean", "1.running_var"] if reset_bn else [])
    expected = trained
    with torch.no_grad():
        for key in keys:
            expected.state_dict()[key].copy_(earlier.state_dict()[key])
        logits = expected.eval()((torch.from_numpy(images) - 0.5) / 0.5)  # the Dataset's default mean and std
    accuracy = (logits.argmax(1) == torch.from_numpy(labels)).double().mean().item()
    loss = F.cross_entropy(logits.double(), torch.from_numpy(labels)).item()
    sweep = _Sweep(subject, None, None, False, False, 1, reset_bn, torch.device("cpu"), 7)
    with torch.no_grad():
        (row,) = sweep.run(lambda line: None, False)
    assert row["layer"] == "0" and row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    # and the model is left as trained
    for key, value in _bn_subject()[1].state_dict().items():
        torch.testing.assert_close(subject.model.state_dict()[key], value, rtol=0, atol=0)


def test_pixel_noise_of_the_run_applies_to_the_test_split(run, tmp_path):
    # A run trained with --shuffle-pixels was tested on shuffled images; reinit must evaluate the same.
    from hpa.experiments.noise import shuffle_pixels

    noisy = tmp_path / "noisy"
    shutil.copytree(run, noisy)
    record = json.loads((noisy / "run.json").read_text())
    record["config"]["noise"] = {"shuffle_pixels": True, "noise_seed": 3}
    (noisy / "run.json").write_text(json.dumps(record))
    result = reinit(noisy, epochs=[EPOCHS], layers=["features.0"])
    model = _fresh_small_max()
    model.load_state_dict(load_file(str(run / f"snapshots/epoch-{EPOCHS:03d}.safetensors")))
    images, labels = _digits_test_split()
    shuffled = torch.from_numpy(shuffle_pixels(images.numpy(), 3))
    with torch.no_grad():
        logits = model.eval()((shuffled - 0.5) / 0.5)
    assert result.trained["seed-0"]["accuracy"] == (logits.argmax(1) == labels).double().mean().item()


def test_foreign_out_folder_is_refused_before_any_work(run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "did not write" in _bad(capsys, run, "--out", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
