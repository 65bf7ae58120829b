"""Training tasks: datasets read from fixtures in their exact on-disk formats, the split and augmentation.

The fixture writers here (CIFAR python pickle batches, MNIST idx files, an
ImageFolder PNG tree) are also used by test_train.py.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_bad_input
from hpa.errors import HpaError

CIFAR_PER_BATCH = 40


# -- fixture writers: the real on-disk formats -----------------------------------------------

def write_cifar(root: Path, classes: int = 10, per_batch: int = CIFAR_PER_BATCH, seed: int = 0) -> dict:
    """CIFAR-10 (or -100 with ``classes=100``) python batches as the official archive lays them out.

    Returns {file name: (uint8 rows (N, 3072), labels)} for the checks.
    """
    rng = np.random.default_rng(seed)
    cifar100 = classes == 100
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        count = per_batch * (5 if cifar100 and name == "train" else 1)
        rows = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(count) % classes]
        entry = {"data": rows, "filenames": [f"img{i}.png" for i in range(count)]}
        entry["fine_labels" if cifar100 else "labels"] = labels
        if cifar100:
            entry["coarse_labels"] = [label // 5 for label in labels]
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (rows, labels)
    meta_name, key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    (folder / meta_name).write_bytes(pickle.dumps({key: [f"class{i}" for i in range(classes)]}, protocol=2))
    return written


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (big-endian magic 0x0000 0x08 ndim, then the dims, then the uint8 data)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str = "MNIST", train: int = 200, test: int = 50, seed: int = 0) -> dict:
    """The four uncompressed idx files in ``root/NAME/raw/``, as torchvision extracts them."""
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


def write_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 12, size: int = 16,
                      seed: int = 0) -> dict:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``; returns {split: (images HWC, labels)}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val"):
        images, labels = [], []
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
                images.append(pixels)
                labels.append(label)
        out[split] = (np.stack(images), np.array(labels))
    return out


def task(name: str):
    from hpa.experiments.config import get_task

    return get_task(name)


# -- CIFAR ----------------------------------------------------------------------------------

def test_cifar10_fixture_is_read_by_torchvision_with_exact_pixels(tmp_path):
    written = write_cifar(tmp_path)
    dataset = task("cifar10").dataset(tmp_path, False)
    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert dataset.train_images.shape == (5 * CIFAR_PER_BATCH, 3, 32, 32)
    assert dataset.train_images.dtype == np.uint8
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, row-major.
    np.testing.assert_array_equal(dataset.train_images.reshape(len(train_rows), -1), train_rows)
    np.testing.assert_array_equal(dataset.test_images.reshape(CIFAR_PER_BATCH, -1), written["test_batch"][0])
    assert dataset.train_labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert dataset.num_classes == 10
    files = dataset.source["files"]
    folder = tmp_path / "cifar-10-batches-py"
    assert files["data_batch_3"] == hashlib.sha256((folder / "data_batch_3").read_bytes()).hexdigest()
    assert dataset.source["official_release"] is False


def test_cifar100_fixture_uses_fine_labels(tmp_path):
    written = write_cifar(tmp_path, classes=100, per_batch=100)
    dataset = task("cifar100").dataset(tmp_path, False)
    assert dataset.num_classes == 100
    assert dataset.train_labels.tolist() == written["train"][1]
    np.testing.assert_array_equal(dataset.test_images.reshape(100, -1), written["test"][0])


def test_missing_cifar_names_files_and_folder(tmp_path):
    with pytest.raises(HpaError) as error:
        task("cifar10").dataset(tmp_path, False)
    message = str(error.value)
    assert "data_batch_1" in message and "test_batch" in message
    assert str(tmp_path / "cifar-10-batches-py") in message


@pytest.mark.parametrize("damage", ["truncate", "not_a_pickle", "wrong_layout"])
def test_damaged_cifar_batch_is_refused_naming_the_file(tmp_path, damage):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "not_a_pickle":
        path.write_bytes(b"PK\x03\x04 a zip file, not a batch")
    else:
        path.write_bytes(pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}))
    with pytest.raises(HpaError, match="data_batch_3"):
        task("cifar10").dataset(tmp_path, False)


def test_cifar_batch_with_code_is_never_unpickled(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({"data": Payload()}))
    with pytest.raises(HpaError, match="data_batch_2"):
        task("cifar10").dataset(tmp_path, False)
    assert not marker.exists()


# -- MNIST ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_fixture_round_trips(tmp_path, name, folder):
    written = write_mnist(tmp_path, folder)
    dataset = task(name).dataset(tmp_path, False)
    np.testing.assert_array_equal(dataset.train_images[:, 0], written["train"][0])
    np.testing.assert_array_equal(dataset.test_labels, written["t10k"][1])
    assert dataset.input_size == (1, 28, 28)
    raw = tmp_path / folder / "raw"
    assert dataset.source["files"]["train-images-idx3-ubyte"] == hashlib.sha256(
        (raw / "train-images-idx3-ubyte").read_bytes()).hexdigest()


def test_mnist_with_wrong_format_or_missing_file(tmp_path):
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.compress(b"not idx"))
    with pytest.raises(HpaError, match="idx"):
        task("mnist").dataset(tmp_path, False)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(HpaError, match="t10k-labels-idx1-ubyte"):
        task("mnist").dataset(tmp_path, False)


# -- ImageFolder ------------------------------------------------------------------------------

def test_imagefolder_png_tree_round_trips(tmp_path):
    written = write_imagefolder(tmp_path)
    dataset = task("imagefolder").dataset(tmp_path, False)
    np.testing.assert_array_equal(dataset.train_images.transpose(0, 2, 3, 1), written["train"][0])
    np.testing.assert_array_equal(dataset.test_labels, written["val"][1])
    assert dataset.num_classes == 3 and dataset.source["classes"] == ["cat", "dog", "eel"]


def test_imagefolder_refuses_bad_trees(tmp_path):
    with pytest.raises(HpaError, match="--data"):
        task("imagefolder").dataset(None, False)
    write_imagefolder(tmp_path)
    (tmp_path / "val" / "fox").mkdir()
    (tmp_path / "train" / "cat" / "000.png").rename(tmp_path / "val" / "fox" / "000.png")
    with pytest.raises(HpaError, match="different class folders"):
        task("imagefolder").dataset(tmp_path, False)


# -- digits, the split, the augmentation ----------------------------------------------------------

def test_digits_is_offline_and_stratified():
    from sklearn.datasets import load_digits

    dataset = task("digits").dataset(None, False)
    total = load_digits()
    assert len(dataset.train_labels) + len(dataset.test_labels) == len(total.target)
    assert dataset.train_images.dtype == np.float32 and dataset.train_images.max() <= 1.0
    share = np.bincount(dataset.test_labels) / np.bincount(total.target)
    assert np.allclose(share, 0.25, atol=0.02)


def test_stratified_split_is_seeded_disjoint_and_per_class():
    from hpa.experiments.data import stratified_split

    labels = np.repeat(np.arange(5), [100, 50, 30, 200, 20])
    train, validation = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, validation)) == 0 and len(train) + len(validation) == len(labels)
    assert np.bincount(labels[validation]).tolist() == [10, 5, 3, 20, 2]
    again, _ = stratified_split(labels, 0.1, seed=3)
    other, _ = stratified_split(labels, 0.1, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


# -- the CLI -----------------------------------------------------------------------------------

def test_hpa_experiments_lists_every_task(run_hpa):
    proc = run_hpa("experiments", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    tasks = {t["name"]: t for t in json.loads(proc.stdout)}
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"} <= set(tasks)
    assert tasks["cifar10"]["architecture"] == "cifar:vgg19"
    recipe = tasks["cifar10"]["recipe"]
    assert (recipe["lr"], recipe["momentum"], recipe["weight_decay"], recipe["batch_size"]) == (0.01, 0.9, 5e-4, 128)
    assert recipe["shift"] == 4 and recipe["flip"] is True and recipe["validation"] == 0.1
    assert tasks["digits"]["recipe"]["flip"] is False


def test_unknown_task_suggests_the_closest(run_hpa, tmp_path):
    assert_bad_input(run_hpa("train", "--plugin", "cifar01", "--out", tmp_path / "run"), "did you mean", "cifar10")
    assert not (tmp_path / "run").exists()


def test_missing_dataset_fails_at_once_in_one_line(run_hpa, tmp_path):
    line = assert_bad_input(run_hpa("train", "--plugin", "cifar10", "--data", tmp_path, "--out", tmp_path / "run"),
                            "data_batch_1", "--download")
    assert str(tmp_path) in line
    assert not (tmp_path / "run").exists()
