"""Corrupted data for the noise experiments (seed 004 Fig. 6 and A.6, after Zhang et al. 2017).

Pure, seeded functions of numpy arrays: any task gets every kind of noise, and the
same ``seed`` always corrupts the same labels and pixels.  Each kind draws from its own
stream, ``SeedSequence([seed, STREAM])``, so adding one kind never changes another.

Labels are corrupted on the training split only; pixel corruptions apply to every
split (the caller passes each split through the same function and seed).
"""

from __future__ import annotations

import numpy as np

LABEL_NOISE_MODES = ("uniform", "wrong")
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
