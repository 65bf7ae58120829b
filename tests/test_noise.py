"""Label and pixel corruptions (issue "Experiments II"): checked against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import load_digits

from hpa.experiments import noise


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return images, data.target.astype(np.int64)


@pytest.mark.parametrize("p", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["uniform", "wrong"])
def test_changed_fraction_is_within_three_standard_errors(digits, p, mode):
    _, labels = digits
    classes = 10
    expected = p * (classes - 1) / classes if mode == "uniform" else p
    noisy, changed = noise.corrupt_labels(labels, p, classes, seed=3, mode=mode)
    measured = np.mean(noisy != labels)
    assert changed == pytest.approx(measured)
    standard_error = math.sqrt(max(expected * (1 - expected), 1e-12) / labels.size)
    assert abs(measured - expected) <= 3 * standard_error + 1e-12, (measured, expected)
    assert noisy.min() >= 0 and noisy.max() < classes


def test_wrong_mode_with_p_one_changes_every_label(digits):
    _, labels = digits
    noisy, changed = noise.corrupt_labels(labels, 1.0, 10, seed=0, mode="wrong")
    assert changed == 1.0 and np.all(noisy != labels)


def test_same_seed_changes_the_same_labels_and_another_seed_others(digits):
    _, labels = digits
    a, _ = noise.corrupt_labels(labels, 0.5, 10, seed=7)
    b, _ = noise.corrupt_labels(labels, 0.5, 10, seed=7)
    c, _ = noise.corrupt_labels(labels, 0.5, 10, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a != labels, c != labels)


def test_input_labels_are_not_modified(digits):
    _, labels = digits
    before = labels.copy()
    noise.corrupt_labels(labels, 1.0, 10, seed=1)
    assert np.array_equal(labels, before)


def test_unknown_mode_and_bad_probability_are_refused(digits):
    _, labels = digits
    with pytest.raises(ValueError, match="uniform"):
        noise.corrupt_labels(labels, 0.5, 10, seed=0, mode="sometimes")
    with pytest.raises(ValueError, match="probability"):
        noise.corrupt_labels(labels, 1.5, 10, seed=0)


def _permutation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The position permutation p with b[..., j] == a[..., p[j]] for one image, if unique."""
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    order = []
    for j in range(flat_b.shape[1]):
        matches = np.flatnonzero(np.all(flat_a == flat_b[:, j:j + 1], axis=0))
        if matches.size != 1:
            return None
        order.append(int(matches[0]))
    return np.array(order)


def test_shuffle_pixels_applies_one_permutation_to_every_image_of_every_split():
    rng = np.random.default_rng(0)
    train = rng.random((20, 3, 5, 4)).astype(np.float32)  # distinct values: the permutation is identifiable
    test = rng.random((7, 3, 5, 4)).astype(np.float32)
    shuffled_train, shuffled_test = noise.shuffle_pixels(train, seed=4), noise.shuffle_pixels(test, seed=4)
    # each image keeps its multiset of pixel values
    for before, after in ((train, shuffled_train), (test, shuffled_test)):
        assert np.array_equal(np.sort(before.reshape(len(before), -1), axis=1),
                              np.sort(after.reshape(len(after), -1), axis=1))
    # one permutation of positions, channels moving together, maps every image of both splits
    first = _permutation_between(train[0], shuffled_train[0])
    assert first is not None and not np.array_equal(first, np.arange(first.size))
    for before, after in zip(np.concatenate([train, test]), np.concatenate([shuffled_train, shuffled_test])):
        assert np.array_equal(after.reshape(3, -1), before.reshape(3, -1)[:, first])


def test_random_pixels_gives_each_image_its_own_permutation():
    rng = np.random.default_rng(1)
    images = rng.random((12, 2, 4, 4)).astype(np.float32)
    out = noise.random_pixels(images, seed=2)
    perms = [_permutation_between(a, b) for a, b in zip(images, out)]
    assert all(p is not None for p in perms)
    assert len({tuple(p) for p in perms}) == len(perms)  # distinct
    for before, after, p in zip(images, out, perms):
        assert np.array_equal(after.reshape(2, -1), before.reshape(2, -1)[:, p])
    assert np.array_equal(out, noise.random_pixels(images, seed=2))  # seeded


