"""Corrupted data for the noise experiments (Gamba et al. 2020 Fig. 6 and A.6, after Zhang et al. 2017).

Pure, seeded functions of numpy arrays: any task gets every kind of noise, and the
same ``seed`` always corrupts the same labels and pixels.  Each kind draws from its own
stream, ``SeedSequence([seed, STREAM])``, so adding one kind never changes another.

Labels are corrupted on the training split only; pixel corruptions apply to every
split (the caller passes each split through the same function and seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from hpa.experiments.types import LABEL_NOISE_MODES, Dataset, Noise
_STREAMS = {"labels": 1, "shuffle_pixels": 2, "random_pixels": 3, "gaussian": 4}
_CHUNK = 4096  # images per block when drawing per-image permutations (bounds memory)


def generator(seed: int, stream: str, split: int = 0) -> np.random.Generator:
    """The random stream of one kind of noise (and one split, for per-image draws)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAMS[stream], int(split)]))


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
    rng = generator(seed, "labels")
    hit = rng.random(labels.shape[0]) < probability
    if mode == "uniform":
        drawn = rng.integers(0, num_classes, size=labels.shape[0])
    else:
        drawn = (labels + rng.integers(1, num_classes, size=labels.shape[0])) % num_classes
    noisy = np.where(hit, drawn, labels)
    changed = float(np.mean(noisy != labels)) if labels.size else 0.0
    return noisy, changed


def shuffle_pixels(images: np.ndarray, seed: int) -> np.ndarray:
    """One fixed permutation of pixel positions (channels move together), the same for every image.

    Called with the same ``seed`` on every split, it applies the same permutation everywhere.
    """
    n, c, *plane = images.shape
    size = int(np.prod(plane))
    order = generator(seed, "shuffle_pixels").permutation(size)
    return images.reshape(n, c, size)[:, :, order].reshape(images.shape)


def random_pixels(images: np.ndarray, seed: int, split: int = 0) -> np.ndarray:
    """An independent fixed permutation of pixel positions for each image ("pixel shuffle")."""
    n, c, *plane = images.shape
    size = int(np.prod(plane))
    rng = generator(seed, "random_pixels", split)
    flat = images.reshape(n, c, size)
    out = np.empty_like(flat)
    for start in range(0, n, _CHUNK):
        block = flat[start:start + _CHUNK]
        order = rng.permuted(np.broadcast_to(np.arange(size), (block.shape[0], size)), axis=1)
        out[start:start + _CHUNK] = np.take_along_axis(block, order[:, None, :], axis=2)
    return out.reshape(images.shape)


def channel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``(N, C, ...)`` images, in float64."""
    moved = np.moveaxis(np.asarray(images), 1, 0).reshape(images.shape[1], -1)
    mean = moved.mean(axis=1, dtype=np.float64)
    std = np.sqrt(np.maximum(np.mean(np.square(moved, dtype=np.float64), axis=1) - mean ** 2, 0.0))
    return mean, std


def gaussian_images(shape: tuple[int, ...], mean: np.ndarray, std: np.ndarray, seed: int,
                    split: int = 0) -> np.ndarray:
    """Images of Gaussian noise with the given per-channel mean and std, as float32."""
    rng = generator(seed, "gaussian", split)
    noise = rng.standard_normal(shape, dtype=np.float32)
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    return noise * np.asarray(std, np.float32).reshape(per_channel) + np.asarray(mean, np.float32).reshape(per_channel)


@dataclasses.dataclass(frozen=True)
class NoisyData:
    """A dataset after :func:`corrupt_dataset`."""

    dataset: Dataset  # pixels corrupted in every split; labels as stored (the validation split is drawn from them)
    train_labels: np.ndarray  # the labels trained on, aligned with dataset.train_labels (validation ones clean)
    report: dict[str, Any]  # what was done and how much changed, for run.json


def corrupt_dataset(dataset: Dataset, noise: Noise, train_index: np.ndarray, seed: int) -> NoisyData:
    """Apply ``noise`` once to the stored ``dataset``, before any augmentation.

    ``train_index``: the positions of the training part in ``dataset.train_labels`` (the rest is
    the validation split).  Only those labels are corrupted, so validation and test labels
    stay clean and generalisation stays measurable.  ``seed`` is the seed of every draw (the
    caller resolves ``noise.noise_seed``); the same seed and split corrupt the same labels.
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
    images, pixel_report = _corrupt_pixels(dataset, noise, seed)
    report.update(pixel_report)
    corrupted = dataclasses.replace(dataset, train_images=images[0], test_images=images[1])
    return NoisyData(corrupted, trained, report)


def _corrupt_pixels(dataset: Dataset, noise: Noise, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """(train images, test images) after the pixel corruption, and its record.

    The validation split is carved from the training images later, so it is corrupted with them.
    """
    train, test = dataset.train_images, dataset.test_images
    kind = noise.pixel_corruption
    if kind == "shuffle_pixels":
        return (shuffle_pixels(train, seed), shuffle_pixels(test, seed)), {"pixels": "one permutation"}
    if kind == "random_pixels":
        return (random_pixels(train, seed, split=0), random_pixels(test, seed, split=1)), \
            {"pixels": "one permutation per image"}
    if kind == "gaussian_images":
        # Moments in the [0, 1] scale the trainer normalises from, so uint8 data gives float32 in that scale.
        scale = 1 / 255 if train.dtype == np.uint8 else 1.0
        mean, std = (moment * scale for moment in channel_moments(train))
        images = (gaussian_images(train.shape, mean, std, seed, split=0),
                  gaussian_images(test.shape, mean, std, seed, split=1))
        return images, {"pixels": "gaussian", "gaussian_mean": mean.tolist(), "gaussian_std": std.tolist()}
    return (train, test), {"pixels": "as stored"}
