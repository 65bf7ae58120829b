"""Every Recipe and Noise field at a value other than its default, against a computation written here.

Written from README.md ("The recipe's fields" table, "Noisy data and critical layers") and the field
comments of hpa/experiments/types.py, not from the trainer: the plain loop below reads its own
arguments, so a field that hpa records but ignores gives other weights.  It shares with hpa only
the documented random draws (hpa.experiments.rng.stream_seed: split, shuffle, augment, dropout).
The model is a tiny local module behind an in-process loader, the data are CIFAR python batches.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from torch import nn

import hpa

SEED = 3
PER_BATCH = 8  # 40 training images in 5 batches of 8, 8 test images
MASKS: list[np.ndarray] = []  # the dropout masks of every training forward pass of the tiny net


class Tiny(nn.Module):
    """conv 3x3 (4 filters), 4x4 max pool, linear 64 -> 16, dropout, ReLU, linear 16 -> classes."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.hidden = nn.Linear(4 * 8 * 8, 16)
        self.dropout = nn.Dropout(0.5)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 4).flatten(1)
        dropped = self.dropout(self.hidden(x))
        if self.training:
            MASKS.append((dropped != 0).numpy().copy())
        return self.out(F.relu(dropped))


def _build(name, options):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return Tiny(int(options.extra.get("num_classes") or 10))


class TinyLoader:
    @hpa.hookimpl
    def register_loaders(self, register):
        from hpa.backends.torch_trace import trace_module
        from hpa import Loader, Option

        register(Loader(prefix="tiny", load=lambda name, o: trace_module(_build(name, o), o.input_size),
                        list_models=lambda: ["net"], builds_init=True, build=_build,
                        options=(Option("num_classes", int, 10, "classes"),)))


@pytest.fixture
def tiny(temporary_plugin):
    temporary_plugin(TinyLoader(), "tiny-loader")
    MASKS.clear()
    return "tiny:net"