def test_gaussian_images_match_the_per_channel_moments_to_one_percent():
    rng = np.random.default_rng(5)
    images = np.stack([rng.normal(0.2, 0.05, (4000, 8, 8)), rng.normal(0.7, 0.2, (4000, 8, 8))], axis=1)
    mean, std = noise.channel_moments(images)
    assert np.allclose(mean, images.mean(axis=(0, 2, 3))) and np.allclose(std, images.std(axis=(0, 2, 3)))
    fake = noise.gaussian_images(images.shape, mean, std, seed=9)
    fake_mean, fake_std = fake.mean(axis=(0, 2, 3), dtype=np.float64), fake.std(axis=(0, 2, 3), dtype=np.float64)
    assert np.all(np.abs(fake_mean - mean) <= 0.01 * np.abs(mean))
    assert np.all(np.abs(fake_std - std) <= 0.01 * std)
    assert fake.dtype == np.float32 and fake.shape == images.shape


# -- corrupt_dataset: what the trainer applies to a stored Dataset ----------------------------

def _dataset(train_images, test_images, num_classes=10):
    from hpa.experiments.types import Dataset

    rng = np.random.default_rng(11)
    return Dataset(train_images, rng.integers(0, num_classes, len(train_images)),
                   test_images, rng.integers(0, num_classes, len(test_images)), num_classes=num_classes)


def test_corrupt_dataset_changes_only_the_training_part_of_the_labels():
    from hpa.experiments.types import Noise

    rng = np.random.default_rng(2)
    dataset = _dataset(rng.random((600, 1, 4, 4)).astype(np.float32), rng.random((50, 1, 4, 4)).astype(np.float32))
    train_index = np.sort(rng.permutation(600)[:500])
    held_out = np.setdiff1d(np.arange(600), train_index)
    out = noise.corrupt_dataset(dataset, Noise(label_noise=1.0, label_noise_mode="wrong"), train_index, seed=3)
    assert np.all(out.train_labels[train_index] != dataset.train_labels[train_index])  # wrong, p = 1: all
    assert np.array_equal(out.train_labels[held_out], dataset.train_labels[held_out])
    assert np.array_equal(out.dataset.train_labels, dataset.train_labels)  # the split is drawn from these
    assert out.dataset.test_labels is dataset.test_labels
    assert out.report["labels_changed"] == 1.0 and out.report["n_train_labels"] == 500
    assert out.report["pixels"] == "as stored" and out.dataset.train_images is dataset.train_images


def test_corrupt_dataset_without_noise_keeps_everything():
    from hpa.experiments.types import Noise

    rng = np.random.default_rng(4)
    dataset = _dataset(rng.random((30, 1, 4, 4)).astype(np.float32), rng.random((5, 1, 4, 4)).astype(np.float32))
    out = noise.corrupt_dataset(dataset, Noise(), np.arange(25), seed=0)
    assert np.array_equal(out.train_labels, dataset.train_labels) and out.report["labels_changed"] == 0.0
    assert np.array_equal(out.dataset.test_images, dataset.test_images)


def test_gaussian_images_of_uint8_data_are_float32_in_the_unit_scale():
    from hpa.experiments.types import Noise

    rng = np.random.default_rng(6)
    train = np.stack([rng.integers(0, 100, (3000, 6, 6)), rng.integers(100, 256, (3000, 6, 6))], 1).astype(np.uint8)
    test = rng.integers(0, 256, (1500, 2, 6, 6)).astype(np.uint8)
    everywhere = Noise(gaussian_images=True, pixel_noise_splits="all")
    out = noise.corrupt_dataset(_dataset(train, test), everywhere, np.arange(3000), seed=1)
    unit = train.astype(np.float64) / 255  # the scale the trainer normalises from
    mean, std = unit.mean(axis=(0, 2, 3)), unit.std(axis=(0, 2, 3))
    for images in (out.dataset.train_images, out.dataset.test_images):
        assert images.dtype == np.float32 and images.shape[1:] == (2, 6, 6)
        assert np.all(np.abs(images.mean(axis=(0, 2, 3), dtype=np.float64) - mean) <= 0.01 * mean)
        assert np.all(np.abs(images.std(axis=(0, 2, 3), dtype=np.float64) - std) <= 0.01 * std)
    assert np.allclose(out.report["gaussian_mean"], mean) and np.allclose(out.report["gaussian_std"], std)
    assert not np.array_equal(out.dataset.train_images[:5], out.dataset.test_images[:5])
