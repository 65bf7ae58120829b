"""Every number of ``reinit.json`` recomputed by a plain loop written here (issue 17 §3).

Two tiny real runs: a uint8 task (CIFAR-10 python batches written here, whose classes a
small CNN can learn: each class has its own colour and brightness) and the float32
digits task with a BatchNorm network (``zoo:digits_cnn``).  The loop here loads a
snapshot with safetensors, builds the module, replaces one layer's tensors by hand,
evaluates the test split it read itself, and computes the drops, the criticality and
both Spearman correlations (scipy) and the spread over draws (numpy).

README, "Critical layers": "for every conv layer (``--with-linear`` adds linear ones) and every
saved checkpoint, the layer's tensors are set to the checkpoint's, the test split is evaluated,
and the layer is restored.  ``--rerandomize --draws N`` draws the layer fresh from the
architecture's initialiser instead; ``--reset-bn`` resets its BatchNorm too."
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.stats import spearmanr

from hpa.experiments import reinit as reinit_module
from hpa.experiments.reinit import reinit

CIFAR_LAYERS = ["features.0", "features.2", "features.4", "features.6", "classifier.0"]
DIGITS_LAYERS = ["conv1", "conv2", "conv3", "conv4", "fc"]
BATCHNORM = {"conv1": "bn1", "conv2": "bn2"}  # zoo:digits_cnn: the BatchNorm after each of these convs
CIFAR_EPOCHS, DIGITS_EPOCHS = 2, 1


# -- the two runs ------------------------------------------------------------------------------

def write_learnable_cifar(root: Path, per_batch: int = 20, test: int = 100) -> None:
    """CIFAR-10 python batches (protocol 2, as the official archive) whose class shows in colour and brightness."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        count = test if name == "test_batch" else per_batch
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, size=(count, 3, 32, 32))
        for image, label in zip(images, labels):
            image[label % 3] += 40 + 50 * (label // 3)
        rows = np.clip(images, 0, 255).astype(np.uint8).reshape(count, 3072)
        entry = {"data": rows, "labels": [int(v) for v in labels]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    from hpa.experiments.train import train

    root = tmp_path_factory.mktemp("reinit-cifar")
    write_learnable_cifar(root / "data")
    return train("cifar10", out=root / "run", arch="cifar:small_stride", data=root / "data", epochs=CIFAR_EPOCHS,
                 seed=0, device="cpu", statistics=(), lr=0.003, batch_size=10, shift=0, flip=False,
                 validation=0.0, schedule="constant", init="kaiming_normal")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from hpa.experiments.train import train

    root = tmp_path_factory.mktemp("reinit-digits")
    return train("digits", out=root / "run", arch="zoo:digits_cnn", epochs=DIGITS_EPOCHS, seed=0, device="cpu",
                 statistics=(), init="kaiming_normal")


# -- the plain loop ----------------------------------------------------------------------------

def cifar_test_split(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 test images (N, 3, 32, 32) and labels, read from the batch file itself."""
    record = json.loads((run / "run.json").read_text())
    with open(Path(record["data_dir"]) / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        entry = pickle.load(handle)  # this test's own file
    return entry["data"].reshape(-1, 3, 32, 32), np.asarray(entry["labels"], dtype=np.int64)


def digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The digits task's documented test split, straight from scikit-learn (pixels 0..16 as [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    _, x_test, _, y_test = train_test_split(images, digits.target, test_size=0.25, random_state=0,
                                            stratify=digits.target)
    return x_test, y_test.astype(np.int64)


class Hand:
    """One run, evaluated without hpa: the module, its final snapshot, the test split, the normalisation."""

    def __init__(self, run: Path, task: str) -> None:
        self.run = run
        record = json.loads((run / "run.json").read_text())
        self.epochs = sorted(int(p.name[6:9]) for p in (run / "snapshots").glob("epoch-*.safetensors"))
        self.final = load_file(str(run / "snapshots" / f"epoch-{max(self.epochs):03d}.safetensors"))
        images, self.labels = cifar_test_split(run) if task == "cifar" else digits_test_split()
        # uint8 pixels are 0..255: divided by 255 before the recorded per-channel normalisation
        pixels = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images
        mean = np.asarray(record["normalisation"]["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(record["normalisation"]["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.inputs = torch.from_numpy((pixels - mean) / std)
        self.task = task
        self.model = None

    def module(self):
        if self.task == "digits":
            from hpa_zoo.models import get

            return get("digits_cnn").build()
        from hpa.plugins import registries
        from hpa.options import LoadOptions

        return registries()["loaders"].get("cifar").build(
            "small_stride", LoadOptions(weights="none", input_size=(3, 32, 32),
                                        extra={"num_classes": 10, "in_channels": 3}))

    def snapshot(self, epoch: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.run / "snapshots" / f"epoch-{epoch:03d}.safetensors"))

    def evaluate(self, replaced: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the final model with the tensors ``replaced`` (state key -> tensor)."""
        if self.model is None:
            self.model = self.module()
        model = self.model
        model.load_state_dict(self.final)
        with torch.no_grad():
            state = model.state_dict()
            for key, value in (replaced or {}).items():
                state[key].copy_(value)
            logits = model.eval()(self.inputs)
        labels = torch.from_numpy(self.labels)
        return (logits.argmax(1) == labels).double().mean().item(), F.cross_entropy(logits.double(), labels).item()

    def trained(self) -> float:
        return self.evaluate()[0]

    def n_l(self, layer: str) -> float:
        """Gamba et al. 2020's n_l of the final model's ``layer``: the share of filters with sum(w) <= 0 (BN folded)."""
        weight = self.final[f"{layer}.weight"].double().flatten(1)
        sums = weight.sum(1)
        if layer in BATCHNORM:  # a negative gamma flips the hyperplane (STATISTICS.md §0)
            bn = BATCHNORM[layer]
            sums = sums * self.final[f"{bn}.weight"].double() / torch.sqrt(self.final[f"{bn}.running_var"].double()
                                                                            + 1e-5)
        alive = weight.norm(dim=1) > 0
        return (sums[alive] <= 0).double().mean().item()

    def layer_keys(self, layer: str, reset_bn: bool) -> list[str]:
        keys = [f"{layer}.weight", f"{layer}.bias"]
        if reset_bn and layer in BATCHNORM:
            keys += [f"{BATCHNORM[layer]}.{name}" for name in ("weight", "bias", "running_mean", "running_var")]
        return keys


def cells(rows) -> dict:
    return {(row["layer"], row["epoch"]): row for row in rows}


def check_cell(cell: dict, accuracy: float, loss: float, trained: float) -> None:
    assert cell["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert cell["loss"] == pytest.approx(loss, rel=1e-5)
    assert cell["absolute_drop"] == pytest.approx(trained - accuracy, abs=1e-12)
    assert cell["relative_drop"] == pytest.approx((trained - accuracy) / trained, abs=1e-12)


def check_correlations(saved: dict, hand: Hand, layers: list[str]) -> None:
    """criticality, final n_l and both Spearman correlations of ``saved`` (reinit.json) against the plain loop."""
    trained = hand.trained()
    first = min(hand.epochs)
    drops = [(trained - hand.evaluate({k: hand.snapshot(first)[k] for k in hand.layer_keys(layer, False)})[0])
             / trained for layer in layers]
    n_l = [hand.n_l(layer) for layer in layers]
    assert saved["criticality"] == pytest.approx(dict(zip(layers, drops)), abs=1e-12)
    assert saved["final_n_l"] == pytest.approx(dict(zip(layers, n_l)), abs=1e-12)
    assert saved["per_seed_n_l"] == {"seed-0": pytest.approx(dict(zip(layers, n_l)), abs=1e-12)}
    assert saved["n_l_missing"] == [] and saved["spearman"]["layers"] == len(layers)
    assert len(set(drops)) > 1 and len(set(n_l)) > 1  # the fixture gives correlations a value
    for key, values in (("n_l", n_l), ("bias", [abs(v - 0.5) for v in n_l])):
        rho, p = spearmanr(values, drops)
        assert saved["spearman"][key] == {"rho": pytest.approx(rho, abs=1e-12), "p": pytest.approx(p, abs=1e-12)}


# -- checkpoints: the uint8 task, through the CLI --------------------------------------------------

@pytest.fixture(scope="module")
def cifar_json(cifar_run):
    """reinit.json's content (``ReinitResult.save`` writes ``to_json()``; test_reinit.py runs the CLI)."""
    return json.loads(reinit(cifar_run, with_linear=True).to_json())


def test_uint8_checkpoint_cells_equal_a_plain_loop(cifar_run, cifar_json):
    hand = Hand(cifar_run, "cifar")
    trained, loss = hand.evaluate()
    assert cifar_json["trained"] == {"seed-0": {"accuracy": pytest.approx(trained, abs=1e-12),
                                                "loss": pytest.approx(loss, rel=1e-5)}}
    assert trained > 0.2  # learnt something a reset can cost
    assert cifar_json["layers"] == CIFAR_LAYERS and cifar_json["epochs"] == hand.epochs == [0, 1, 2]
    found = cells(cifar_json["cells"])
    assert len(found) == len(cifar_json["cells"]) == len(CIFAR_LAYERS) * 3
    for layer in CIFAR_LAYERS:
        for epoch in hand.epochs:
            earlier = hand.snapshot(epoch)
            accuracy, loss = hand.evaluate({key: earlier[key] for key in hand.layer_keys(layer, False)})
            cell = found[(layer, epoch)]
            assert cell["seed"] == "seed-0" and cell["kind"] == ("linear" if layer == "classifier.0" else "conv2d")
            check_cell(cell, accuracy, loss, trained)
    assert max(found[(layer, 0)]["absolute_drop"] for layer in CIFAR_LAYERS) > 0.1


def test_uint8_criticality_and_both_spearman_correlations(cifar_run, cifar_json):
    check_correlations(cifar_json, Hand(cifar_run, "cifar"), CIFAR_LAYERS)
    assert cifar_json["options"] == {"rerandomize": False, "draws": None, "reset_bn": False, "with_linear": True,
                                     "device": "cpu", "seed": 0, "test_split": "in memory"}
    assert cifar_json["source"] == str(cifar_run)


def test_uint8_pixels_are_scaled_to_one_before_normalising(cifar_run, cifar_json):
    # The network saw 0..255 divided by 255: evaluated on the raw bytes it would be near chance.
    hand = Hand(cifar_run, "cifar")
    images, _ = cifar_test_split(cifar_run)
    record = json.loads((cifar_run / "run.json").read_text())
    mean = np.asarray(record["normalisation"]["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(record["normalisation"]["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    hand.inputs = torch.from_numpy((images.astype(np.float32) - mean) / std)
    assert abs(hand.evaluate()[0] - cifar_json["trained"]["seed-0"]["accuracy"]) > 0.1


# -- checkpoints with and without --reset-bn: the float32 task, a BatchNorm network -------------------

@pytest.fixture(scope="module")
def digits_json(digits_run):
    return {reset_bn: json.loads(reinit(digits_run, with_linear=True, reset_bn=reset_bn).to_json())
            for reset_bn in (False, True)}


@pytest.mark.parametrize("reset_bn", [False, True])
def test_float32_checkpoint_cells_with_and_without_reset_bn(digits_run, digits_json, reset_bn):
    saved = digits_json[reset_bn]
    hand = Hand(digits_run, "digits")
    trained = hand.trained()
    assert saved["trained"]["seed-0"]["accuracy"] == pytest.approx(trained, abs=1e-12)
    assert saved["options"]["reset_bn"] is reset_bn and saved["layers"] == DIGITS_LAYERS
    found = cells(saved["cells"])
    assert len(found) == len(saved["cells"]) == len(DIGITS_LAYERS) * len(hand.epochs)
    for layer in DIGITS_LAYERS:
        for epoch in hand.epochs:
            earlier = hand.snapshot(epoch)
            accuracy, loss = hand.evaluate({key: earlier[key] for key in hand.layer_keys(layer, reset_bn)})
            check_cell(found[(layer, epoch)], accuracy, loss, trained)


def test_float32_reset_bn_changes_the_batchnorm_layers_only(digits_run, digits_json):
    start = Hand(digits_run, "digits").snapshot(0)
    final = load_file(str(digits_run / "snapshots" / f"epoch-{DIGITS_EPOCHS:03d}.safetensors"))
    assert not torch.equal(start["bn1.running_var"], final["bn1.running_var"])  # the BatchNorm trained
    plain, reset = cells(digits_json[False]["cells"]), cells(digits_json[True]["cells"])
    assert plain[("conv1", 0)]["loss"] != reset[("conv1", 0)]["loss"]
    for layer in ("conv3", "conv4", "fc"):  # no BatchNorm: the same cells either way
        assert plain[(layer, 0)] == reset[(layer, 0)]


def test_float32_criticality_and_both_spearman_correlations(digits_run, digits_json):
    check_correlations(digits_json[False], Hand(digits_run, "digits"), DIGITS_LAYERS)


# -- re-randomised draws: one and several, with and without --reset-bn ---------------------------------

def _spied_reinit(run, **options):
    """reinit, recording the tensors each draw copies into the model (the real code runs unchanged)."""
    drawn: list[tuple[str, int, dict]] = []
    real = reinit_module._Sweep._fresh_tensors

    def spy(self, layer, index, draw):
        tensors = real(self, layer, index, draw)
        drawn.append((layer.name, draw, {k: v.detach().clone() for k, v in tensors.items()}))
        return tensors

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reinit_module._Sweep, "_fresh_tensors", spy)
        result = reinit(run, rerandomize=True, **options)
    return result, drawn


FRESH_BN = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}  # nn.BatchNorm2d as built


@pytest.mark.parametrize(("task", "layers", "draws", "reset_bn"), [
    ("digits", ["conv1", "conv3"], 3, True),  # first: the case most bugs show in
    ("digits", ["conv1", "conv3"], 1, False),
    ("cifar", ["features.2", "classifier.0"], 1, False),
    ("cifar", ["features.2", "classifier.0"], 3, False),
])
def test_rerandomized_cells_are_the_mean_and_spread_of_their_draws(request, task, layers, draws, reset_bn):
    run = request.getfixturevalue(f"{task}_run")
    result, drawn = _spied_reinit(run, layers=layers, draws=draws, reset_bn=reset_bn, with_linear=True)
    saved = json.loads(result.to_json())
    hand = Hand(run, task)
    trained = hand.trained()
    assert saved["epochs"] == [None] and saved["options"]["draws"] == draws
    assert saved["options"]["reset_bn"] is reset_bn
    found = cells(saved["cells"])
    for layer in layers:
        mine = [tensors for name, _, tensors in drawn if name == layer]
        assert [d for name, d, _ in drawn if name == layer] == list(range(draws))
        outcomes = []
        for tensors in mine:
            replaced = _check_draw(hand, layer, tensors, reset_bn)
            outcomes.append(hand.evaluate(replaced))
        accuracies = [a for a, _ in outcomes]
        cell = found[(layer, None)]
        assert cell["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
        assert cell["loss"] == pytest.approx(np.mean([loss for _, loss in outcomes]), rel=1e-5)
        assert cell["accuracy_std"] == pytest.approx(np.std(accuracies), abs=1e-12)  # over the draws, ddof 0
        assert cell["relative_drop"] == pytest.approx((trained - np.mean(accuracies)) / trained, abs=1e-12)
        if draws > 1:  # several draws are different draws, and their spread is measured
            assert not torch.equal(mine[0][f"{layer}.weight"], mine[1][f"{layer}.weight"])
        assert (cell["accuracy_std"] > 0) == (draws > 1)
    assert saved["criticality"] == pytest.approx({layer: found[(layer, None)]["relative_drop"] for layer in layers},
                                                 abs=1e-12)


def _check_draw(hand: Hand, layer: str, tensors: dict, reset_bn: bool) -> dict:
    """The tensors of one draw as the docs define them; returns what the plain loop puts into the model.

    The weight is drawn by the run's init ("kaiming_normal": Kaiming-normal fan-out, zero bias);
    the BatchNorm is set to a freshly built one with --reset-bn and stays trained without.
    """
    weight = tensors[f"{layer}.weight"]
    fan_out = weight.shape[0] * math.prod(weight.shape[2:])
    assert weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)
    assert torch.count_nonzero(tensors[f"{layer}.bias"]) == 0
    assert not torch.equal(weight, hand.final[f"{layer}.weight"])
    replaced = {f"{layer}.weight": weight, f"{layer}.bias": torch.zeros_like(tensors[f"{layer}.bias"])}
    bn = BATCHNORM.get(layer)
    bn_keys = {key for key in tensors if bn and key.startswith(f"{bn}.")}
    assert bn_keys == ({f"{bn}.{name}" for name in FRESH_BN} if reset_bn and bn else set())
    if reset_bn and bn:
        for name, value in FRESH_BN.items():
            replaced[f"{bn}.{name}"] = torch.full_like(hand.final[f"{bn}.{name}"], value)
    return replaced