def write_distinct_cifar(root, per_batch: int, seed: int = 0) -> dict:
    """CIFAR-10 python batches (as in test_tasks.write_cifar) whose 1024 pixels are distinct within each
    image (red: position mod 256, green's top two bits: position // 256), so a permutation is identifiable;
    blue is dark (0..63), so the three channels' moments differ."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    position = np.arange(1024)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 1024), dtype=np.uint8)
        images[:, 0] = position % 256
        images[:, 1] = (position // 256) * 64 + rng.integers(0, 64, size=(per_batch, 1024))
        images[:, 0] = (images[:, 0] + rng.integers(0, 256, size=(per_batch, 1))) % 256  # per image, still distinct
        images[:, 2] //= 4
        labels = [int(v) for v in np.arange(per_batch) % 10]
        entry = {"data": images.reshape(per_batch, 3072), "labels": labels,
                 "filenames": [f"img{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (images.reshape(per_batch, 3, 32, 32), np.asarray(labels, np.int64))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}, protocol=2))
    return written


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    written = write_distinct_cifar(root, PER_BATCH)
    batches = [written[f"data_batch_{i}"] for i in range(1, 6)]
    return {"root": root, "train": np.concatenate([b[0] for b in batches]),
            "train_labels": np.concatenate([b[1] for b in batches]),
            "test": written["test_batch"][0], "test_labels": written["test_batch"][1]}


def record(run):
    return json.loads((run / "run.json").read_text())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(arch, cifar, out, **values):
    from hpa.experiments.train import train as hpa_train

    return hpa_train("cifar10", out=out, data=cifar["root"], arch=arch, seed=values.pop("seed", SEED),
                     device="cpu", statistics=["none"], **values)


@pytest.fixture
def seen(monkeypatch):
    """The DeviceData each training run builds: the images and labels it really trains on."""
    import hpa.experiments.trainer as trainer
    from hpa.experiments.data import DeviceData

    made = []

    class Recorded(DeviceData):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(trainer, "DeviceData", Recorded)
    return made


# -- the plain loop -------------------------------------------------------------------------------

def rate(fields: dict, epoch: int) -> float:
    """README: the rate of epoch e under each schedule."""
    if fields["schedule"] == "step":
        return fields["lr"] * fields["step_factor"] ** math.floor((epoch - 1) / fields["step_epochs"])
    if fields["schedule"] == "exponential":
        return fields["lr"] * fields["gamma"] ** (epoch - 1)
    return fields["lr"]


def shifted(image: torch.Tensor, dy: int, dx: int, flip: bool, shift: int) -> torch.Tensor:
    """Mirror, then zero-pad by ``shift`` and crop at (dy, dx)."""
    if flip:
        image = image.flip(-1)
    padded = F.pad(image, (shift, shift, shift, shift))
    return padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]


def plain_training(run, cifar, fields: dict, seed: int = SEED):
    """SGD as a textbook loop from the run's epoch-0 snapshot, reading only ``fields``; returns the model
    and the held-out rows."""
    from hpa.experiments.data import stratified_split
    from hpa.experiments.rng import generator, stream_seed

    saved = record(run)
    model = Tiny(10)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(run / "snapshots/epoch-000.safetensors").items()})
    mean = torch.tensor(saved["normalisation"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(saved["normalisation"]["std"]).view(1, -1, 1, 1)
    train_index, held = stratified_split(cifar["train_labels"], fields["validation"], seed)
    images = torch.from_numpy(cifar["train"][train_index]).float() * (1 / 255)  # hpa scales by 1/255
    labels = torch.from_numpy(cifar["train_labels"][train_index])
    optimizer = torch.optim.SGD(model.parameters(), lr=fields["lr"], momentum=fields["momentum"],
                                weight_decay=fields["weight_decay"], foreach=False)
    shift = fields["shift"]
    threads = torch.get_num_threads()
    torch.set_num_threads(saved["config"]["cpu_threads"])
    try:
        for epoch in range(1, fields["epochs"] + 1):
            for group in optimizer.param_groups:
                group["lr"] = rate(fields, epoch)
            torch.manual_seed(stream_seed(seed, "dropout", epoch))
            draws = generator(seed, "augment", epoch)
            order = torch.randperm(len(labels), generator=generator(seed, "shuffle", epoch))
            model.train()
            for start in range(0, len(order), fields["batch_size"]):
                index = order[start:start + fields["batch_size"]]
                dy = torch.randint(0, 2 * shift + 1, (len(index),), generator=draws)
                dx = torch.randint(0, 2 * shift + 1, (len(index),), generator=draws)
                mirrored = (torch.rand(len(index), generator=draws) < 0.5) & fields["flip"]
                batch = torch.stack([shifted(images[i], int(y), int(x), bool(m), shift)
                                     for i, y, x, m in zip(index, dy, dx, mirrored)])
                loss = F.cross_entropy(model((batch - mean) / std), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), (images, held, mean, std)


RECIPES = {
    # step decay every epoch by one half; no flips; shifts of 2; small batches; a quarter held out
    "step": dict(epochs=2, lr=0.03, momentum=0.5, weight_decay=1e-3, schedule="step", step_epochs=1,
                 step_factor=0.5, gamma=0.9, batch_size=7, shift=2, flip=False, validation=0.25),
    # exponential decay 0.6, no momentum, no weight decay, no shifts, one batch of all images
    "exponential": dict(epochs=2, lr=0.02, momentum=0.0, weight_decay=0.0, schedule="exponential", step_epochs=1,
                        step_factor=0.3, gamma=0.6, batch_size=64, shift=0, flip=True, validation=0.0),
    # constant: the step and gamma fields change nothing; momentum 0.95; shifts of 3
    "constant": dict(epochs=2, lr=0.01, momentum=0.95, weight_decay=2e-3, schedule="constant", step_epochs=1,
                     step_factor=0.2, gamma=0.5, batch_size=13, shift=3, flip=True, validation=0.1),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_trained_weights_equal_a_plain_loop_that_reads_the_recipe(tiny, cifar, tmp_path, name):
    """README: "`--lr`, `--momentum`, `--weight-decay` | SGD's base learning rate, momentum and L2 coefficient";
    "`--schedule step` | the rate of epoch e is `lr · step_factor^floor((e−1)/step_epochs)`";
    "`--schedule exponential` | the rate of epoch e is `lr · gamma^(e−1)`";
    "`--schedule constant` | every epoch trains at `lr`"; "`--batch-size N` | SGD steps on N training images
    each"; "`--shift S` | ... shifted by up to ±S pixels"; "`--flip` / `--no-flip` | half of the training
    images ... are mirrored"; "`--validation F` | ... held out of training and evaluated as `val_*`"."""
    fields = RECIPES[name]
    run = train(tiny, cifar, tmp_path / "run", **fields)
    assert record(run)["config"]["recipe"] == {**record(run)["config"]["recipe"], **fields}
    model, (images, held, mean, std) = plain_training(run, cifar, fields)
    trained = load_file(run / f"snapshots/epoch-{fields['epochs']:03d}.safetensors")
    start = load_file(run / "snapshots/epoch-000.safetensors")
    assert any(not np.array_equal(trained[k], start[k]) for k in trained)  # it trained
    for key, value in model.state_dict().items():
        assert np.array_equal(trained[key], value.numpy()), key
    lines = metrics(run)
    assert [line["lr"] for line in lines[1:]] == pytest.approx([rate(fields, e) for e in (1, 2)], rel=1e-12)
    if held.size:  # the held-out rows, and only they, are the validation split
        with torch.no_grad():
            unit = torch.from_numpy(cifar["train"][held]).float() * (1 / 255)
            logits = model((unit - mean) / std)
            loss = F.cross_entropy(logits, torch.from_numpy(cifar["train_labels"][held])).item()
        assert lines[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)
    else:
        assert lines[-1]["val_loss"] is None


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_validation_holds_out_round_f_times_each_class(fraction):
    """README: "`--validation F` | a seeded fraction F of each class, round(F · its count), is held out"."""
    from hpa.experiments.data import stratified_split

    labels = np.repeat(np.arange(4), [4, 6, 10, 3])  # classes of different sizes
    train_index, held = stratified_split(labels, fraction, 7)
    for label, count in zip(range(4), (4, 6, 10, 3)):
        assert np.sum(labels[held] == label) == round(fraction * count)
    assert sorted(np.concatenate([train_index, held]).tolist()) == list(range(len(labels)))
    assert set(stratified_split(labels, fraction, 8)[1]) != set(held)  # seeded: another seed, other rows


