"""Corrupted data for the noise experiments (Gamba et al. 2020 Fig. 6 and A.6, after Zhang et al. 2017).

Pure, seeded functions of numpy arrays: any task gets every kind of noise, and the
same ``seed`` always corrupts the same labels and pixels.  Each kind draws from its own
stream, ``SeedSequence([seed, STREAM])``, so adding one kind never changes another.

Labels are corrupted on the training split only.  Pixel corruptions reach the images
trained on, and with ``pixel_noise_splits="all"`` the validation and test images too.
A permutation of the images trained on is applied either to the stored images once
(``permute_then_augment``) or, as the authors' code did, to each augmented batch
(``augment_then_permute``: :class:`NoisyData` then carries the permutations, and the
trainer applies them after the shift and flip).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from hpa.experiments.rng import noise_generator
from hpa.experiments.types import LABEL_NOISE_MODES, Dataset, Noise

_CHUNK = 4096  # images per block when drawing per-image permutations (bounds memory)



def corrupt_labels(labels: np.ndarray, probability: float, num_classes: int, seed: int,
                   mode: str = "uniform") -> tuple[np.ndarray, float]:
    """Labels with noise, and the fraction actually changed.

    ``uniform`` (Zhang et al. 2017): with probability ``p`` a label is replaced by a uniform
    draw over all classes, so it may stay correct (expected change ``p (C-1)/C``).
    ``wrong`` (the reference code): a corrupted label is always another class (expected ``p``).
    """
    if mode not in LABEL_NOISE_MODES:
        raise ValueError(f"label noise mode must be one of {', '.join(LABEL_NOISE_MODES)}, not {mode!r}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"label noise must be a probability in [0, 1], not {probability}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = noise_generator(seed, "labels")
    hit = rng.random(labels.shape[0]) < probability
    if mode == "uniform":
        drawn = rng.integers(0, num_classes, size=labels.shape[0])
    else:
        drawn = (labels + rng.integers(1, num_classes, size=labels.shape[0])) % num_classes
    noisy = np.where(hit, drawn, labels)
    changed = float(np.mean(noisy != labels)) if labels.size else 0.0
    return noisy, changed


def shuffle_order(size: int, seed: int) -> np.ndarray:
    """The one permutation of ``size`` pixel positions that ``shuffle_pixels`` applies (output j reads ``order[j]``)."""
    return noise_generator(seed, "shuffle_pixels").permutation(size)


def shuffle_pixels(images: np.ndarray, seed: int) -> np.ndarray:
    """One fixed permutation of pixel positions (channels move together), the same for every image.

    Called with the same ``seed`` on every split, it applies the same permutation everywhere.
    """
    n, c, *plane = images.shape
    order = shuffle_order(int(np.prod(plane)), seed)
    return images.reshape(n, c, -1)[:, :, order].reshape(images.shape)


def pixel_orders(count: int, size: int, seed: int, split: int = 0) -> np.ndarray:
    """``count`` independent permutations of ``size`` positions, one row per image of a split, in order.

    Row ``i`` depends only on (seed, split, i), so corrupting some images of a split never changes
    the permutation of the others.  int16 where it fits (a CIFAR training split: 92 MB).
    """
    rng = noise_generator(seed, "random_pixels", split)
    dtype = np.int16 if size <= np.iinfo(np.int16).max else np.int32
    out = np.empty((count, size), dtype=dtype)
    for start in range(0, count, _CHUNK):
        rows = min(_CHUNK, count - start)
        out[start:start + rows] = rng.permuted(np.broadcast_to(np.arange(size), (rows, size)), axis=1)
    return out


def permute_each(images: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Image ``i`` with its pixel positions permuted by ``orders[i]``, or all by ``orders`` when it is
    one order (output position j reads input position ``order[j]``; channels move together)."""
    n, c, *plane = images.shape
    flat = images.reshape(n, c, -1)
    if orders.ndim == 1:
        return flat[:, :, orders].reshape(images.shape)
    out = np.empty_like(flat)
    for start in range(0, n, _CHUNK):  # chunked: the index array is as large as the images
        block = orders[start:start + _CHUNK].astype(np.intp)[:, None, :]
        out[start:start + _CHUNK] = np.take_along_axis(flat[start:start + _CHUNK], block, axis=2)
    return out.reshape(images.shape)


def random_pixels(images: np.ndarray, seed: int, split: int = 0) -> np.ndarray:
    """An independent fixed permutation of pixel positions for each image ("pixel shuffle")."""
    n, _, *plane = images.shape
    return permute_each(images, pixel_orders(n, int(np.prod(plane)), seed, split))


