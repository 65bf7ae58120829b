"""A third-party training task for hpa: stripes in three orientations, made up on the spot.

    pip install examples/hpa-stripes
    hpa experiments                       # lists 'stripes'
    hpa train --plugin stripes --epochs 5 --out runs/stripes

The dataset is numpy only (a task plugin stays light: hpa imports torch when it
trains) and the same on every machine: it is drawn from a fixed seed, and the
trainer seeds everything else (split, init, batches) from ``--seed``.
"""

from __future__ import annotations

import hashlib

import numpy as np

import hpa
from hpa.experiments import Dataset, Recipe, Task

SIDE = 8  # pixels: the 8x8 of scikit-learn's digits, so hpa's small CNNs fit
CLASSES = ("horizontal", "vertical", "diagonal")
SEED = 2024  # the dataset's own; not --seed, which varies the training, not the data


@hpa.hookimpl
def register_experiments(register):
    register(Task(
        name="stripes",
        dataset=stripes,
        architecture="cifar:small_max",  # any loader spec that builds a module; --arch overrides it
        input_size=(1, SIDE, SIDE),
        num_classes=len(CLASSES),
        recipe=Recipe(epochs=10, batch_size=32, lr=0.02, step_epochs=5, shift=1, flip=False),
        description="synthetic 8x8 stripes, 3 orientations (example plugin hpa-stripes)",
    ))


def stripes(data_dir, download: bool, n_train: int = 600, n_test: int = 150) -> Dataset:
    """The task's Dataset; ``data_dir`` and ``download`` do not apply (nothing is read or fetched)."""
    rng = np.random.default_rng(SEED)
    x_train, y_train = _draw(rng, n_train)
    x_test, y_test = _draw(rng, n_test)
    digest = hashlib.sha256(x_train.tobytes() + x_test.tobytes()).hexdigest()
    return Dataset(x_train, y_train, x_test, y_test, num_classes=len(CLASSES),
                   source={"name": "hpa-stripes synthetic", "seed": SEED, "sha256": digest})


def _draw(rng, count: int):
    """``count`` noisy stripe images (float32 in [0, 1], shape (count, 1, 8, 8)) and their labels."""
    labels = rng.integers(0, len(CLASSES), count)
    rows, cols = np.mgrid[0:SIDE, 0:SIDE]
    period = rng.integers(2, 5, count)[:, None, None]
    phase = rng.integers(0, 4, count)[:, None, None]
    along = np.stack([rows, cols, rows + cols])[labels]  # the coordinate the stripes vary along
    clean = ((along + phase) % period < period / 2).astype(np.float32)
    noisy = clean * 0.8 + 0.2 * rng.random((count, SIDE, SIDE), dtype=np.float32)
    return noisy[:, None].astype(np.float32), labels.astype(np.int64)