def test_dropout_masks_differ_between_epochs_and_repeat_with_the_seed(tiny, cifar, tmp_path):
    """README: "dropout | the architecture's dropout layers draw new masks every epoch, a function of (seed, epoch)"."""
    one_batch = dict(epochs=2, batch_size=64, validation=0.0, shift=0, flip=False)
    train(tiny, cifar, tmp_path / "a", **one_batch)
    first = list(MASKS)
    MASKS.clear()
    train(tiny, cifar, tmp_path / "b", **one_batch)
    again = list(MASKS)
    MASKS.clear()
    train(tiny, cifar, tmp_path / "c", seed=SEED + 1, **one_batch)
    other = list(MASKS)
    assert len(first) == 2 and first[0].shape == (40, 16)
    assert 0.3 < first[0].mean() < 0.7  # dropout 0.5 really ran in training
    assert not np.array_equal(first[0], first[1])  # a new mask in epoch 2
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # the same seed, the same masks
    assert not np.array_equal(first[0], other[0])


# -- noise ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["uniform", "wrong"])
def test_label_noise_reported_is_the_fraction_trained_on(tiny, cifar, tmp_path, seen, mode):
    """README: "`--label-noise P` | with probability P a training label is redrawn uniformly over all classes";
    "`--label-noise-mode wrong` | a corrupted label is always another class"; run.json records "the fraction
    of labels actually changed" and "Labels are corrupted on the training part of the split only"."""
    from hpa.experiments.data import stratified_split

    run = train(tiny, cifar, tmp_path / "run", epochs=1, validation=0.2, label_noise=0.3, label_noise_mode=mode)
    data = seen[0]
    train_index, held = stratified_split(cifar["train_labels"], 0.2, SEED)
    trained_on = data.train.labels.numpy()
    stored = cifar["train_labels"][train_index]
    changed = float(np.mean(trained_on != stored))
    report = record(run)["noise"]
    assert report["labels_changed"] == pytest.approx(changed, abs=1e-12)
    assert report["n_train_labels"] == len(trained_on) == 32
    assert 0 < changed <= 0.3 + 3 * math.sqrt(0.3 * 0.7 / 32)  # some changed, not more than P allows
    assert np.array_equal(data.validation.labels.numpy(), cifar["train_labels"][held])  # clean
    assert np.array_equal(data.test.labels.numpy(), cifar["test_labels"])
    assert record(run)["config"]["noise"]["label_noise_mode"] == mode


def test_label_noise_modes_draw_their_definitions_on_many_labels():
    """types.Noise: "uniform": redrawn over all classes | "wrong": always another class, (y + U{1..C-1}) mod C.
    At P = 0.3 over 20000 labels: uniform changes 0.3 · (C−1)/C of them and wrong 0.3, each to within
    four standard errors; a wrong label is never the true one and every other class is hit evenly."""
    from hpa.experiments.noise import corrupt_labels

    labels = np.arange(20000) % 5
    for mode, expected in (("uniform", 0.3 * 4 / 5), ("wrong", 0.3)):
        noisy, changed = corrupt_labels(labels, 0.3, 5, seed=11, mode=mode)
        assert changed == np.mean(noisy != labels)
        assert abs(changed - expected) < 4 * math.sqrt(expected * (1 - expected) / len(labels))
        offsets = (noisy - labels)[noisy != labels] % 5
        assert set(offsets.tolist()) == {1, 2, 3, 4}
        assert np.bincount(offsets, minlength=5)[1:].min() > 0.2 * len(offsets)