def channel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of ``(N, C, ...)`` images, in float64.

    Exact for uint8 (from each channel's histogram); chunked for floats, so memory stays small.
    """
    images = np.asarray(images)
    channels = images.shape[1]
    if images.dtype == np.uint8:
        levels = np.arange(256, dtype=np.float64)
        counts = np.stack([np.bincount(images[:, c].ravel(), minlength=256) for c in range(channels)])
        total = counts.sum(axis=1)
        mean = counts @ levels / total
        variance = counts @ levels ** 2 / total - mean ** 2
        return mean, np.sqrt(np.maximum(variance, 0.0))
    sums, squares, total = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), _CHUNK):
        block = np.moveaxis(images[start:start + _CHUNK], 1, 0).reshape(channels, -1).astype(np.float64)
        sums += block.sum(axis=1)
        squares += np.square(block).sum(axis=1)
        total += block.shape[1]
    mean = sums / total
    return mean, np.sqrt(np.maximum(squares / total - mean ** 2, 0.0))


def gaussian_images(shape: tuple[int, ...], mean: np.ndarray, std: np.ndarray, seed: int,
                    split: int = 0) -> np.ndarray:
    """Images of Gaussian noise with the given per-channel mean and std, as float32."""
    rng = noise_generator(seed, "gaussian", split)
    noise = rng.standard_normal(shape, dtype=np.float32)
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    return noise * np.asarray(std, np.float32).reshape(per_channel) + np.asarray(mean, np.float32).reshape(per_channel)


@dataclasses.dataclass(frozen=True)
class NoisyData:
    """A dataset after :func:`corrupt_dataset`."""

    dataset: Dataset  # pixels corrupted where asked; labels as stored (the validation split is drawn from them)
    train_labels: np.ndarray  # the labels trained on, aligned with dataset.train_labels (validation ones clean)
    report: dict[str, Any]  # what was done and how much changed, for run.json
    # augment_then_permute: the permutation the trainer applies to each augmented training image, as
    # output position j <- input position order[j]: one (H*W,) order for every image (shuffle_pixels), or
    # one row per stored training image (random_pixels, aligned with dataset.train_images); else None.
    train_orders: np.ndarray | None = None


def corrupt_dataset(dataset: Dataset, noise: Noise, train_index: np.ndarray, seed: int) -> NoisyData:
    """Apply ``noise`` once to the stored ``dataset``.

    ``train_index``: the positions of the training part in ``dataset.train_labels`` (the rest is
    the validation split).  Only those labels are corrupted, so validation and test labels
    stay clean and generalisation stays measurable.  Pixels: see the module docstring.
    ``seed`` is the seed of every draw (the caller resolves ``noise.noise_seed``); the same seed
    and split corrupt the same labels and pixels.
    """
    labels = np.asarray(dataset.train_labels, dtype=np.int64)
    trained = labels.copy()
    report: dict[str, Any] = {"seed": int(seed), "n_train_labels": int(len(train_index))}
    if noise.label_noise > 0:
        noisy, changed = corrupt_labels(labels[train_index], noise.label_noise, dataset.num_classes, seed,
                                        noise.label_noise_mode)
        trained[train_index] = noisy
        report["labels_changed"] = changed
    else:
        report["labels_changed"] = 0.0
    # A checksum of the labels actually trained on: two runs corrupted the same labels iff they agree.
    report["train_labels_sha256"] = hashlib.sha256(trained[train_index].astype("<i8").tobytes()).hexdigest()
    corrupted, orders, pixel_report = _corrupt_pixels(dataset, noise, train_index, seed)
    report.update(pixel_report)
    return NoisyData(corrupted, trained, report, orders)


def _corrupt_pixels(dataset: Dataset, noise: Noise, train_index: np.ndarray, seed: int):
    """(the dataset with corrupted pixels, the training orders for the trainer or None, the record)."""
    kind = noise.pixel_corruption
    if kind is None:
        return dataset, None, {"pixels": "as stored"}
    train, test = dataset.train_images, dataset.test_images
    everywhere = noise.pixel_noise_splits == "all"
    # Rows of the stored training images that are corrupted here: the validation rows with "all";
    # the training rows too unless their permutation waits for the augmentation.
    later = kind != "gaussian_images" and noise.pixel_noise_order == "augment_then_permute"
    rows = np.zeros(len(train), dtype=bool)
    rows[train_index] = not later
    if everywhere:
        rows[np.setdiff1d(np.arange(len(train)), train_index)] = True
    record: dict[str, Any] = {"pixel_noise_splits": noise.pixel_noise_splits,
                              "n_corrupted": {"train": int(len(train_index)),
                                              "validation": int(everywhere * (len(train) - len(train_index))),
                                              "test": int(everywhere * len(test))}}
    size = int(np.prod(train.shape[2:]))
    if kind == "gaussian_images":
        return _gaussian(dataset, train_index, rows, everywhere, seed, record)
    record["pixel_noise_order"] = noise.pixel_noise_order
    if kind == "shuffle_pixels":
        record["pixels"] = "one permutation"
        orders = test_orders = shuffle_order(size, seed)
    else:
        record["pixels"] = "one permutation per image"
        orders, test_orders = pixel_orders(len(train), size, seed, split=0), pixel_orders(len(test), size, seed, 1)
    if rows.any():
        train = train.copy()
        train[rows] = permute_each(train[rows], orders if orders.ndim == 1 else orders[rows])
    test = permute_each(test, test_orders) if everywhere else test
    corrupted = dataclasses.replace(dataset, train_images=train, test_images=test)
    return corrupted, (orders if later else None), record


def _gaussian(dataset: Dataset, train_index, rows, everywhere: bool, seed: int, record: dict):
    """Gaussian images in the chosen rows; the moments are the training part's, in the [0, 1] scale the
    trainer normalises from, so uint8 data becomes float32 in that scale."""
    train, test = dataset.train_images, dataset.test_images
    scale = 1 / 255 if train.dtype == np.uint8 else 1.0
    mean, std = (moment * scale for moment in channel_moments(train[train_index]))
    fake_train = gaussian_images(train.shape, mean, std, seed, split=0)
    mixed = np.where(rows[:, None, None, None], fake_train, train.astype(np.float32) * np.float32(scale))
    test = gaussian_images(test.shape, mean, std, seed, split=1) if everywhere else test.astype(np.float32) * \
        np.float32(scale)
    record.update(pixels="gaussian", gaussian_mean=mean.tolist(), gaussian_std=std.tolist())
    return dataclasses.replace(dataset, train_images=mixed.astype(np.float32), test_images=test), None, record
