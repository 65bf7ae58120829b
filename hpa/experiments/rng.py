"""The one table of random streams: every seeded draw of hpa's experiments names its stream here.

A stream's number is fixed forever, so a seed means the same draws in every hpa version.
The trainer's streams (``split`` ... ``dropout``) seed one generator per (seed, stream, epoch)
through :func:`stream_seed`; the noise streams (``labels`` ... ``gaussian``) seed numpy
generators per (noise seed, stream, split) through :func:`noise_generator`.  The two families
derive their seeds differently, so equal numbers in them never give equal draws.
Torch-free at import: :func:`generator` imports torch when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

STREAMS = {
    # the trainer's: stream_seed(seed, name, epoch)
    "split": 1,  # the stratified validation split (hpa.experiments.data.stratified_split)
    "init": 2,  # the initial weights (hpa.experiments.model.initialise) and the loader's own seed
    "shuffle": 3,  # each epoch's batch order
    "augment": 4,  # each epoch's shifts and flips (hpa.experiments.augment)
    "dropout": 5,  # the global RNG during each epoch
    "classes": 6,  # the --classes subset (seeded by --class-seed, hpa.experiments.streaming.class_subset)
    # the noise experiments': noise_generator(noise seed, name, split) (hpa.experiments.noise)
    "labels": 1,
    "shuffle_pixels": 2,
    "random_pixels": 3,
    "gaussian": 4,
}


def stream_seed(seed: int, stream: str, epoch: int = 0) -> int:
    """A 63-bit seed for one random stream of one epoch, independent across streams and epochs."""
    state = np.random.SeedSequence([int(seed), STREAMS[stream], int(epoch)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(seed: int, stream: str, epoch: int = 0) -> torch.Generator:
    """A torch CPU generator of one stream of one epoch (moved draws give CUDA the same numbers)."""
    import torch  # here, not at the top: the table and the noise streams stay torch-free

    return torch.Generator().manual_seed(stream_seed(seed, stream, epoch))


def sample_generator(seed: int, stream: str, epoch: int, index: int) -> torch.Generator:
    """A torch CPU generator of one sample's draws in one epoch (the streaming path's per-image augmentation):
    a function of (seed, epoch, index) alone, whichever worker, process or rank draws it."""
    import torch

    state = np.random.SeedSequence([int(seed), STREAMS[stream], int(epoch), int(index)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def noise_generator(seed: int, stream: str, split: int = 0) -> np.random.Generator:
    """The random stream of one kind of noise (and one split, for per-image draws)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], int(split)]))