def _permutation(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The pixel order p with after[:, j] == before[:, p[j]] (channels together); distinct pixels needed."""
    flat_b, flat_a = before.reshape(before.shape[0], -1), after.reshape(after.shape[0], -1)
    where = {tuple(flat_b[:, j]): j for j in range(flat_b.shape[1])}
    assert len(where) == flat_b.shape[1], "pixels of the fixture are not distinct"
    order = np.array([where[tuple(flat_a[:, j])] for j in range(flat_a.shape[1])])
    assert np.array_equal(flat_a, flat_b[:, order])
    return order


@pytest.mark.parametrize("kind", ["shuffle_pixels", "random_pixels"])
def test_pixel_permutations_reach_the_images_trained_on_seeded_by_the_noise_seed(tiny, cifar, tmp_path, seen, kind):
    """README: "`--shuffle-pixels` | one fixed permutation of pixel positions, the same for every image";
    "`--random-pixels` | an independent fixed permutation for each image"; "Every corruption is fixed
    once, seeded by `--noise-seed` (default: the run seed)"; "`--pixel-noise-splits all` corrupts the
    validation and test images too"; "`--pixel-noise-order permute_then_augment` permutes the stored
    images before augmentation"."""
    options = dict(epochs=1, validation=0.0, pixel_noise_splits="all", pixel_noise_order="permute_then_augment")
    train(tiny, cifar, tmp_path / "a", noise_seed=9, **{kind: True}, **options)
    train(tiny, cifar, tmp_path / "b", seed=9, **{kind: True}, **options)  # noise seed: the run seed, 9
    train(tiny, cifar, tmp_path / "c", **{kind: True}, **options)  # noise seed: the run seed, SEED
    a, b, c = seen
    train_orders = [_permutation(s, t) for s, t in zip(cifar["train"], a.train.images.numpy())]
    test_orders = [_permutation(s, t) for s, t in zip(cifar["test"], a.test.images.numpy())]
    identity = np.arange(32 * 32)
    assert not any(np.array_equal(order, identity) for order in train_orders + test_orders)
    distinct = {tuple(order) for order in train_orders + test_orders}
    if kind == "shuffle_pixels":
        assert len(distinct) == 1  # one for all images of every split
    else:
        assert len(distinct) == len(train_orders) + len(test_orders)  # train and test drawn independently
    assert np.array_equal(a.train.images.numpy(), b.train.images.numpy())  # the noise seed, not the run seed
    assert np.array_equal(a.test.images.numpy(), b.test.images.numpy())
    assert not np.array_equal(a.train.images.numpy(), c.train.images.numpy())
    assert np.array_equal(a.train.labels.numpy(), cifar["train_labels"])  # labels untouched


def test_gaussian_images_have_the_training_parts_channel_moments(tiny, cifar, tmp_path, seen):
    """README: "`--gaussian-images` | images replaced by Gaussian noise with the training images' per-channel
    mean and std"; "Pixel corruptions reach the training images only"."""
    from hpa.experiments.data import stratified_split

    train(tiny, cifar, tmp_path / "g", epochs=1, validation=0.2, gaussian_images=True)
    data = seen[0]
    train_index, held = stratified_split(cifar["train_labels"], 0.2, SEED)
    unit = cifar["train"][train_index].astype(np.float64) / 255
    fake = data.train.images.numpy().astype(np.float64)
    for channel in range(3):  # 32 images x 1024 pixels per channel: the moments to about 1 %
        want_mean, want_std = unit[:, channel].mean(), unit[:, channel].std()
        assert abs(fake[:, channel].mean() - want_mean) < 0.01
        assert abs(fake[:, channel].std() - want_std) < 0.02 * want_std
    assert not np.allclose(fake, unit, atol=0.05)
    scale = 1 / 255 if data.validation.images.dtype == torch.uint8 else 1.0
    assert np.allclose(data.validation.images.numpy() * scale, cifar["train"][held] / 255, atol=1e-6)
    assert np.allclose(data.test.images.numpy() * scale, cifar["test"] / 255, atol=1e-6)
